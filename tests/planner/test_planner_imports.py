"""Devices read plans without deap: only planning itself needs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

GUARD = """
import builtins, sys
real = builtins.__import__
def guard(name, *args, **kwargs):
    if name == "deap" or name.startswith("deap.") or name.startswith("matplotlib"):
        raise ImportError("not installed on devices: " + name)
    return real(name, *args, **kwargs)
builtins.__import__ = guard
sys.path.insert(0, sys.argv[1])
from planner import Inventory, Plan, Workload, ModelSpec
import planner.plan, planner.cli
print("ok")
"""


def test_plan_reading_needs_neither_deap_nor_matplotlib() -> None:
    out = subprocess.run(
        [sys.executable, "-c", GUARD, str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
