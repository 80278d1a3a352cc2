"""Graph builders against the independent numpy reference (tests/numpy_ref.py)."""

from __future__ import annotations

import numpy as np
import numpy_ref as ref
import onnxruntime as ort
import pytest
import tiny_model
from onnx import TensorProto

from e2llm_edge.device.runner import make_session
from onnx_export import graph
from onnx_export.source import ModelConfig, ModelWeights, TokenizerData

C = tiny_model.CFG


def cfg(**over: object) -> ModelConfig:
    base = dict(
        architecture="llama",
        max_position=256,
        tie_word_embeddings=True,
        attention_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        **C,
    )
    base.update(over)
    return ModelConfig(**base)  # type: ignore[arg-type]


def weights(seed: int = 0, bias: bool = False) -> ModelWeights:
    w = tiny_model.hf_weights(seed)
    if bias:
        rng = np.random.default_rng(seed + 1)
        for i in range(C["n_layers"]):
            for n, rows in (("q", C["n_heads"]), ("k", C["n_kv_heads"]), ("v", C["n_kv_heads"])):
                w[f"model.layers.{i}.self_attn.{n}_proj.bias"] = rng.normal(
                    0, 0.2, rows * C["head_dim"]
                ).astype(np.float32)
    return ModelWeights(
        name="tiny",
        config=cfg(attention_bias=bias),
        source={"path": "<mem>"},
        tokenizer=TokenizerData(None, None, None),
        _get=w.__getitem__,
        names=set(w),
    )


def session(model: object) -> ort.InferenceSession:
    return make_session(model.SerializeToString())  # type: ignore[attr-defined]


def layer_weights(w: ModelWeights, i: int) -> dict[str, np.ndarray]:
    p = f"model.layers.{i}."
    return {n[len(p) :]: w.get(n).astype(np.float64) for n in w.layer_tensor_names(i)}


def ref_layers(
    w: ModelWeights,
    start: int,
    end: int,
    x: np.ndarray,
    pos: np.ndarray,
    mask: np.ndarray,
    past: dict[int, tuple[np.ndarray, np.ndarray]],
):
    c = w.config.to_dict()
    x = x.astype(np.float64)
    present = {}
    for i in range(start, end):
        x, k, v = ref.layer(x, pos, mask, *past[i], layer_weights(w, i), c)
        present[i] = (k, v)
    return x, present


def run_layers(w: ModelWeights, start: int, end: int, x, pos, mask, past):
    sess = session(graph.layers_model(w.config, start, end, w))
    feeds = {"hidden": x.astype(np.float32), "position_ids": pos, "attention_mask": mask}
    for i in range(start, end):
        feeds[f"past_key_{i}"] = past[i][0].astype(np.float32)
        feeds[f"past_value_{i}"] = past[i][1].astype(np.float32)
    outs = sess.run(None, feeds)
    return outs[0], {i: (outs[1 + 2 * j], outs[2 + 2 * j]) for j, i in enumerate(range(start, end))}


def empty_past(b: int, start: int, end: int):
    z = np.zeros((b, C["n_kv_heads"], 0, C["head_dim"]))
    return {i: (z, z) for i in range(start, end)}


def test_rms_norm_matches_reference() -> None:
    g = graph.GraphBuilder("t")
    x = g.add_input("x", TensorProto.FLOAT, ["b", "t", 64])
    w = np.random.default_rng(1).normal(size=64).astype(np.float32)
    g.add_output(
        "y", graph.rms_norm(g, x, g.const(w, np.float32), 1e-5), TensorProto.FLOAT, ["b", "t", 64]
    )
    xv = np.random.default_rng(2).normal(size=(2, 5, 64)).astype(np.float32)
    got = session(g.model()).run(None, {"x": xv})[0]
    np.testing.assert_allclose(got, ref.rms_norm(xv.astype(np.float64), w, 1e-5), atol=1e-5)


def test_rope_matches_reference() -> None:
    g = graph.GraphBuilder("t")
    x = g.add_input("x", TensorProto.FLOAT, ["b", 4, "t", 16])
    pos = g.add_input("pos", TensorProto.INT64, ["b", "t"])
    cos, sin = graph.rope_tables(g, pos, cfg(head_dim=16, rope_theta=10000.0))
    y = graph.apply_rope(g, x, cos, sin, 16, 16)
    g.add_output("y", y, TensorProto.FLOAT, ["b", 4, "t", 16])
    xv = np.random.default_rng(3).normal(size=(2, 4, 7, 16)).astype(np.float32)
    pv = np.array([np.arange(7), np.arange(100, 107)], np.int64)
    got = session(g.model()).run(None, {"x": xv, "pos": pv})[0]
    np.testing.assert_allclose(got, ref.rope(xv.astype(np.float64), pv, 10000.0), atol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
def test_layer_prefill_matches_reference(bias: bool) -> None:
    w = weights(bias=bias)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 9, 64))
    pos = np.arange(9, dtype=np.int64)[None]
    mask = np.ones((1, 9), np.int64)
    got, got_kv = run_layers(w, 0, 1, x, pos, mask, empty_past(1, 0, 1))
    want, want_kv = ref_layers(w, 0, 1, x, pos, mask, empty_past(1, 0, 1))
    np.testing.assert_allclose(got, want, atol=2e-4)
    np.testing.assert_allclose(got_kv[0][0], want_kv[0][0], atol=2e-4)
    np.testing.assert_allclose(got_kv[0][1], want_kv[0][1], atol=2e-4)


def test_decode_with_past_equals_longer_prefill() -> None:
    """Decoding token T with the past of T tokens equals position T of a T+1 prefill."""
    w = weights()
    rng = np.random.default_rng(5)
    x = rng.normal(size=(1, 8, 64)).astype(np.float32)
    full, _ = run_layers(
        w,
        0,
        3,
        x,
        np.arange(8, dtype=np.int64)[None],
        np.ones((1, 8), np.int64),
        empty_past(1, 0, 3),
    )
    _, past = run_layers(
        w,
        0,
        3,
        x[:, :7],
        np.arange(7, dtype=np.int64)[None],
        np.ones((1, 7), np.int64),
        empty_past(1, 0, 3),
    )
    step, present = run_layers(
        w, 0, 3, x[:, 7:], np.array([[7]], np.int64), np.ones((1, 8), np.int64), past
    )
    np.testing.assert_allclose(step[:, 0], full[:, 7], atol=1e-4)
    assert present[0][0].shape == (1, C["n_kv_heads"], 8, C["head_dim"])
    past64 = {i: (a.astype(np.float64), b.astype(np.float64)) for i, (a, b) in past.items()}
    want, _ = ref_layers(w, 0, 3, x[:, 7:], np.array([[7]]), np.ones((1, 8), np.int64), past64)
    np.testing.assert_allclose(step, want, atol=2e-4)


def test_batch_with_left_padding_matches_single_sequences() -> None:
    """Batch of two prompts (lengths 6 and 4, the second left-padded) and one decode step."""
    w = weights()
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(1, 6, 64)), rng.normal(size=(1, 4, 64))
    xb = np.concatenate([a, np.concatenate([np.zeros((1, 2, 64)), b], 1)], 0)
    pos = np.array([np.arange(6), [0, 0, 0, 1, 2, 3]], np.int64)
    mask = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int64)
    got, kv = run_layers(w, 0, 2, xb, pos, mask, empty_past(2, 0, 2))
    want, _ = ref_layers(w, 0, 2, xb, pos, mask, empty_past(2, 0, 2))
    np.testing.assert_allclose(got, want, atol=2e-4)
    single_a, _ = run_layers(w, 0, 2, a, pos[:1], mask[:1], empty_past(1, 0, 2))
    single_b, kv_b = run_layers(
        w,
        0,
        2,
        b,
        np.arange(4, dtype=np.int64)[None],
        np.ones((1, 4), np.int64),
        empty_past(1, 0, 2),
    )
    np.testing.assert_allclose(got[0], single_a[0], atol=1e-4)
    np.testing.assert_allclose(got[1, 2:], single_b[0], atol=1e-4)
    # one decode step for both, each at its own position
    step_x = rng.normal(size=(2, 1, 64))
    got2, _ = run_layers(
        w,
        0,
        2,
        step_x,
        np.array([[6], [4]], np.int64),
        np.concatenate([mask, np.ones((2, 1), np.int64)], 1),
        kv,
    )
    solo_b, _ = run_layers(
        w, 0, 2, step_x[1:], np.array([[4]], np.int64), np.ones((1, 5), np.int64), kv_b
    )
    np.testing.assert_allclose(got2[1], solo_b[0], atol=1e-4)


def test_range_segment_equals_chained_layers() -> None:
    w = weights()
    x = np.random.default_rng(7).normal(size=(1, 5, 64))
    pos, mask = np.arange(5, dtype=np.int64)[None], np.ones((1, 5), np.int64)
    whole, _ = run_layers(w, 0, 3, x, pos, mask, empty_past(1, 0, 3))
    h = x
    for i in range(3):
        h, _ = run_layers(w, i, i + 1, h, pos, mask, empty_past(1, i, i + 1))
    np.testing.assert_allclose(whole, h, atol=1e-5)


def test_embed_and_head_match_reference() -> None:
    w = weights()
    ids = np.array([[3, 7, 299]], np.int64)
    emb = session(graph.embed_model(w.config, w)).run(None, {"input_ids": ids})[0]
    np.testing.assert_array_equal(emb[0], w.get("model.embed_tokens.weight")[ids[0]])
    logits = session(graph.head_model(w.config, w)).run(None, {"hidden": emb})[0]
    want = ref.rms_norm(emb.astype(np.float64), w.get("model.norm.weight"), 1e-5) @ w.get(
        "model.embed_tokens.weight"
    ).T.astype(np.float64)
    np.testing.assert_allclose(logits, want, atol=1e-4)
