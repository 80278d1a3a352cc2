"""Tiny models whose matrices are stored in any GGUF type, K-quants included.

gguf-py quantizes only Q4_0..Q8_0; K-quant and IQ4 blocks here are random bytes with fp16
scales set so the weights have a realistic spread (std ~0.1). Any bit pattern is a valid
block, and a model is defined by its blocks: the reference (numpy or transformers) reads
the same file through gguf's dequantizer, so what is tested is the exporter's handling of
each type, not a quantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, quants
from gguf.constants import GGML_QUANT_SIZES

SCALE_FIELDS = {  # byte offsets of a block's fp16 scale and minimum (None: no minimum)
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
    "IQ3_S": (0, None),  # no decoder in onnx_export.quant: re-encoded as 8-bit codes
}


MEAN_CODE = {  # the block minimum (x d) that centres random codes: m = -mean(d q)
    "Q4_1": -7.5,
    "Q5_1": -15.5,
    "Q2_K": 1.5,  # K-quants subtract dmin * m (m ~ 7.5 or 31.5): mean(sc q) / mean(m)
    "Q4_K": 7.5,
    "Q5_K": 15.5,
}


def random_blocks(
    qtype: str, rows: int, cols: int, rng: np.random.Generator, std: float | None = None
) -> np.ndarray:
    """(rows, bytes per row) uint8: random blocks of `qtype`; with `std`, scales chosen so
    the dequantized matrix has about that standard deviation (and mean about 0)."""
    elems, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    blocks = rng.integers(0, 256, (rows * cols // elems, size), dtype=np.uint8)
    scale_at, min_at = SCALE_FIELDS[qtype]

    def put(d: np.ndarray) -> None:
        blocks[:, scale_at : scale_at + 2] = d.astype(np.float16).view(np.uint8).reshape(-1, 2)
        if min_at is not None:
            m = (d * MEAN_CODE[qtype]).astype(np.float16)
            blocks[:, min_at : min_at + 2] = m.view(np.uint8).reshape(-1, 2)

    d = rng.uniform(0.5, 1.5, len(blocks))
    put(d)
    if std is not None:
        values = quants.dequantize(blocks, GGMLQuantizationType[qtype])
        put(d * std / max(float(values.std()), 1e-12))
    return blocks.reshape(rows, -1)


def dequantize(qtype: str, data: np.ndarray, cols: int) -> np.ndarray:
    return quants.dequantize(data, GGMLQuantizationType[qtype]).reshape(-1, cols)


ROLE_TYPES = {  # a mix like llama.cpp's Q4_K_M with every other type somewhere
    "attn_q": "Q4_K",
    "attn_k": "Q5_0",
    "attn_v": "Q6_K",
    "attn_output": "Q5_K",
    "ffn_gate": "Q2_K",
    "ffn_up": "Q3_K",
    "ffn_down": "Q4_1",
}
Q4_K_M = {  # llama.cpp's Q4_K_M mix on rows of 256: v and down in Q6_K
    "attn_q": "Q4_K",
    "attn_k": "Q4_K",
    "attn_v": "Q6_K",
    "attn_output": "Q4_K",
    "ffn_gate": "Q4_K",
    "ffn_up": "Q4_K",
    "ffn_down": "Q6_K",
}
LAYER_VARIANTS = [  # layer i uses these instead, so every type is in some matrix
    {},
    {"attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q5_1", "ffn_down": "IQ4_NL"},
    {
        "attn_q": "IQ4_XS",
        "attn_k": "IQ3_S",
        "attn_v": "Q4_K",
        "ffn_gate": "Q6_K",
        "ffn_down": "Q4_K",
    },
]


def write_quant_gguf(
    path: Path,
    arch: str = "llama",
    n_layers: int = 3,
    hidden: int = 256,
    intermediate: int = 512,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab: int = 300,
    embed_type: str = "Q6_K",
    head_type: str = "Q8_0",
    seed: int = 0,
    roles: dict[str, str] | None = None,
    variants: list[dict[str, str]] | None = None,
) -> dict[str, np.ndarray]:
    """Write the model; returns its HF-layout weights as gguf dequantizes them. Layer i
    stores its matrices as `roles` (default `ROLE_TYPES`) updated by `variants[i % n]`.

    Q/K rows are stored permuted for the llama family (as llama.cpp's converter does);
    blocks run along rows, so the HF-order matrix is the row permutation of the stored one.
    """
    import gguf
    import tiny_model

    rng = np.random.default_rng(seed)
    d = hidden // n_heads
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_name(f"tiny-{arch}-kquants")
    wr.add_block_count(n_layers)
    wr.add_context_length(2048)  # agents profile prefills of up to 1024 tokens
    wr.add_embedding_length(hidden)
    wr.add_feed_forward_length(intermediate)
    wr.add_head_count(n_heads)
    wr.add_head_count_kv(n_kv_heads)
    wr.add_rope_freq_base(10000.0)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_vocab_size(vocab)
    wr.add_rope_dimension_count(d)
    toks, merges, types = tiny_model.tokens()
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("smollm")
    wr.add_token_list(toks[:vocab])
    wr.add_token_merges(merges)
    wr.add_token_types(types[:vocab])
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    wr.add_chat_template(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
    )
    permuted = arch in ("llama", "mistral")
    expected: dict[str, np.ndarray] = {}

    def quantized(gg: str, hf: str, qtype: str, rows: int, cols: int, heads: int = 0) -> None:
        data = random_blocks(qtype, rows, cols, rng, std=0.5 if "embed" in hf else 0.08)
        w = dequantize(qtype, data, cols)
        if heads and permuted:  # the file holds llama.cpp's order; HF's is its inverse
            w = _unpermute(w, heads)
        wr.add_tensor(gg, data, raw_shape=data.shape, raw_dtype=GGMLQuantizationType[qtype])
        expected[hf] = w.astype(np.float32)

    def dense(gg: str, hf: str, arr: np.ndarray) -> None:
        wr.add_tensor(gg, arr.astype(np.float32))
        expected[hf] = arr.astype(np.float32)

    quantized("token_embd.weight", "model.embed_tokens.weight", embed_type, vocab, hidden)
    quantized("output.weight", "lm_head.weight", head_type, vocab, hidden)
    dense("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.standard_normal(hidden))
    shapes = {
        "attn_q": ("self_attn.q_proj", n_heads * d, hidden, n_heads),
        "attn_k": ("self_attn.k_proj", n_kv_heads * d, hidden, n_kv_heads),
        "attn_v": ("self_attn.v_proj", n_kv_heads * d, hidden, 0),
        "attn_output": ("self_attn.o_proj", hidden, n_heads * d, 0),
        "ffn_gate": ("mlp.gate_proj", intermediate, hidden, 0),
        "ffn_up": ("mlp.up_proj", intermediate, hidden, 0),
        "ffn_down": ("mlp.down_proj", hidden, intermediate, 0),
    }
    for i in range(n_layers):
        p = f"model.layers.{i}."
        layer_variants = variants or LAYER_VARIANTS
        types = {**(roles or ROLE_TYPES), **layer_variants[i % len(layer_variants)]}
        dense(
            f"blk.{i}.attn_norm.weight",
            p + "input_layernorm.weight",
            1 + 0.1 * rng.standard_normal(hidden),
        )
        dense(
            f"blk.{i}.ffn_norm.weight",
            p + "post_attention_layernorm.weight",
            1 + 0.1 * rng.standard_normal(hidden),
        )
        for role, (hf, rows, cols, heads) in shapes.items():
            quantized(f"blk.{i}.{role}.weight", f"{p}{hf}.weight", types[role], rows, cols, heads)
        if arch == "qwen2":
            for role, (hf, rows, _, _) in shapes.items():
                if role in ("attn_q", "attn_k", "attn_v"):
                    dense(f"blk.{i}.{role}.bias", f"{p}{hf}.bias", 0.1 * rng.standard_normal(rows))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return expected


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)
