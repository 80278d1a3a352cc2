"""The planner's bench scripts run (short versions; the full figures come from running
them by hand)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def run(script: str, *args: str) -> str:
    out = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env={**os.environ, "PYTHONPATH": str(BENCH.parent)},
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_planner_bench_prints_spread_gap_and_times() -> None:
    text = run("planner_bench.py", "--sizes", "7", "--seeds", "2", "--pools", "paper")
    assert "| paper | 576/588 |" in text and "| paper | 2284/1004 |" in text
    assert "% ok |" in text  # two seeds within 2%
    assert "| 7 |" in text and "load average" in text


def test_planner_compare_prints_every_metric_and_the_goal() -> None:
    text = run(
        "planner_compare.py",
        "--pools",
        "paper",
        "--requests",
        "40",
        "--intervals",
        "1",
        "--workloads",
        "576/588",
        "--methods",
        "e2llm,splitwise",
        "--no-drift",
    )
    assert "| 576/588 | 1 | e2llm (" in text and "| 576/588 | 1 | splitwise (count)" in text
    assert "TTFT p99" in text and "goodput" in text
    assert "MET" in text or "MISSED" in text


def test_planner_binding_compares_the_runtime_binding_with_the_simulated_one() -> None:
    text = run(
        "planner_binding.py",
        "--pools",
        "paper",
        "--requests",
        "30",
        "--intervals",
        "1",
        "--workloads",
        "576/588",
    )
    assert "| paper | 576/588 | 1 | ready (" in text
    assert "| paper | 576/588 | 1 | dispatch (" in text and "x |" in text
