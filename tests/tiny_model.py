"""A tiny random Llama written as a real GGUF file (gguf.GGUFWriter), for fast exporter tests.

Q/K are stored permuted the way llama.cpp's converter does, and some matrices are stored
quantized (Q8_0, Q4_1) so the reader's un-permute and dequantize paths are exercised.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CFG = {
    "n_layers": 3,
    "hidden_size": 64,
    "intermediate_size": 96,
    "n_heads": 4,
    "n_kv_heads": 2,
    "head_dim": 16,
    "vocab_size": 300,
    "rope_theta": 10000.0,
    "rms_norm_eps": 1e-5,
}


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    return (
        w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = CFG
    h, f, d = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    w: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": rng.normal(0, 0.5, (c["vocab_size"], h)),
        "model.norm.weight": 1 + 0.1 * rng.normal(size=h),
    }
    for i in range(c["n_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        w[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=h)
        w[p + "self_attn.q_proj.weight"] = rng.normal(0, 0.15, (c["n_heads"] * d, h))
        w[p + "self_attn.k_proj.weight"] = rng.normal(0, 0.15, (c["n_kv_heads"] * d, h))
        w[p + "self_attn.v_proj.weight"] = rng.normal(0, 0.15, (c["n_kv_heads"] * d, h))
        w[p + "self_attn.o_proj.weight"] = rng.normal(0, 0.15, (h, c["n_heads"] * d))
        w[p + "mlp.gate_proj.weight"] = rng.normal(0, 0.15, (f, h))
        w[p + "mlp.up_proj.weight"] = rng.normal(0, 0.15, (f, h))
        w[p + "mlp.down_proj.weight"] = rng.normal(0, 0.15, (h, f))
    return {k: v.astype(np.float32) for k, v in w.items()}


def tokens() -> tuple[list[str], list[str], list[int]]:
    """A byte-level BPE vocabulary: the 256 byte symbols, a few merges, three specials."""
    from tokenizers import pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    toks = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(alphabet)]
    merges = ["h e", "l l", "he ll", "hell o"]
    toks += ["he", "ll", "hell", "hello"]
    types = [3, 3, 3] + [1] * (len(toks) - 3)
    return toks[: CFG["vocab_size"]], merges, types[: CFG["vocab_size"]]


def write_gguf(
    path: Path,
    arch: str = "llama",
    seed: int = 0,
    quantize: bool = True,
    raw: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Write the tiny model; returns the HF-layout fp32 weights the file should decode to.

    `raw` stores some tensors (by HF name) as the given arrays instead, dtype and all."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    c = CFG
    w = hf_weights(seed)
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name("tiny-llama")
    wr.add_block_count(c["n_layers"])
    wr.add_context_length(256)
    wr.add_embedding_length(c["hidden_size"])
    wr.add_feed_forward_length(c["intermediate_size"])
    wr.add_head_count(c["n_heads"])
    wr.add_head_count_kv(c["n_kv_heads"])
    wr.add_rope_freq_base(c["rope_theta"])
    wr.add_layer_norm_rms_eps(c["rms_norm_eps"])
    wr.add_vocab_size(c["vocab_size"])
    wr.add_rope_dimension_count(c["head_dim"])
    toks, merges, types = tokens()
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("smollm")
    wr.add_token_list(toks)
    wr.add_token_merges(merges)
    wr.add_token_types(types)
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
    }
    gg = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for i in range(c["n_layers"]):
        for k, v in gg.items():
            names[f"model.layers.{i}.{k}"] = f"blk.{i}.{v}"
    expected = {}
    for hf_name, arr in w.items():
        stored = arr
        if hf_name.endswith("q_proj.weight"):
            stored = permute_qk(arr, c["n_heads"])
        elif hf_name.endswith("k_proj.weight"):
            stored = permute_qk(arr, c["n_kv_heads"])
        if raw and hf_name in raw:
            wr.add_tensor(names[hf_name], raw[hf_name])
            continue
        qtype = None
        if quantize and arr.ndim == 2:
            qtype = Q.Q8_0 if "embed" in hf_name else Q.Q4_1
        if qtype is None:
            wr.add_tensor(names[hf_name], stored)
            expected[hf_name] = arr
        else:
            wr.add_tensor(names[hf_name], gguf.quants.quantize(stored, qtype), raw_dtype=qtype)
            # Blocks run along rows, so quantizing commutes with the row permutation: the file
            # must decode to the quantize-dequantize round trip of the HF-order matrix.
            expected[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return expected


def write_hf_dir(d: Path, work: Path) -> None:
    """The same model as a Hugging Face directory in ``d`` (model.safetensors, config.json,
    tokenizer.json); its tokenizer.json comes from exporting the GGUF form into ``work``."""
    import json

    from safetensors.numpy import save_file

    from onnx_export.export import export_model

    c = CFG
    d.mkdir(parents=True, exist_ok=True)
    save_file(hf_weights(), str(d / "model.safetensors"))
    (d / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "num_hidden_layers": c["n_layers"],
                "hidden_size": c["hidden_size"],
                "intermediate_size": c["intermediate_size"],
                "num_attention_heads": c["n_heads"],
                "num_key_value_heads": c["n_kv_heads"],
                "vocab_size": c["vocab_size"],
                "rope_theta": c["rope_theta"],
                "rms_norm_eps": c["rms_norm_eps"],
                "tie_word_embeddings": True,
                "max_position_embeddings": 256,
                "bos_token_id": 1,
                "eos_token_id": 2,
            }
        )
    )
    work.mkdir(parents=True, exist_ok=True)
    write_gguf(work / "t.gguf", quantize=False)
    exported = export_model(work / "t.gguf", work / "from_gguf", progress=False)
    (d / "tokenizer.json").write_bytes((exported.directory / "tokenizer.json").read_bytes())
