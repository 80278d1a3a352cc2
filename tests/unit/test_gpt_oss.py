"""gpt-oss (mixture of experts, attention sinks, alternating sliding/full layers, YaRN) from
a GGUF written as llama.cpp writes it (experts in MXFP4) and from a bf16 Hugging Face folder,
against transformers' GptOssForCausalLM on the same weights: greedy tokens identical, logits
within fp32 rounding, for a prompt three times the sliding window and for batched decode of
requests of different lengths. Tiny random models (8 experts, 2 per token): seconds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import arch_models

from e2llm_edge.device.fast_runner import contrib_supported
from e2llm_edge.device.local import LocalModel
from onnx_export.export import export_model
from onnx_export.manifest import Manifest

PROMPT = [5, 17, 42, 99, 7, 200, 31, 64, 150, 3, 88, 12]  # window 4: 3x longer
NEW = 6
CASES = ["gguf-MXFP4", "hf-bfloat16"]
VARIANTS = [("standard", "fp32"), ("contrib", "exact")]

Case = tuple[Manifest, Any]
_REFERENCE: dict[tuple[int, tuple[int, ...]], tuple[list[int], list[np.ndarray]]] = {}


def reference(ref: Any, prompt: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """transformers' greedy tokens and logits, once per model and prompt (both graphs
    compare against the same run)."""
    key = (id(ref), tuple(prompt))
    if key not in _REFERENCE:
        _REFERENCE[key] = arch_models.greedy_reference(ref, prompt, NEW)
    return _REFERENCE[key]


@pytest.fixture(scope="module", params=CASES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    """The exported model and the transformers model it was made from."""
    fmt = request.param
    tmp = tmp_path_factory.mktemp(f"gpt-oss-{fmt}")
    model = arch_models.reference_model("gpt-oss")
    kind, what = fmt.split("-", 1)
    if kind == "gguf":
        src: Path = tmp / "model.gguf"
        arch_models.write_gguf(model, "gpt-oss", src, what)
        ref: Any = model
    else:
        src = arch_models.write_hf_dir(model, tmp / "hf", what)
        ref = arch_models.load_hf_reference(src)
    manifest = export_model(src, tmp / "out", progress=False, variants=VARIANTS)
    return manifest, ref


def _skip_unsupported(variant: tuple[str, str]) -> None:
    if variant[0] == "contrib" and not contrib_supported():
        pytest.skip("this onnxruntime lacks the com.microsoft contrib operators")


def test_config_read_from_both_sources(case: Case) -> None:
    manifest, _ = case
    c = manifest.config
    assert c["architecture"] == "gpt-oss"
    assert (c["n_experts"], c["n_experts_used"]) == (8, 2)
    assert c["sliding_window"] == 4 and c["sliding_layers"] == [0, 2]
    assert c["attn_sinks"] and c["o_bias"] and c["swiglu_limit"] == 7.0
    assert c["rope_scaling"]["type"] == "yarn" and c["rope_scaling"]["truncate"] is False
    assert c["rope_scaling"]["attention_factor"] == pytest.approx(0.1 * np.log(4.0) + 1)


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_greedy_tokens_and_logits_match_transformers(case: Case, variant: tuple[str, str]) -> None:
    _skip_unsupported(variant)
    manifest, ref = case
    want, ref_logits = reference(ref, PROMPT)
    model = LocalModel(manifest.directory, variant=variant)
    steps: list[tuple[np.ndarray, float]] = []
    got = list(model.generate(PROMPT, NEW, stop_at_eos=False, logits_out=steps))
    assert got == want
    for (row, _), r in zip(steps, ref_logits, strict=True):
        assert np.abs(row - r).max() < 1e-4


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_batched_decode_of_different_lengths(case: Case, variant: tuple[str, str]) -> None:
    """Three requests (2, 7 and 12 prompt tokens: below, near and beyond the window) decode
    together in one run per step and give transformers' tokens for each."""
    _skip_unsupported(variant)
    manifest, ref = case
    prompts = [PROMPT[:2], PROMPT[3:10], PROMPT]
    model = LocalModel(manifest.directory, variant=variant)
    caches, tokens = [], []
    for p in prompts:
        cache = model.layers.new_cache(len(p) + NEW)
        logits = model.forward(p, 0, cache)
        caches.append(cache)
        tokens.append([int(logits.argmax())])
    for _ in range(NEW - 1):
        x = model.embed.run(np.asarray([[t[-1]] for t in tokens], np.int64))
        h = model.layers.run_batch(x, caches)
        logits = model.head.run(h)[:, -1]
        for t, row in zip(tokens, logits, strict=True):
            t.append(int(row.argmax()))
    for p, got in zip(prompts, tokens, strict=True):
        assert got == reference(ref, p)[0], f"{len(p)} prompt tokens"


def test_fast_graph_keeps_mxfp4_experts_quantized(case: Case) -> None:
    """From the GGUF, the contrib layers hold the MXFP4 experts as MatMulNBits 4-bit x2
    (doubled E2M1 codes split in two 4-bit parts, a scale per 32: 1.25 bytes a weight),
    named in the manifest with the bytes they take; from the HF folder, fp32 as the
    standard graph."""
    manifest, _ = case
    c = manifest.config

    def layer(graph: str, precision: str) -> Any:
        return next(s for s in manifest.by_kind("layers", graph, precision) if len(s.layers) == 1)

    fast, std = layer("contrib", "exact"), layer("standard", "fp32")
    h, inter, e = c["hidden_size"], c["intermediate_size"], c["n_experts"]
    n = e * 3 * h * inter
    biases = 4 * e * (2 * inter + h)
    if manifest.source["kind"] == "gguf":
        assert fast.weights["forms"]["MXFP4"] == "MatMulNBits 4-bit x2, block 32"
        assert fast.weights["expert_bytes"] == n * 9 // 8 + biases  # 8 bits + a shared scale /32
    else:
        assert fast.weights["expert_bytes"] == 4 * n + biases
    # the rest: attention (fp32 in both from these sources), RoPE tables inline at this size
    assert (
        abs((std.param_bytes - 4 * n - biases) - (fast.param_bytes - fast.weights["expert_bytes"]))
        < 20480
    )


def test_planner_costs_follow_active_experts_and_memory_all(case: Case) -> None:
    """The manifest's FLOPs per token count the 2 chosen experts of 8; its bytes all 8; the
    planner reads both (and the experts' bytes for decode traffic)."""
    from planner.model import ModelSpec

    manifest, _ = case
    c = manifest.config
    spec = ModelSpec.from_manifest(manifest.to_dict())
    h, inter, nh, nkv, d = (c[k] for k in ("hidden_size", "intermediate_size", "n_heads",
                                          "n_kv_heads", "head_dim"))  # fmt: skip
    attn = h * d * (2 * nh + 2 * nkv) + nh * d + 2 * nkv * d + h + nh  # with biases, sinks
    router = h * c["n_experts"] + c["n_experts"]
    expert = 3 * h * inter + 2 * inter + h
    norms = 2 * h
    assert spec.layer_flops_per_token[0] == 2 * (attn + router + norms + 2 * expert)
    assert (spec.n_experts, spec.experts_per_token) == (8, 2)
    assert spec.layer_param_bytes[0] > spec.layer_expert_bytes[0] > 0
    if manifest.source["kind"] == "gguf":  # the contrib graph's MXFP4 experts, measured
        assert spec.layer_expert_bytes[0] == 8 * (3 * h * inter * 9 // 8 + 4 * (2 * inter + h))
    full = spec.decode_weight_bytes(0, 1000)
    assert spec.decode_weight_bytes(0, 1) < full == pytest.approx(spec.layer_param_bytes[0])


def test_paper_model_is_gpt_oss_20b() -> None:
    """The simulated reproduction's model is read from gpt-oss-20b's config.json."""
    from planner.model import load_model_description
    from planner.sim.paper import paper_model

    spec = paper_model()
    assert spec == load_model_description(
        Path(__file__).parents[2] / "planner" / "data" / "paper_model_20b.yaml"
    )
    assert (spec.name, spec.n_layers, spec.hidden_size, spec.n_heads) == (
        "gpt-oss-20b",
        24,
        2880,
        64,
    )
    assert (spec.n_experts, spec.experts_per_token) == (32, 4)
    active = sum(spec.layer_flops_per_token) / 2 + spec.head_flops_per_token / 2
    assert 3.5e9 < active < 3.7e9  # the model card: 3.6B active parameters (embedding aside)
    assert 12.5e9 < spec.total_param_bytes < 14e9  # the released checkpoint: ~13 GB


def test_harmony_answer_is_the_final_channel(case: Case) -> None:
    """The GGUF's o200k-style tokenizer with harmony markers: the client sees the final
    channel only, streamed as a growing prefix; the reasoning never shows."""
    from e2llm_edge.fog.textio import ChatTokenizer, StreamDecoder, harmony_answer

    manifest, _ = case
    if manifest.source["kind"] != "gguf":
        pytest.skip("the HF folder's tokenizer has no harmony markers")
    tok = ChatTokenizer(manifest)
    assert tok.harmony
    text = (
        "<|channel|>analysis<|message|>they say hello<|end|>"
        "<|start|>assistant<|channel|>final<|message|>hello hello<|return|>"
    )
    ids = tok.encode_raw(text)
    assert tok.tokenizer.token_to_id("<|return|>") == manifest.config["eos_token_id"] == ids[-1]
    assert tok.decode(ids) == "hello hello"
    stream = StreamDecoder(tok)
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) == "hello hello"
    message = tok.tokenizer.token_to_id("<|message|>")
    last_marker = len(ids) - 1 - ids[::-1].index(message)  # the final channel's <|message|>
    assert all(d == "" for d in deltas[: last_marker + 1]) and deltas[last_marker + 1]
    assert harmony_answer("<|channel|>analysis<|message|>no answer yet") == ""
    assert harmony_answer("<|channel|>final<|message|>partial") == "partial"
