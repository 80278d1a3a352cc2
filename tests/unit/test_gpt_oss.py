"""gpt-oss (mixture of experts, attention sinks, alternating sliding/full layers, YaRN) from
a GGUF written as llama.cpp writes it (experts in MXFP4), from a bf16 Hugging Face folder and
from one as the released checkpoints ship it (MXFP4 `*_blocks`/`*_scales`), against
transformers' GptOssForCausalLM on the same weights: greedy tokens identical, logits within
fp32 rounding, for a prompt three times the sliding window and for batched decode of
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
from onnx_export.fast_graph import stored
from onnx_export.manifest import Manifest
from onnx_export.source import open_model

PROMPT = [5, 17, 42, 99, 7, 200, 31, 64, 150, 3, 88, 12]  # window 4: 3x longer
NEW = 6
CASES = ["gguf-MXFP4", "hf-bfloat16", "hf-MXFP4"]
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
    elif what == "MXFP4":  # the released checkpoints' form, from the same MXFP4 bytes
        arch_models.write_gguf(model, "gpt-oss", tmp / "model.gguf", what)
        src, ref = arch_models.write_hf_mxfp4(model, tmp / "model.gguf", tmp / "hf"), model
    else:
        src = arch_models.write_hf_dir(model, tmp / "hf", what)
        ref = arch_models.load_hf_reference(src)
    manifest = export_model(src, tmp / "out", progress=False, variants=VARIANTS)
    return manifest, ref


def mxfp4(manifest: Manifest) -> bool:
    """Whether the source stores the experts in MXFP4 (a GGUF, or HF `*_blocks`)."""
    w = open_model(manifest.source["path"])
    return stored(w, "model.layers.0.mlp.experts.0.gate_proj.weight") is not None


def _skip_unsupported(variant: tuple[str, str]) -> None:
    if variant[0] == "contrib" and not contrib_supported(windows=True):
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
    together in one run per step (contrib: slots of one KV pool, the sliding layers'
    window-sized, each row at its own length) and give transformers' tokens for each."""
    from e2llm_edge.device.fast_runner import load_stage

    _skip_unsupported(variant)
    manifest, ref = case
    prompts = [PROMPT[:2], PROMPT[3:10], PROMPT]
    model = LocalModel(manifest.directory, variant=variant)
    model.layers = load_stage(
        manifest, 0, manifest.config["n_layers"], variant, max_batch=3, context=32
    )
    caches, tokens = [], []
    for p in prompts:
        cache = model.layers.new_cache(len(p) + NEW)
        if variant[0] == "contrib":
            assert cache.slot is not None  # type: ignore[attr-defined]
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


def _prefill_and_decode(model: LocalModel, cache: Any, steps: int) -> list[Any]:
    """Greedy from PROMPT on `cache`: each step's logits."""
    out = [model.forward(PROMPT, 0, cache)]
    for _ in range(steps):
        out.append(model.forward([int(out[-1].argmax())], cache.length, cache))
    return out


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_sliding_layers_hold_their_window_only(
    case: Case, variant: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a prompt 3x the window and some decode steps, a sliding layer holds its last 4
    positions (on the device: a 4-row buffer in the contrib graph), a full layer all of
    them; logits equal those of the standard graph keeping every position (its cache told
    to keep all) within fp32 rounding, also with the prompt prefilled in chunks of 5."""
    from e2llm_edge.device import runner

    _skip_unsupported(variant)
    manifest, _ = case
    window, sliding = manifest.config["sliding_window"], manifest.config["sliding_layers"]
    model = LocalModel(manifest.directory, variant=variant)
    cache = model.layers.new_cache(len(PROMPT) + NEW)
    got = _prefill_and_decode(model, cache, NEW - 1)
    total = len(PROMPT) + NEW - 1
    for i in range(manifest.config["n_layers"]):
        start, k, v = cache.kv(i)
        held = window if i in sliding else total
        assert (start, k.shape[2], v.shape[2]) == (total - held, held, held), i
    if variant[0] == "contrib":
        assert {cache.keys[i].shape[2] for i in sliding} == {window}
    full_model = LocalModel(manifest.directory, variant=("standard", "fp32"))
    full = full_model.layers.new_cache(len(PROMPT) + NEW)
    full.windows.clear()  # type: ignore[attr-defined]
    want = _prefill_and_decode(full_model, full, NEW - 1)
    assert full.kv(sliding[0])[1].shape[2] == total
    for a, b in zip(got, want, strict=True):
        assert a.argmax() == b.argmax() and np.abs(a - b).max() < 1e-4
    monkeypatch.setattr(runner, "PREFILL_CHUNK", 5)  # 12 = 5 + 5 + 2, each past the window
    chunked = _prefill_and_decode(model, model.layers.new_cache(len(PROMPT) + NEW), NEW - 1)
    for a, b in zip(chunked, want, strict=True):
        assert a.argmax() == b.argmax() and np.abs(a - b).max() < 1e-4


@pytest.mark.parametrize("variant", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_kv_handoff_sends_the_window_of_sliding_layers(
    case: Case, variant: tuple[str, str]
) -> None:
    """A prompt's KV cut into messages as a PREFILL device sends it and put back together
    on a fresh cache as a DECODER device does: sliding layers send their last 4 positions
    (the bytes counted), and decoding from the handed-over cache gives transformers'
    tokens."""
    from e2llm_edge.device.kv_transfer import KVAssembler, kv_chunks
    from e2llm_edge.wire.messages import AttemptKey, RequestId

    _skip_unsupported(variant)
    manifest, ref = case
    c = manifest.config
    model = LocalModel(manifest.directory, variant=variant)
    prefill = model.layers.new_cache(len(PROMPT) + NEW)
    first = int(model.forward(PROMPT, 0, prefill).argmax())
    who, asm = AttemptKey(RequestId("r"), 0), KVAssembler()
    decode = model.layers.new_cache(len(PROMPT) + NEW)
    sent = 0
    for i in range(c["n_layers"]):
        start, k, v = prefill.kv(i)
        chunks = kv_chunks(who, i, k, v, token_start=start, target_bytes=k.nbytes // 3)
        sent += sum(ch.key.nbytes + ch.value.nbytes for ch in chunks)
        assert [asm.add(ch) for ch in chunks][-1]
        got_start, got_k, got_v = asm.take(who, i)
        assert got_start == start
        decode.load(i, got_k, got_v, got_start)
    per_token = 2 * c["n_kv_heads"] * c["head_dim"] * 4
    n_sliding = len(c["sliding_layers"])
    held = n_sliding * c["sliding_window"] + (c["n_layers"] - n_sliding) * len(PROMPT)
    assert sent == per_token * held < per_token * c["n_layers"] * len(PROMPT)
    assert decode.length == len(PROMPT)
    tokens = [first]
    for _ in range(NEW - 1):
        tokens.append(int(model.forward([tokens[-1]], decode.length, decode).argmax()))
    assert tokens == reference(ref, PROMPT)[0]


def test_default_export_is_the_contrib_graph_alone(
    case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`e2llm export` of a mixture of experts writes the contrib graph only (the standard
    one holds every expert in fp32); a source whose experts are unquantized past
    MOE_FP32_EXPERTS_MAX is refused in one line naming the size and the flag, before
    anything is written."""
    from e2llm_edge.cli import main
    from onnx_export import export

    manifest, _ = case
    src = manifest.source["path"]
    out = tmp_path / "default"
    if mxfp4(manifest):  # the experts stay quantized
        assert main(["export", src, "--out", str(out), "--quiet"]) == 0
        assert Manifest.load(out).variants() == [("contrib", "exact")]
        assert export_model(src, out, progress=False).variants() == [("contrib", "exact")]
        return
    monkeypatch.setattr(export, "MOE_FP32_EXPERTS_MAX", 1000)
    assert main(["export", src, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    c = manifest.config
    size = 4 * c["n_layers"] * c["n_experts"] * 3 * c["hidden_size"] * c["intermediate_size"]
    assert (
        err.count("\n") == 0 and f"({export.size_text(size)})" in err and "--graph contrib" in err
    )
    assert not out.exists()
    assert main(["export", src, "--out", str(out), "--quiet", "--graph", "contrib"]) == 0


def test_hf_mxfp4_dequantizes_as_transformers_and_the_gguf(case: Case) -> None:
    """The HF MXFP4 experts read back bit for bit as transformers' dequantization of the
    same blocks and scales (`convert_moe_packed_tensors`) and as the GGUF holding the same
    MXFP4 bytes."""
    import torch
    from safetensors.torch import load_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    manifest, _ = case
    if manifest.source["kind"] != "hf" or not mxfp4(manifest):
        pytest.skip("HF MXFP4 safetensors only")
    src = Path(manifest.source["path"])
    hf, gg = open_model(src), open_model(src.parent / "model.gguf")
    st = load_file(src / "model.safetensors")
    for i in range(manifest.config["n_layers"]):
        p = f"model.layers.{i}.mlp.experts."
        want = {  # (E, in, out) as transformers runs them
            proj: convert_moe_packed_tensors(
                st[f"{p}{proj}_blocks"], st[f"{p}{proj}_scales"], dtype=torch.float32
            ).numpy()
            for proj in ("gate_up_proj", "down_proj")
        }
        for e in range(manifest.config["n_experts"]):
            for n, ref in (
                ("gate", want["gate_up_proj"][e][:, 0::2]),
                ("up", want["gate_up_proj"][e][:, 1::2]),
                ("down", want["down_proj"][e]),
            ):
                got = hf.get(f"{p}{e}.{n}_proj.weight")
                assert np.array_equal(got, ref.T), (i, e, n)
                assert np.array_equal(got, gg.get(f"{p}{e}.{n}_proj.weight")), (i, e, n)
                a, b = hf.raw(f"{p}{e}.{n}_proj.weight"), gg.raw(f"{p}{e}.{n}_proj.weight")
                assert (a.qtype, a.shape) == (b.qtype, b.shape) and np.array_equal(a.data, b.data)


def test_profile_feeds_the_layers_real_text(case: Case) -> None:
    """The manifest holds the profile text in the model's own tokenizer; the device profile
    feeds its embeddings to the layers (a token each request each decode step), so the
    router picks experts as on real inputs."""
    from tokenizers import Tokenizer

    from e2llm_edge.device.profile import measure_profile, profile_problem
    from onnx_export.tokenizer import PROFILE_TEXT

    manifest, _ = case
    if manifest.source["kind"] != "gguf":
        pytest.skip("one source is enough")
    tok = Tokenizer.from_file(str(manifest.directory / "tokenizer.json"))
    assert manifest.profile_ids == tok.encode(PROFILE_TEXT, add_special_tokens=False).ids
    assert len(manifest.profile_ids) > 300
    variant = ("contrib", "exact") if contrib_supported(windows=True) else ("standard", "fp32")
    prof = measure_profile(manifest, threads=1, reps=1, variant=variant)
    assert profile_problem(prof) is None and prof["measured"]["inputs"] == "text"


def test_fast_graph_keeps_mxfp4_experts_quantized(case: Case) -> None:
    """From MXFP4 (a GGUF, or the HF `*_blocks`/`*_scales`), the contrib layers hold the
    experts as MatMulNBits 4-bit x2 (doubled E2M1 codes split in two 4-bit parts, a scale
    per 32: 1.25 bytes a weight), named in the manifest with the bytes they take; from a
    bf16 HF folder, fp32 as the standard graph."""
    manifest, _ = case
    c = manifest.config

    def layer(graph: str, precision: str) -> Any:
        return next(s for s in manifest.by_kind("layers", graph, precision) if len(s.layers) == 1)

    fast, std = layer("contrib", "exact"), layer("standard", "fp32")
    h, inter, e = c["hidden_size"], c["intermediate_size"], c["n_experts"]
    n = e * 3 * h * inter
    biases = 4 * e * (2 * inter + h)
    if mxfp4(manifest):
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
    assert spec.layer_kv_window == (4, 0, 4)  # sliding layers keep 4 positions
    assert spec.layer_param_bytes[0] > spec.layer_expert_bytes[0] > 0
    if mxfp4(manifest):  # the contrib graph's MXFP4 experts, measured
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
