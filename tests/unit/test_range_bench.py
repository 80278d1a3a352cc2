"""`bench/range_sessions.py`, short, on the tiny model: every way of getting a stage's
session runs, and the ways that must give the same bits do."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny_model

from onnx_export.export import export_model

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.slow


def test_every_method_runs_and_equal_graphs_give_equal_outputs(tmp_path: Path) -> None:
    """The portable graph only (the contrib graph's bit relations: tests/unit/test_ranges.py)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import range_sessions

    tiny_model.write_gguf(tmp_path / "tiny.gguf")
    export_model(tmp_path / "tiny.gguf", tmp_path / "m", ranges="0-2", progress=False)
    v = "standard/fp32"
    a = SimpleNamespace(
        rounds=1,
        variants=[v],
        layers=[2],
        methods=range_sessions.METHODS,
        threads=1,
        steps=2,
        prompt=4,
    )
    res = range_sessions.measure(tmp_path / "m", a)
    table = range_sessions.table(res)
    for (_, _, meth), (row,) in res.items():
        assert row["sessions"] == (2 if meth == "b" else 1)
        assert row["tok_s"] > 0 and row["peak_mb"] >= row["loaded_mb"] > 0
        assert f"{v:14s}   2 {meth:8s}" in table
    # no fusion across layers in the portable graph: every way gives the same bits
    sums = {m: r[0]["checksum"] for (_, _, m), r in res.items()}
    assert len(set(sums.values())) == 1, sums
    tps = range_sessions.speed(
        tmp_path / "m", v, 2, SimpleNamespace(rounds=1, threads=1, steps=8, prompt=4)
    )
    assert list(tps) == list(range_sessions.SPEED_METHODS) and min(tps.values()) > 0
