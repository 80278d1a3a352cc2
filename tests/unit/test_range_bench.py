"""`bench/range_sessions.py`, short, on the tiny model: every way of getting a stage's
session runs, and the ways that must give the same bits do."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiny_model

from e2llm_edge.device.fast_runner import contrib_supported
from onnx_export.export import export_model

BENCH = Path(__file__).resolve().parents[2] / "bench"

pytestmark = pytest.mark.slow


def test_every_method_runs_and_equal_graphs_give_equal_outputs(tmp_path: Path) -> None:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import range_sessions

    tiny_model.write_gguf(tmp_path / "tiny.gguf")
    variants = ["standard/fp32"] + (["contrib/exact"] if contrib_supported() else [])
    for v in variants:
        graph, precision = v.split("/")
        export_model(
            tmp_path / "tiny.gguf",
            tmp_path / "m",
            ranges="0-2",
            progress=False,
            graph_name=graph,
            precision=precision,
        )
    res = {}
    for v in variants:  # every method on the portable graph, the ones that differ on contrib
        methods = range_sessions.METHODS if v == variants[0] else ("a", "b", "d", "d-range")
        a = SimpleNamespace(
            rounds=1, variants=[v], layers=[2], methods=methods, threads=1, steps=2, prompt=4
        )
        res.update(range_sessions.measure(tmp_path / "m", a))
    table = range_sessions.table(res)
    for (v, _, meth), (row,) in res.items():
        assert row["sessions"] == (2 if meth == "b" else 1)
        assert row["tok_s"] > 0 and row["peak_mb"] >= row["loaded_mb"] > 0
        assert f"{v:14s}   2 {meth:8s}" in table
    a = SimpleNamespace(rounds=1, threads=1, steps=8, prompt=4)
    tps = range_sessions.speed(tmp_path / "m", variants[-1], 2, a)
    assert list(tps) == list(range_sessions.SPEED_METHODS) and min(tps.values()) > 0
    for v in variants:
        sums = {m: r[0]["checksum"] for (v_, _, m), r in res.items() if v_ == v}
        # composed from per-layer files: the chain's bits; the range file in place: its own
        assert len({sums[m] for m in ("b", "c-bytes", "c-file", "d") if m in sums}) == 1, sums
        assert sums["d-range"] == sums["a"], sums
        if v == "standard/fp32":  # no fusion across layers in the portable graph
            assert sums["d"] == sums["a"], sums
