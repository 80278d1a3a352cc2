"""Tiny random models of every supported architecture, built with transformers (the
reference) and written the two ways people ship them: a GGUF the way llama.cpp's converter
writes it (gguf.GGUFWriter: Q/K rows permuted for the llama family, Gemma norms stored as
1 + w, Phi-3's fused projections, Llama 3's `rope_freqs`), and a Hugging Face folder of
fp16/bf16 safetensors. Needs the `reference` extra (torch, transformers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tiny_model

from onnx_export.rope import llama3_divisors
from onnx_export.source import TokenizerData
from onnx_export.tokenizer import build_tokenizer_json

VOCAB = 300
BASE: dict[str, Any] = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@dataclass(frozen=True)
class Arch:
    """One architecture: its transformers class, config and how llama.cpp writes it."""

    hf_class: str
    config: dict[str, Any]
    gguf_arch: str | None  # None: llama.cpp has no GGUF of its own for it
    gguf_keys: dict[str, Any] = field(default_factory=dict)


ARCHS: dict[str, Arch] = {
    "llama": Arch("LlamaForCausalLM", {}, "llama"),
    "llama3": Arch(
        "LlamaForCausalLM", {"rope_scaling": LLAMA3_SCALING, "tie_word_embeddings": True}, "llama"
    ),
    "mistral": Arch("MistralForCausalLM", {"sliding_window": 4}, None),
    "qwen2": Arch("Qwen2ForCausalLM", {"tie_word_embeddings": True}, "qwen2"),
    "qwen3": Arch("Qwen3ForCausalLM", {"head_dim": 32, "tie_word_embeddings": True}, "qwen3"),
    "phi3": Arch(
        "Phi3ForCausalLM",
        # head 32, rotating 16: onnxruntime's rotary wants multiples of 16
        {
            "hidden_size": 128,
            "head_dim": 32,
            "partial_rotary_factor": 0.5,
            "original_max_position_embeddings": 256,
        },
        "phi3",
    ),
    "gemma2": Arch(
        "Gemma2ForCausalLM",
        {
            "sliding_window": 4,
            "query_pre_attn_scalar": 16,
            "attn_logit_softcapping": 1.5,
            "final_logit_softcapping": 2.0,
            "tie_word_embeddings": True,
        },
        "gemma2",
        {"sliding_window": 4, "attn_logit_softcapping": 1.5, "final_logit_softcapping": 2.0},
    ),
    "gemma3": Arch(
        "Gemma3ForCausalLM",
        {
            "sliding_window": 4,
            "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
            "rope_theta": 100000.0,
            "rope_local_base_freq": 1000.0,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
            "tie_word_embeddings": True,
        },
        "gemma3",
        {"sliding_window": 4, "sliding_window_pattern": 3, "rope_freq_base_swa": 1000.0},
    ),
    # 8 experts, 2 per token; alternating 4-token sliding and full layers (prompts longer than
    # the window), YaRN (truncate false, as gpt-oss ships it), attention sinks.
    "gpt-oss": Arch(
        "GptOssForCausalLM",
        {
            "intermediate_size": 32,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
            "sliding_window": 4,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
            },
        },
        "gpt-oss",
    ),
}


def reference_model(name: str, seed: int = 0, layers: int | None = None) -> Any:
    """The transformers model (fp32, eager attention) with weights drawn large enough that
    greedy choices are clear."""
    import torch
    import transformers

    spec = ARCHS[name]
    cfg_kwargs = {**BASE, **spec.config}
    if layers is not None:
        cfg_kwargs["num_hidden_layers"] = layers
    if "rope_parameters" in spec.config:
        cfg_kwargs.pop("rope_theta")
    if name == "gemma3":
        cfg = transformers.Gemma3TextConfig(**cfg_kwargs)
    else:
        cls = getattr(transformers, spec.hf_class.replace("ForCausalLM", "Config"))
        cfg = cls(**cfg_kwargs)
    model = getattr(transformers, spec.hf_class)(cfg).eval()
    model.config._attn_implementation = "eager"
    gen = torch.Generator().manual_seed(seed)
    gemma = name.startswith("gemma")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn(p.shape, generator=gen))
            elif pname.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * (0.15 if gemma else 1.0))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
    return model


def greedy_reference(model: Any, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """n greedy tokens and each step's last logits, from full forward passes (no cache)."""
    import torch

    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            row = model(torch.tensor([ids])).logits[0, -1].double().numpy()
            logits.append(row)
            ids.append(int(row.argmax()))
    return ids[len(prompt) :], logits


HARMONY_SPECIALS = ["<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|return|>", "<|call|>"]


def _tokenizer(harmony: bool = False) -> TokenizerData:
    """The tiny byte-level vocabulary; `harmony`: gpt-oss's o200k pre-tokenizer and its
    harmony markers as control tokens (ids 3-8; <|return|> the EOS)."""
    toks, merges, types = tiny_model.tokens()
    if harmony:
        toks = [*toks[:3], *HARMONY_SPECIALS, *toks[3:]]
        types = [3] * (3 + len(HARMONY_SPECIALS)) + types[3:]
    return TokenizerData(
        chat_template=None,
        bos_token=toks[1],
        eos_token=toks[2],
        tokens=toks,
        token_types=types,
        merges=merges,
        pre="gpt-4o" if harmony else "qwen2",
    )


def write_hf_dir(model: Any, out: Path, dtype: str) -> Path:
    """A Hugging Face folder of `dtype` ("float16"/"bfloat16") safetensors plus tokenizer."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    model.to(torch.float32)
    (out / "tokenizer.json").write_text(build_tokenizer_json(_tokenizer()))
    (out / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>"}))
    return out


def write_hf_mxfp4(model: Any, gguf_path: Path, out: Path) -> Path:
    """gpt-oss as the released checkpoints store it: each layer's experts as MXFP4
    `gate_up_proj_blocks`/`_scales` (gate and up rows interleaved) and `down_proj_blocks`/
    `_scales`, the bytes of the MXFP4 GGUF `gguf_path` written from `model` (`write_gguf`,
    which left in `model` what those bytes decode to), re-laid as transformers reads them
    (a block's codes interleaved in the nibbles of its 16 bytes, where GGUF puts codes 0-15
    in the low nibbles and 16-31 in the high); everything else fp32."""
    import gguf
    from safetensors.numpy import load_file, save_file

    write_hf_dir(model, out, "float32")
    st = out / "model.safetensors"
    tensors = load_file(st)
    stored = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(gguf_path)).tensors}

    def hf(name: str) -> tuple[np.ndarray, np.ndarray]:  # (E, out, n*17) -> blocks, scales
        b = stored[name].reshape(*stored[name].shape[:2], -1, 17)
        qs = b[..., 1:]
        codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (E, out, n, 32)
        return codes[..., 0::2] | (codes[..., 1::2] << 4), np.ascontiguousarray(b[..., 0])

    for i in range(model.config.num_hidden_layers):
        p, g = f"model.layers.{i}.mlp.experts.", f"blk.{i}.ffn_"
        del tensors[p + "gate_up_proj"], tensors[p + "down_proj"]
        (gb, gs), (ub, us) = hf(g + "gate_exps.weight"), hf(g + "up_exps.weight")
        e, rows = gb.shape[:2]
        tensors[p + "gate_up_proj_blocks"] = np.stack([gb, ub], 2).reshape(e, 2 * rows, -1, 16)
        tensors[p + "gate_up_proj_scales"] = np.stack([gs, us], 2).reshape(e, 2 * rows, -1)
        tensors[p + "down_proj_blocks"], tensors[p + "down_proj_scales"] = hf(
            g + "down_exps.weight"
        )
    save_file(tensors, st)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4"}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def load_hf_reference(out: Path) -> Any:
    """The folder read back by transformers in fp32 (an exact upcast of its 16-bit weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, attn_implementation="eager"
    ).eval()


_GGUF_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf: str, sandwich: bool) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    if hf == "lm_head.weight":
        return "output.weight"
    _, _, idx, rest = hf.split(".", 3)
    stem, kind = rest.rsplit(".", 1)
    names = dict(_GGUF_NAMES)
    if sandwich:
        names.update(
            post_attention_layernorm="post_attention_norm",
            pre_feedforward_layernorm="ffn_norm",
            post_feedforward_layernorm="post_ffw_norm",
        )
    else:
        names["post_attention_layernorm"] = "ffn_norm"
    return f"blk.{idx}.{names[stem]}.{kind}"


def write_gguf(model: Any, name: str, path: Path, qtype: str) -> None:
    if name == "gpt-oss":
        write_gguf_gpt_oss(model, path, qtype)
        return
    _write_gguf(model, name, path, qtype)


def _gguf_tokenizer(wr: Any, harmony: bool = False) -> None:
    tok = _tokenizer(harmony)
    wr.add_tokenizer_model("gpt2")
    assert tok.pre is not None
    wr.add_tokenizer_pre(tok.pre)
    wr.add_token_list(tok.tokens)
    wr.add_token_merges(tok.merges)
    wr.add_token_types(tok.token_types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(tok.tokens.index("<|return|>") if harmony else 2)


def write_gguf_gpt_oss(model: Any, path: Path, expert_qtype: str) -> None:
    """gpt-oss as llama.cpp's converter writes it: experts as 3-D tensors (expert, out, in)
    with gate and up de-interleaved, stored as `expert_qtype` (MXFP4 in the released
    GGUFs), everything else F32; router `ffn_gate_inp`, `attn_sinks`, `post_attention_norm`,
    YaRN keys. The reference is then loaded with what the file decodes to."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType as Q

    c = model.config
    rope = c.rope_parameters
    wr = gguf.GGUFWriter(str(path), "gpt-oss")
    wr.add_name("tiny-gpt-oss")
    wr.add_block_count(c.num_hidden_layers)
    wr.add_context_length(c.max_position_embeddings)
    wr.add_embedding_length(c.hidden_size)
    wr.add_feed_forward_length(c.intermediate_size)
    wr.add_expert_feed_forward_length(c.intermediate_size)
    wr.add_expert_count(c.num_local_experts)
    wr.add_expert_used_count(c.num_experts_per_tok)
    wr.add_head_count(c.num_attention_heads)
    wr.add_head_count_kv(c.num_key_value_heads)
    wr.add_key_length(c.head_dim)
    wr.add_value_length(c.head_dim)
    wr.add_layer_norm_rms_eps(c.rms_norm_eps)
    wr.add_sliding_window(c.sliding_window)
    wr.add_vocab_size(VOCAB)
    wr.add_rope_freq_base(rope["rope_theta"])
    wr.add_rope_dimension_count(c.head_dim)
    wr.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    wr.add_rope_scaling_factor(rope["factor"])
    wr.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    _gguf_tokenizer(wr, harmony=True)
    qt = Q[expert_qtype]
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "post_attention_norm.weight",
        "self_attn.sinks": "attn_sinks.weight",
        "mlp.router.weight": "ffn_gate_inp.weight",
        "mlp.router.bias": "ffn_gate_inp.bias",
        **{f"self_attn.{n}_proj.{k}": f"attn_{g}.{k}" for n, g in
           (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for k in ("weight", "bias")},
    }  # fmt: skip
    decoded = dict(state)
    for hf_name, arr in state.items():
        if hf_name in names:
            wr.add_tensor(names[hf_name], arr)
            continue
        _, _, idx, rest = hf_name.split(".", 3)
        if rest in per_layer:
            wr.add_tensor(f"blk.{idx}.{per_layer[rest]}", arr)
            continue
        stem = f"blk.{idx}.ffn_"
        if rest == "mlp.experts.gate_up_proj":  # (E, H, 2I), interleaved
            mats = {"gate": arr[..., ::2], "up": arr[..., 1::2]}
            back = np.empty_like(arr)
            for j, (n, m) in enumerate(mats.items()):
                out_in = np.ascontiguousarray(m.transpose(0, 2, 1))  # (E, I, H)
                q = gguf.quants.quantize(out_in, qt)
                wr.add_tensor(f"{stem}{n}_exps.weight", q, raw_dtype=qt)
                back[..., j::2] = gguf.quants.dequantize(q, qt).transpose(0, 2, 1)
            decoded[hf_name] = back
        elif rest == "mlp.experts.down_proj":  # (E, I, H)
            out_in = np.ascontiguousarray(arr.transpose(0, 2, 1))  # (E, H, I)
            q = gguf.quants.quantize(out_in, qt)
            wr.add_tensor(f"{stem}down_exps.weight", q, raw_dtype=qt)
            decoded[hf_name] = gguf.quants.dequantize(q, qt).transpose(0, 2, 1)
        elif rest == "mlp.experts.gate_up_proj_bias":
            wr.add_tensor(f"{stem}gate_exps.bias", np.ascontiguousarray(arr[:, ::2]))
            wr.add_tensor(f"{stem}up_exps.bias", np.ascontiguousarray(arr[:, 1::2]))
        elif rest == "mlp.experts.down_proj_bias":
            wr.add_tensor(f"{stem}down_exps.bias", arr)
        else:
            raise AssertionError(f"unmapped {hf_name}")
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with torch.no_grad():
        for hf_name, p in model.state_dict().items():
            p.copy_(torch.from_numpy(np.ascontiguousarray(decoded[hf_name])))


def _write_gguf(model: Any, name: str, path: Path, qtype: str) -> None:
    """Write `model` as llama.cpp's converter would, its matrices stored as `qtype`, and load
    into `model` the weights the file decodes to (the reference then runs what was written)."""
    import gguf
    import torch
    from gguf import GGMLQuantizationType as Q

    spec = ARCHS[name]
    assert spec.gguf_arch is not None
    arch = spec.gguf_arch
    c = model.config
    gemma = arch.startswith("gemma")
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name(f"tiny-{name}")
    wr.add_block_count(c.num_hidden_layers)
    wr.add_context_length(c.max_position_embeddings)
    wr.add_embedding_length(c.hidden_size)
    wr.add_feed_forward_length(c.intermediate_size)
    wr.add_head_count(c.num_attention_heads)
    wr.add_head_count_kv(c.num_key_value_heads)
    wr.add_key_length(c.head_dim)
    wr.add_value_length(c.head_dim)
    wr.add_layer_norm_rms_eps(c.rms_norm_eps)
    wr.add_vocab_size(VOCAB)
    rope = c.rope_parameters.get("full_attention", c.rope_parameters)
    wr.add_rope_freq_base(rope["rope_theta"])
    rot = int(c.head_dim * rope.get("partial_rotary_factor", 1.0))
    wr.add_rope_dimension_count(rot)
    if rope.get("rope_type") == "linear":
        wr.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        wr.add_rope_scaling_factor(rope["factor"])
    for key, value in spec.gguf_keys.items():
        getattr(wr, f"add_{key}")(value)
    tok = _tokenizer()
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre(tok.pre)
    wr.add_token_list(tok.tokens)
    wr.add_token_merges(tok.merges)
    wr.add_token_types(tok.token_types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    qt = Q[qtype]
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    decoded: dict[str, np.ndarray] = {}
    for hf_name, arr in state.items():
        if hf_name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        stored = arr
        if gemma and hf_name.endswith("norm.weight"):
            stored = arr + np.float32(1.0)
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = c.num_attention_heads if "q_proj" in hf_name else c.num_key_value_heads
            stored = tiny_model.permute_qk(arr, heads)
        out_name = _gguf_name(hf_name, gemma)
        if arr.ndim == 2 and qt not in (Q.F32, Q.F16):
            wr.add_tensor(out_name, gguf.quants.quantize(stored, qt), raw_dtype=qt)
            # quantizing rows commutes with permuting them: decode the HF-order matrix
            decoded[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt)
        elif arr.ndim == 2 and qt == Q.F16:
            wr.add_tensor(out_name, stored.astype(np.float16))
            decoded[hf_name] = arr.astype(np.float16).astype(np.float32)
        else:
            wr.add_tensor(out_name, stored)
            decoded[hf_name] = (stored - np.float32(1.0)) if stored is not arr and gemma else arr
    if rope.get("rope_type") == "llama3":
        factors = llama3_divisors(rope["rope_theta"], rot, rope).astype(np.float32)
        wr.add_tensor("rope_freqs.weight", factors)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with torch.no_grad():
        for hf_name, p in model.state_dict().items():
            src = decoded.get(hf_name, decoded.get("model.embed_tokens.weight"))
            p.copy_(torch.from_numpy(np.ascontiguousarray(src)))
