"""GGUF blocks -> MatMulNBits (`onnx_export.quant`): what is stored is exactly gguf's own
dequantization, bit for bit, for every type, and onnxruntime computes with it.

Random blocks are random bytes (every code, scale and minimum bit pattern a file can
hold) with realistic fp16 scales: a K-quant block of random bytes is as valid as any.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType, quants
from gguf.constants import GGML_QUANT_SIZES

from e2llm_edge.device.fast_runner import contrib_supported
from e2llm_edge.device.runner import make_session
from onnx_export import quant
from onnx_export.fast_graph import Linear, _finish
from onnx_export.graph import GraphBuilder
from onnx_export.source import ModelWeights, RawTensor, TokenizerData

N, K = 40, 512  # two K-quant super-blocks per row, sixteen 32-blocks

SCALE_FIELDS = {  # byte offsets of the fp16 fields of a block: (scale, minimum or None)
    "Q4_0": (0, None),
    "Q4_1": (0, 2),
    "Q5_0": (0, None),
    "Q5_1": (0, 2),
    "Q8_0": (0, None),
    "Q2_K": (80, 82),
    "Q3_K": (108, None),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208, None),
    "IQ4_NL": (0, None),
    "IQ4_XS": (0, None),
}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# (bits, block, parts, block minimum) per type: with fp32 activations (4-bit codes only) and
# with int8 ones (8-bit codes allowed).
LAYOUT_4 = {
    "Q4_0": (4, 32, 1, False),
    "Q4_1": (4, 32, 1, True),
    "Q5_0": (4, 32, 2, False),
    "Q5_1": (4, 32, 2, True),
    "Q8_0": (4, 32, 2, False),
    "Q2_K": (4, 16, 1, True),
    "Q3_K": (4, 16, 1, False),
    "Q4_K": (4, 32, 1, True),
    "Q5_K": (4, 32, 2, True),
    "Q6_K": (4, 16, 2, False),
    "IQ4_NL": (4, 32, 2, False),
    "IQ4_XS": (4, 32, 2, False),
}
LAYOUT_8 = {
    t: (8, b, 1, m) if parts == 2 else (bits, b, parts, m)
    for t, (bits, b, parts, m) in LAYOUT_4.items()
}


def random_rows(qtype: str, rng: np.random.Generator, n: int = N, k: int = K) -> RawTensor:
    elems, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, (n * k // elems, size), dtype=np.uint8)
    scale_at, min_at = SCALE_FIELDS[qtype]
    d = rng.uniform(2e-3, 2e-2, len(blocks))
    if qtype not in K_QUANTS:  # llama.cpp's d = max / -8 etc.: either sign
        d *= rng.choice([-1.0, 1.0], len(blocks))
    blocks[:, scale_at : scale_at + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
    if min_at is not None:
        # Q4_1/Q5_1: m = the block's minimum, about -8 to -16 scales; K-quants: dmin > 0.
        m = -np.abs(d) * rng.uniform(4, 20, len(d)) if qtype[-1] == "1" else d * rng.uniform(0.5, 2)
        blocks[:, min_at : min_at + 2] = m.astype(np.float16).view(np.uint8).reshape(-1, 2)
    return RawTensor(qtype, blocks.reshape(n, -1), (n, k))


def gguf_values(raw: RawTensor) -> np.ndarray:
    """gguf's own dequantization."""
    if raw.qtype == "F32":
        return raw.data
    t = GGMLQuantizationType[raw.qtype]
    return quants.dequantize(raw.data, t).reshape(raw.shape)


@pytest.mark.parametrize("max_bits", [4, 8])
@pytest.mark.parametrize("qtype", sorted(SCALE_FIELDS))
def test_stored_weights_are_gguf_values_bit_for_bit(qtype: str, max_bits: int) -> None:
    raw = random_rows(qtype, np.random.default_rng(sorted(SCALE_FIELDS).index(qtype)))
    qm = quant.to_nbits(qtype, raw.data, K, max_bits)
    want = (LAYOUT_4 if max_bits == 4 else LAYOUT_8)[qtype]
    p = qm.parts[0]
    assert (p.bits, p.block, len(qm.parts), qm.offsets is not None) == want
    assert all(q.bits <= max_bits and q.codes().max() < 1 << q.bits for q in qm.parts)
    assert quant.products_exact(qm), "a (q - z) * s is rounded in fp32"
    assert quant.rounding_free(qm)
    got = quant.represented(qm)
    np.testing.assert_array_equal(got, gguf_values(raw).astype(np.float64))


# Codebook types (re-encoded from gguf's values; MXFP4 decoded from its blocks, an e8m0
# exponent per 32): where their fp16/e8m0 scale sits, its value.
REENCODED = {
    "IQ1_S": (0, np.float16(0.01)),
    "IQ2_XXS": (0, np.float16(0.01)),
    "IQ3_XXS": (0, np.float16(0.01)),
    "IQ3_S": (0, np.float16(0.01)),
    "TQ2_0": (64, np.float16(0.01)),
    "MXFP4": (0, np.uint8(120)),
}


@pytest.mark.parametrize("max_bits", [4, 8])
@pytest.mark.parametrize("qtype", list(REENCODED))
def test_other_types_get_the_nearest_exact_wider_form(qtype: str, max_bits: int) -> None:
    """Codebook types: gguf's values re-encoded as int8 codes times a scale per block."""
    elems, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rng = np.random.default_rng(len(qtype))
    blocks = rng.integers(0, 256, (N * K // elems, size), dtype=np.uint8)
    at, scale = REENCODED[qtype]
    blocks[:, at : at + scale.nbytes] = np.asarray([scale]).view(np.uint8)
    raw = RawTensor(qtype, blocks.reshape(N, -1), (N, K))
    qm = quant.to_nbits(qtype, raw.data, K, max_bits)
    assert qm.parts[0].bits == max_bits and qm.offsets is None
    assert quant.products_exact(qm)
    np.testing.assert_array_equal(quant.represented(qm), gguf_values(raw).astype(np.float64))


def test_types_without_an_exact_form_say_why() -> None:
    with pytest.raises(quant.NoExactForm, match="gguf cannot dequantize"):
        quant.to_nbits("Q8_K", np.zeros((2, 2 * 292), np.uint8), 512)
    bf16 = np.random.default_rng(0).standard_normal((4, K)).astype(np.float32)
    bits = (bf16.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(4, -1)
    with pytest.raises(quant.NoExactForm, match="not 8-bit integers"):
        quant.to_nbits("BF16", bits, K)


def test_nibble_order_is_matmulnbits_order() -> None:
    """GGUF keeps element i and i+16 in one byte; MatMulNBits keeps 2i and 2i+1."""
    raw = random_rows("Q4_0", np.random.default_rng(2))
    qm = quant.to_nbits("Q4_0", raw.data, K)
    b = raw.data.reshape(N, K // 32, 18)
    q_gguf = np.concatenate([b[..., 2:] & 15, b[..., 2:] >> 4], axis=-1)
    packed = qm.parts[0].packed
    assert np.array_equal(packed & 15, q_gguf[..., 0::2])
    assert np.array_equal(packed >> 4, q_gguf[..., 1::2])


def test_a_block_minimum_gguf_rounds_is_detected() -> None:
    """d * q - dmin * m that fp32 cannot hold (dmin 2^-12 of d): gguf rounds it, a split
    form could not equal it, so the matrix is not `rounding_free`."""
    raw = random_rows("Q4_K", np.random.default_rng(5))
    b = raw.data.reshape(-1, 144)
    b[:, 0:2] = np.array([1.0], np.float16).view(np.uint8)
    b[:, 2:4] = np.array([2.0**-12 * 1.1], np.float16).view(np.uint8)
    qm = quant.to_nbits("Q4_K", raw.data, K)
    assert not quant.rounding_free(qm)
    assert not np.array_equal(quant.represented(qm), gguf_values(raw).astype(np.float64))


def fake_weights(raws: dict[str, RawTensor]) -> ModelWeights:
    """A ModelWeights over in-memory GGUF tensors (Linear reads nothing else)."""
    return ModelWeights(
        name="test",
        config=None,  # type: ignore[arg-type]
        source={"path": "<memory>"},
        tokenizer=TokenizerData(None, None, None),
        _get=lambda n: gguf_values(raws[n]),
        names=set(raws),
        _raw=lambda n: raws[n],
    )


def _run(
    tmp_path: Path, raws: dict[str, RawTensor], precision: str, x: np.ndarray
) -> tuple[np.ndarray, Linear]:
    g = GraphBuilder("linear")
    xi = g.add_input("x", onnx.TensorProto.FLOAT, ["m", K])  # flat (M, K) as in the layers
    lin = Linear(g, precision, fake_weights(raws))
    n = sum(r.shape[0] for r in raws.values())
    bias = np.arange(n, dtype=np.float32) / 7
    y = lin(xi, list(raws), "w", bias)
    g.add_output("y", y, onnx.TensorProto.FLOAT, ["m", n])
    path = tmp_path / f"{precision}.onnx"
    _finish(g, lin).save(path)
    return make_session(path).run(None, {"x": x})[0], lin


STACKS = {
    "qkv of Q4_K_M at 896 (Q5_0, Q5_0, Q8_0)": ["Q5_0", "Q5_0", "Q8_0"],
    "qkv of Q4_K_M at 1536 (Q4_K, Q4_K, Q6_K)": ["Q4_K", "Q4_K", "Q6_K"],
    "every other type": ["Q4_0", "Q4_1", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "IQ4_NL", "IQ4_XS"],
    "a type with no exact form in the middle": ["Q4_K", "F32", "Q4_K"],
}


@pytest.mark.skipif(not contrib_supported(), reason="no com.microsoft contrib operators")
@pytest.mark.parametrize("stack", list(STACKS))
def test_onnxruntime_multiplies_by_the_gguf_matrix(tmp_path: Path, stack: str) -> None:
    """Matrices of mixed types stacked along N (packed QKV): each keeps its own exact form
    (one MatMulNBits per run of equal layouts); the result is x @ W.T + bias up to fp32
    summation (exact) or int8 activation rounding (int8)."""
    rng = np.random.default_rng(3)
    raws: dict[str, RawTensor] = {}
    for j, t in enumerate(STACKS[stack]):
        if t == "F32":
            w = rng.normal(0, 0.02, (N, K)).astype(np.float32)
            raws[f"m{j}"] = RawTensor("F32", w, (N, K))
        else:
            raws[f"m{j}"] = random_rows(t, rng)
    x = rng.standard_normal((5, K)).astype(np.float32)
    w64 = np.concatenate([gguf_values(r).astype(np.float64) for r in raws.values()])
    want = x.astype(np.float64) @ w64.T + np.arange(w64.shape[0]) / 7
    scale = float(np.abs(want).max())
    exact, lin = _run(tmp_path, raws, "exact", x)
    assert np.abs(exact - want).max() <= 2e-6 * scale  # fp32 sums: rounding only
    assert not lin.fallbacks  # F32 is stored as is: lossless, not a fallback
    assert set(lin.forms) == set(STACKS[stack]) - {"F32"}
    fast, _ = _run(tmp_path, raws, "int8", x)
    assert np.abs(fast - want).max() <= 3e-2 * scale  # activations quantized to int8


@pytest.mark.skipif(not contrib_supported(), reason="no com.microsoft contrib operators")
def test_a_rounded_block_minimum_falls_back_for_that_matrix_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    bad = random_rows("Q4_K", rng)
    b = bad.data.reshape(-1, 144)
    b[:, 0:2] = np.array([1.0], np.float16).view(np.uint8)
    b[:, 2:4] = np.array([2.0**-12 * 1.1], np.float16).view(np.uint8)
    raws = {"good": random_rows("Q4_K", rng), "bad": bad}
    x = rng.standard_normal((3, K)).astype(np.float32)
    y, lin = _run(tmp_path, raws, "exact", x)
    assert list(lin.fallbacks) == ["bad"] and "gguf rounds" in lin.fallbacks["bad"]
    w64 = np.concatenate([gguf_values(r).astype(np.float64) for r in raws.values()])
    want = x.astype(np.float64) @ w64.T + np.arange(2 * N) / 7
    assert np.abs(y - want).max() <= 2e-6 * float(np.abs(want).max())


@pytest.mark.skipif(not contrib_supported(), reason="no com.microsoft contrib operators")
@pytest.mark.parametrize("qtype", ["Q5_0", "Q6_K", "Q8_0"])
def test_the_parts_of_a_matrix_share_one_array_of_scales(tmp_path: Path, qtype: str) -> None:
    """A code wider than 4 bits is two 4-bit parts whose scales differ by a power of two:
    the high part runs over x times it (exact), so the segment holds the scales once."""
    rng = np.random.default_rng(6)
    raws = {"m0": random_rows(qtype, rng)}
    x = rng.standard_normal((3, K)).astype(np.float32)
    want = x.astype(np.float64) @ gguf_values(raws["m0"]).astype(np.float64).T + np.arange(N) / 7
    got, lin = _run(tmp_path, raws, "exact", x)
    assert np.abs(got - want).max() <= 2e-6 * float(np.abs(want).max())
    block = 16 if qtype == "Q6_K" else 32
    scales = [list(t.dims) for t in lin.g.inits if t.name.endswith(".scales")]
    assert scales == [[N, K // block]]
    assert sum(n.op_type == "MatMulNBits" for n in lin.g.nodes) == 2
