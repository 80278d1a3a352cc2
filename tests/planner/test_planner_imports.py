"""Devices read plans (and the CLI registers) without deap or scipy: only planning needs
them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

GUARD = """
import builtins, sys
real = builtins.__import__
def guard(name, *args, **kwargs):
    if name.split(".")[0] in ("deap", "matplotlib", "scipy"):
        raise ImportError("not installed on devices: " + name)
    return real(name, *args, **kwargs)
builtins.__import__ = guard
sys.path.insert(0, sys.argv[1])
from planner import Inventory, Plan, Workload, ModelSpec
import planner.plan, planner.cli, planner.routing, planner.metrics, planner.pools
print("ok")
"""


def test_plan_reading_and_routing_need_no_planning_dependencies() -> None:
    out = subprocess.run(
        [sys.executable, "-c", GUARD, str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
