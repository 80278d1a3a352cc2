"""GGUF blocks -> MatMulNBits: the repacked weights are the GGUF's, checked against gguf's own
numpy dequantizer and through onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType, quants

from e2llm_edge.device.fast_runner import contrib_supported
from e2llm_edge.device.runner import make_session
from onnx_export.fast_graph import Linear, _finish, dequantize_nbits, quantize_raw
from onnx_export.graph import GraphBuilder
from onnx_export.source import RawTensor

N, K = 48, 96  # three blocks of 32 along K


def random_blocks(qtype: str, rng: np.random.Generator) -> RawTensor:
    """Random but realistic GGUF rows: fp16 scales (and minimums), random quants."""
    nb = K // 32
    d = rng.uniform(1e-3, 5e-2, (N, nb)).astype(np.float16)
    if qtype == "Q8_0":
        qs = rng.integers(-128, 128, (N, nb, 32)).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([d[..., None].view(np.uint8), qs], axis=-1)
    else:
        qs = rng.integers(0, 256, (N, nb, 16)).astype(np.uint8)
        parts = [d[..., None].view(np.uint8)]
        if qtype == "Q4_1":  # the block minimum is about -8 scales
            m = (-8 * d.astype(np.float32) * rng.uniform(0.8, 1.2, (N, nb))).astype(np.float16)
            parts.append(m[..., None].view(np.uint8))
        blocks = np.concatenate([*parts, qs], axis=-1)
    return RawTensor(qtype, np.ascontiguousarray(blocks.reshape(N, -1)), (N, K))


def gguf_dequant(raw: RawTensor) -> np.ndarray:
    return quants.dequantize(raw.data, GGMLQuantizationType[raw.qtype]).reshape(N, K)


@pytest.mark.parametrize("bits8", [False, True])
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_repacked_weights_equal_gguf_dequantizer(qtype: str, bits8: bool) -> None:
    raw = random_blocks(qtype, np.random.default_rng(1))
    qz = quantize_raw(raw, bits8)
    assert qz is not None
    want = gguf_dequant(raw)
    got = dequantize_nbits(qz)
    # Q4_0/Q8_0 are bit-identical; Q4_1's d*(q-8) + (m+8d) differs from d*q+m by fp32 rounding.
    tol = 2e-7 * float(np.abs(want).max()) if qtype == "Q4_1" else 0.0
    assert np.abs(got - want).max() <= tol
    if qtype == "Q8_0":
        assert [p.bits for p in qz.parts] == ([8] if bits8 else [4, 4])


def test_nibble_order_is_repacked() -> None:
    """GGUF keeps element i and i+16 in one byte; MatMulNBits keeps 2i and 2i+1."""
    raw = random_blocks("Q4_0", np.random.default_rng(2))
    qz = quantize_raw(raw)
    assert qz is not None
    b = raw.data.reshape(N, K // 32, 18)
    q_gguf = np.concatenate([b[..., 2:] & 15, b[..., 2:] >> 4], axis=-1)
    packed = qz.parts[0].packed
    assert np.array_equal(packed & 15, q_gguf[..., 0::2])
    assert np.array_equal(packed >> 4, q_gguf[..., 1::2])


def _run_linear(tmp_path: Path, raw: RawTensor, precision: str, x: np.ndarray) -> np.ndarray:
    g = GraphBuilder("linear")
    xi = g.add_input("x", onnx.TensorProto.FLOAT, ["m", K])  # flat (M, K) as in the layers
    y = Linear(g, precision)(xi, [raw], "w", lambda: gguf_dequant(raw))
    g.add_output("y", y, onnx.TensorProto.FLOAT, ["m", N])
    path = tmp_path / f"{raw.qtype}_{precision}.onnx"
    _finish(g).save(path)
    return make_session(path).run(None, {"x": x})[0]


@pytest.mark.skipif(not contrib_supported(), reason="no com.microsoft contrib operators")
@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_matmulnbits_matches_dequantized_matmul(tmp_path: Path, qtype: str) -> None:
    rng = np.random.default_rng(3)
    raw = random_blocks(qtype, rng)
    x = rng.standard_normal((5, K)).astype(np.float32)
    want = x.astype(np.float64) @ gguf_dequant(raw).astype(np.float64).T
    scale = float(np.abs(want).max())
    exact = _run_linear(tmp_path, raw, "exact", x)
    assert np.abs(exact - want).max() <= 1e-5 * scale  # fp32 sums: rounding only
    fast = _run_linear(tmp_path, raw, "int8", x)
    assert np.abs(fast - want).max() <= 3e-2 * scale  # activations quantized to int8
