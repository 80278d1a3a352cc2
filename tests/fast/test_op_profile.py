"""`bench/op_profile.py`, short: onnxruntime's profiler on the real contrib layers, summed
by operator and linear layer (the breakdown behind the decode-speed notes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from e2llm_edge.device import runner

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def op_profile():  # type: ignore[no-untyped-def]
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import op_profile

    return op_profile


def test_a_decode_and_a_prefill_are_broken_down_by_operator_and_linear_layer(
    fast_dir: Path,
    op_profile,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    monkeypatch.setattr(runner, "PREFILL_CHUNK", 4)  # a prefill of 8 is 2 session runs
    profiles = op_profile.profile_stack(fast_dir, "int8", batches=[1, 2], prefills=[8], steps=3)
    assert [p.case for p in profiles] == ["int8 decode B=1", "int8 decode B=2", "int8 prefill T=8"]
    for p in profiles:
        rows = {r for r, _, _ in p.rows()}
        # every linear of the model is named, none falls through as a bare shape
        for lin in ("qkv", "o", "gate_up", "down"):
            assert f"MatMulNBits {lin}" in rows, (p.case, rows)
        assert "GroupQueryAttention" in rows and "Gemm gate_up block term" in rows
        assert not [
            r for r in rows if r.split(" ")[0] in op_profile.LINEARS and "x" in r.split(" ")[-1]
        ], rows
        assert p.calls == 3  # the warm-up and prompt runs are left out
        assert p.session_runs == (6 if "prefill" in p.case else 3)
        assert abs(sum(s for _, _, s in p.rows()) - 1.0) < 1e-9
        assert 0 < p.kernel_ms < p.wall_ms * 1.5
        assert "ms in kernels" in op_profile.report(p, top=3)
