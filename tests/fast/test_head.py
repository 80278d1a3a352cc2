"""The screened head: int8 screening, exact rescoring near the top, certified argmax.

Random rows with near-twins give near-ties, the hard case for screening: the screen alone
picks a wrong token in some rows, the rescored head never does. Q8_0 (8-bit codes, blocks
of 32) and Q6_K (8-bit codes, blocks of 16: activations quantized per 16) are both checked.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from gguf import GGMLQuantizationType, quants

from e2llm_edge.device.fast_runner import VariantHead, contrib_supported
from e2llm_edge.device.runner import make_session
from onnx_export import quant
from onnx_export.fast_graph import MS, RESCORE_CAP, _finish, _screened_head
from onnx_export.graph import GraphBuilder
from onnx_export.manifest import Manifest
from onnx_export.shared_data import externalize
from onnx_export.source import RawTensor

V, K, M = 4096, 128, 48  # Q6_K rows: 256 (one super-block)

pytestmark = pytest.mark.skipif(
    not contrib_supported(), reason="this onnxruntime lacks the com.microsoft contrib operators"
)


def q8_head(rng: np.random.Generator) -> tuple[RawTensor, np.ndarray]:
    """Random Q8_0 rows (V, K) and their exact float64 values."""
    nb = K // 32
    d = rng.uniform(1e-3, 2e-2, (V, nb)).astype(np.float16)
    q = rng.integers(-120, 121, (V, nb, 32)).astype(np.int8)
    # The second half: twins of the first, a few quants off by one, logits a hair apart.
    twin = q[: V // 2].astype(np.int16) + rng.integers(-1, 2, (V // 2, nb, 32)) * (
        rng.random((V // 2, nb, 32)) < 0.05
    )
    q[V // 2 :], d[V // 2 :] = twin.astype(np.int8), d[: V // 2]
    blocks = np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)], axis=-1)
    exact = (q.astype(np.float64) * d.astype(np.float64)[..., None]).reshape(V, K)
    return RawTensor("Q8_0", np.ascontiguousarray(blocks.reshape(V, -1)), (V, K)), exact


def q6k_head(rng: np.random.Generator) -> tuple[RawTensor, np.ndarray]:
    """Random Q6_K rows (random bytes, realistic scale d), the second half near-twins of the
    first (a few low bits of their codes flipped), and their exact values."""
    blocks = rng.integers(0, 256, (V, 1, 210), dtype=np.uint8)
    blocks[..., 192:208] = rng.integers(1, 40, (V, 1, 16), dtype=np.uint8)  # scales
    d = rng.uniform(1e-4, 1e-3, (V, 1)).astype(np.float16)
    blocks[..., 208:210] = d[..., None].view(np.uint8)
    flip = (rng.random((V // 2, 1, 128)) < 0.03).astype(np.uint8)
    blocks[V // 2 :] = blocks[: V // 2]
    blocks[V // 2 :, :, :128] ^= flip
    raw = RawTensor("Q6_K", np.ascontiguousarray(blocks.reshape(V, -1)), (V, 256))
    exact = quants.dequantize(raw.data, GGMLQuantizationType.Q6_K).astype(np.float64)
    return raw, exact.reshape(V, 256)


HEADS = {"Q8_0": q8_head, "Q6_K": q6k_head}


def session(tmp_path: Path, raw: RawTensor, screen_only: bool) -> object:
    g = GraphBuilder("head_test")
    k = raw.shape[1]
    h = g.add_input("h", onnx.TensorProto.FLOAT, ["rows", k])
    logits, bound = _screened_head(g, h, quant.to_nbits(raw.qtype, raw.data, k, 8))
    if screen_only:  # the screen's own output, for contrast
        logits = next(n.output[0] for n in g.nodes if n.op_type == "MatMulNBits")
    g.add_output("logits", logits, onnx.TensorProto.FLOAT, ["rows", V])
    g.add_output("bound", bound, onnx.TensorProto.FLOAT, ["rows"])
    path = tmp_path / f"head_{raw.qtype}_{screen_only}.onnx"
    _finish(g).save(path)
    assert any(n.domain == MS for n in onnx.load(path).graph.node)
    return make_session(path, 1)


@pytest.mark.parametrize("qtype", list(HEADS))
def test_screened_head_argmax_is_the_exact_one(tmp_path: Path, qtype: str) -> None:
    rng = np.random.default_rng(7)
    raw, w = HEADS[qtype](rng)
    x = rng.standard_normal((M, raw.shape[1])).astype(np.float32)
    x[:, 5] *= 20  # an outlier channel, as RMSNorm gains make: coarse int8 blocks
    exact = x.astype(np.float64) @ w.T
    full = session(tmp_path, raw, screen_only=False)
    logits, bound = full.run(None, {"h": x})  # type: ignore[attr-defined]
    screened, _ = session(tmp_path, raw, screen_only=True).run(None, {"h": x})  # type: ignore[attr-defined]

    best = exact.max(-1)
    picked = exact[np.arange(M), logits.argmax(-1)]
    assert np.all(picked >= best - 1e-4), "a rescored argmax is not the exact best token"
    if np.abs(screened - exact).max() > 1e-3:  # an int8 screen (an fp32 fallback is exact)
        assert np.any(screened.argmax(-1) != exact.argmax(-1)), "the screen is never wrong"
    # Every logit within the bound; those within one bound of the top rescored to exact.
    err = np.abs(logits - exact)
    assert np.all(err <= bound[:, None] + 1e-4)
    near = logits >= logits.max(-1, keepdims=True) - bound[:, None]
    assert np.all(err[near] < 1e-4)
    assert np.all(np.abs(screened - exact).max(-1) <= bound), "bound does not hold for the screen"


def test_a_flat_row_is_left_uncertified_and_the_others_are_not(tmp_path: Path) -> None:
    """All-zero hidden states make every logit tie: the band would be the whole vocabulary.
    That row, and one with a NaN, keep screened logits with bound +inf; their neighbours are
    unaffected."""
    rng = np.random.default_rng(3)
    raw, w = q8_head(rng)
    x = rng.standard_normal((4, K)).astype(np.float32)
    x[1] = 0.0
    x[3, 7] = np.nan  # not finite: nothing to certify either
    logits, bound = session(tmp_path, raw, screen_only=False).run(None, {"h": x})  # type: ignore[attr-defined]
    assert V > RESCORE_CAP
    assert np.isinf(bound[[1, 3]]).all() and np.isfinite(bound[[0, 2]]).all()
    exact = x.astype(np.float64) @ w.T
    for r in (0, 2):
        assert exact[r, logits[r].argmax()] >= exact[r].max() - 1e-4


@pytest.mark.model
@pytest.mark.slow
def test_the_unscreened_head_is_exported_and_chosen_where_the_screen_is_slow(
    fast_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both head segments are exported; the screened one is kept when fast (here), the
    unscreened one where the screen is `SLOW_SCREEN` times slower (thresholds moved so this
    machine plays both cases). Same greedy tokens either way; the unscreened bound is 0."""
    m = Manifest.load(fast_dir)
    v = ("contrib", "exact")
    names = [s.name for s in m.by_kind("head", *v)]
    assert names == ["contrib_exact_head", "contrib_exact_head_unscreened"]
    kept = VariantHead(m, v, verify=False)
    assert kept.segment.name == "contrib_exact_head"
    monkeypatch.setattr(VariantHead, "FAST_ENOUGH_S", 0.0)
    monkeypatch.setattr(VariantHead, "SLOW_SCREEN", 1e-9)  # any screen counts as slow
    fallback = VariantHead(m, v, verify=False)
    assert fallback.segment.name == "contrib_exact_head_unscreened"
    x = np.random.default_rng(1).normal(0, 1, (1, 4, int(m.config["hidden_size"])))
    a, bound_a = kept.run_with_bound(x.astype(np.float32))
    b, bound_b = fallback.run_with_bound(x.astype(np.float32))
    assert (bound_b == 0).all()
    ok = np.isfinite(bound_a)
    assert (a.argmax(-1)[ok] == b.argmax(-1)[ok]).all()


def _resident(path: Path) -> int:
    """Bytes of `path` this process has mapped and resident (/proc/self/smaps)."""
    total, current = 0, ""
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            current = fields[-1] if len(fields) > 5 else ""
        elif fields[:1] == ["Rss:"] and current == str(path):
            total += int(fields[1]) * 1024
    return total


def test_the_screened_heads_codes_are_held_once(tmp_path: Path) -> None:
    """The screen and the rescoring name the same file of codes, but the screen through
    initializers of its own: onnxruntime drops those once MatMulNBits has prepacked them,
    so after loading, the file the rescoring gathers rows from is not resident (a shared
    initializer stayed mapped with every page prepacking read: the codes held twice). The
    manifest counts each file once."""
    rng = np.random.default_rng(5)
    v, k = 16384, 256  # 4 MB of codes
    d = rng.uniform(1e-3, 2e-2, (v, k // 32)).astype(np.float16)
    q = rng.integers(-127, 128, (v, k // 32, 32)).astype(np.int8)
    blocks = np.concatenate([d[..., None].view(np.uint8), q.view(np.uint8)], axis=-1)
    qm = quant.to_nbits("Q8_0", blocks.reshape(v, -1), k, 8)
    g = GraphBuilder("head_test")
    h = g.add_input("h", onnx.TensorProto.FLOAT, ["rows", k])
    logits, bound = _screened_head(g, h, qm)
    g.add_output("logits", logits, onnx.TensorProto.FLOAT, ["rows", v])
    g.add_output("bound", bound, onnx.TensorProto.FLOAT, ["rows"])
    model = _finish(g)
    files, mapped = externalize(model, tmp_path)
    assert mapped == qm.nbytes  # codes and scales, each once
    codes = next(f for f in files if (tmp_path / f).stat().st_size == qm.parts[0].packed.nbytes)
    path = tmp_path / "head.onnx"
    model.save(path)
    sess = make_session(path, 1)
    assert _resident((tmp_path / codes).resolve()) < 64 * 1024
    x = rng.standard_normal((2, k)).astype(np.float32)
    out, _ = sess.run(None, {"h": x})
    exact = x.astype(np.float64) @ quant.represented(qm).T
    assert (out.argmax(-1) == exact.argmax(-1)).all()
