"""Model cost figures: bytes and FLOPs per layer, KV and activation bytes per token.

Read from the exporter's manifest (`ModelSpec.from_manifest`) or computed from a
description of the architecture (`ModelSpec.from_description`, `load_model_description`)
for models not exported here, such as the paper's 24-layer ~20B model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from planner.errors import ModelSpecError, yaml_problem


@dataclass(frozen=True)
class ModelSpec:
    """What the planner needs to know about a decoder-only transformer."""

    name: str
    """Human-readable name."""
    n_layers: int
    """Number of decoder layers."""
    hidden_size: int
    """Hidden (model) dimension."""
    n_heads: int
    """Attention (query) heads."""
    head_dim: int
    """Dimension per head."""
    layer_param_bytes: tuple[float, ...]
    """Weight bytes held by each layer."""
    embed_param_bytes: float
    """Weight bytes of the embedding."""
    head_param_bytes: float
    """Weight bytes of the head (final norm + lm_head)."""
    kv_bytes_per_token_per_layer: float
    """KV-cache bytes one token adds to one layer."""
    activation_bytes_per_token: float
    """Bytes of the hidden state of one token (what crosses a stage boundary)."""
    layer_flops_per_token: tuple[float, ...]
    """Matmul FLOPs per token per layer (excluding attention over the context)."""
    head_flops_per_token: float
    """FLOPs of the head for one position."""
    tie_word_embeddings: bool = False
    """Embedding and head share one weight: a device holding both pays the bytes once."""
    n_experts: int = 1
    """Experts per MoE layer (1 for a dense model)."""
    experts_per_token: int = 1
    """Experts each token is routed to."""
    layer_expert_bytes: tuple[float, ...] = ()
    """Bytes of all experts of each layer (empty for a dense model)."""
    layer_kv_window: tuple[int, ...] = ()
    """Positions each layer's KV keeps per request: its sliding window, 0 for a layer that
    attends to the whole context (empty: every layer does)."""

    def __post_init__(self) -> None:
        if self.n_layers < 1:
            raise ModelSpecError(f"{self.name}: n_layers must be >= 1, got {self.n_layers}")
        for field_name in ("layer_param_bytes", "layer_flops_per_token"):
            if len(getattr(self, field_name)) != self.n_layers:
                raise ModelSpecError(
                    f"{self.name}: {field_name} must have n_layers={self.n_layers} entries, "
                    f"got {len(getattr(self, field_name))}"
                )
        for field_name in ("layer_expert_bytes", "layer_kv_window"):
            if getattr(self, field_name) and len(getattr(self, field_name)) != self.n_layers:
                raise ModelSpecError(
                    f"{self.name}: {field_name} must have n_layers={self.n_layers} entries"
                )

    def kv_positions(self, layer: int, context: float) -> float:
        """Positions `layer` holds (and attends over) for one request of `context` tokens:
        all of them, or a sliding layer's last window of them."""
        window = self.layer_kv_window[layer] if self.layer_kv_window else 0
        return min(context, float(window)) if window > 0 else context

    def request_kv_bytes(self, context: float, start: int = 0, end: int | None = None) -> float:
        """KV bytes one request of `context` tokens holds in layers [start, end) (what a
        PREFILL replica hands over for a prompt of that length)."""
        end = self.n_layers if end is None else end
        return self.kv_bytes_per_token_per_layer * sum(
            self.kv_positions(i, context) for i in range(start, end)
        )

    def layer_kv_bytes_per_token(self, context: float) -> tuple[float, ...]:
        """Each layer's KV bytes per token of requests of `context` tokens: the full
        figure, or a sliding layer's share min(context, window) / context of it."""
        c = max(context, 1.0)
        kv = self.kv_bytes_per_token_per_layer
        return tuple(kv * self.kv_positions(i, c) / c for i in range(self.n_layers))

    @property
    def total_param_bytes(self) -> float:
        """Bytes of all weights (a tied embedding counted once)."""
        return sum(self.layer_param_bytes) + self.edge_bytes(embed=True, head=True)

    def edge_bytes(self, *, embed: bool, head: bool) -> float:
        """Weight bytes of the embedding and/or head on one device (tied: paid once)."""
        if embed and head and self.tie_word_embeddings:
            return max(self.embed_param_bytes, self.head_param_bytes)
        return (self.embed_param_bytes if embed else 0.0) + (self.head_param_bytes if head else 0.0)

    def decode_weight_bytes(self, layer: int, batch: float) -> float:
        """Weight bytes one decode step of `batch` tokens reads in `layer`.

        Dense: all of them. MoE: the non-expert part plus the experts the batch touches,
        expected fraction 1 - (1 - k/E)^batch under uniform routing.
        """
        total = self.layer_param_bytes[layer]
        if not self.layer_expert_bytes or self.n_experts <= 1:
            return total
        experts = self.layer_expert_bytes[layer]
        frac = 1.0 - (1.0 - self.experts_per_token / self.n_experts) ** batch
        return total - experts + experts * frac

    def attention_flops_per_token(self, context: float) -> float:
        """FLOPs per token per layer for attention over `context` earlier tokens."""
        return 4.0 * self.n_heads * self.head_dim * context

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> ModelSpec:
        """Build from the exporter's manifest (its `config` and `cost` sections)."""
        name = str(manifest.get("name") or manifest.get("model") or "manifest")
        config = _section(manifest, "config", name)
        cost = _section(manifest, "cost", name)
        n_layers = _int(config, "n_layers", f"{name}: config")
        return cls(
            name=name,
            n_layers=n_layers,
            hidden_size=_int(config, "hidden_size", f"{name}: config"),
            n_heads=_int(config, "n_heads", f"{name}: config"),
            head_dim=_int(config, "head_dim", f"{name}: config"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            layer_param_bytes=_list(cost, "layer_param_bytes", f"{name}: cost"),
            embed_param_bytes=_num(cost, "embed_param_bytes", f"{name}: cost"),
            head_param_bytes=_num(cost, "head_param_bytes", f"{name}: cost"),
            kv_bytes_per_token_per_layer=_num(
                cost, "kv_bytes_per_token_per_layer", f"{name}: cost"
            ),
            activation_bytes_per_token=_num(cost, "activation_bytes_per_token", f"{name}: cost"),
            layer_flops_per_token=_list(cost, "layer_flops_per_token", f"{name}: cost"),
            head_flops_per_token=_num(cost, "head_flops_per_token", f"{name}: cost"),
            # mixture of experts (gpt-oss manifests): FLOPs already follow the active
            # experts; these let decode traffic follow the experts a batch touches
            n_experts=_int(cost, "n_experts", f"{name}: cost") if "n_experts" in cost else 1,
            experts_per_token=(
                _int(cost, "experts_per_token", f"{name}: cost") if "n_experts" in cost else 1
            ),
            layer_expert_bytes=(
                _list(cost, "layer_expert_bytes", f"{name}: cost") if "n_experts" in cost else ()
            ),
            layer_kv_window=_windows(
                n_layers, config.get("sliding_window"), config.get("sliding_layers"), name
            ),
        )

    @classmethod
    def from_description(
        cls,
        *,
        n_layers: int,
        hidden_size: int,
        intermediate_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        vocab_size: int,
        tie_word_embeddings: bool = False,
        n_experts: int = 1,
        experts_per_token: int = 1,
        bytes_per_param: float = 2.0,
        expert_bytes_per_param: float | None = None,
        kv_bytes_per_element: float = 2.0,
        activation_bytes_per_element: float = 2.0,
        sliding_window: int | None = None,
        sliding_layers: list[int] | None = None,
        name: str = "described",
    ) -> ModelSpec:
        """Estimate costs of a Llama-style (optionally MoE) decoder from its dimensions.

        Attention: q, k, v, o projections. MLP: gated (3 matrices of hidden x
        intermediate), `n_experts` of them per layer with a router when MoE.
        FLOPs are 2 per active parameter. Norm weights are ignored (< 0.1%). Layers in
        `sliding_layers` keep the last `sliding_window` positions of a request's KV.
        """
        args = {
            "n_layers": n_layers,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "n_heads": n_heads,
            "n_kv_heads": n_kv_heads,
            "head_dim": head_dim,
            "vocab_size": vocab_size,
            "n_experts": n_experts,
            "experts_per_token": experts_per_token,
        }
        for key, value in args.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelSpecError(f"{name}: {key} must be a positive integer, got {value!r}")
        if experts_per_token > n_experts:
            raise ModelSpecError(
                f"{name}: experts_per_token must be <= n_experts={n_experts}, "
                f"got {experts_per_token}"
            )
        ebpp = bytes_per_param if expert_bytes_per_param is None else expert_bytes_per_param
        attn = hidden_size * head_dim * (2 * n_heads + 2 * n_kv_heads)
        expert = 3 * hidden_size * intermediate_size
        router = hidden_size * n_experts if n_experts > 1 else 0
        moe = n_experts > 1
        experts_bytes = expert * n_experts * (ebpp if moe else bytes_per_param)
        layer_bytes = (attn + router) * bytes_per_param + experts_bytes
        active = attn + router + expert * (experts_per_token if moe else 1)
        embed = vocab_size * hidden_size
        return cls(
            name=name,
            n_layers=n_layers,
            hidden_size=hidden_size,
            n_heads=n_heads,
            head_dim=head_dim,
            tie_word_embeddings=tie_word_embeddings,
            layer_param_bytes=(float(layer_bytes),) * n_layers,
            embed_param_bytes=float(embed * bytes_per_param),
            head_param_bytes=float((embed + hidden_size) * bytes_per_param),
            kv_bytes_per_token_per_layer=2.0 * n_kv_heads * head_dim * kv_bytes_per_element,
            activation_bytes_per_token=hidden_size * activation_bytes_per_element,
            layer_flops_per_token=(2.0 * active,) * n_layers,
            head_flops_per_token=2.0 * embed,
            n_experts=n_experts,
            experts_per_token=experts_per_token,
            layer_expert_bytes=(float(experts_bytes),) * n_layers if moe else (),
            layer_kv_window=_windows(n_layers, sliding_window, sliding_layers, name),
        )


def load_model_description(path: str | Path) -> ModelSpec:
    """Read a YAML model description (the keyword arguments of `from_description`).

    A YAML file that has `config` and `cost` sections is treated as an exporter manifest.
    """
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ModelSpecError(f"{p}: cannot read model description: {e}") from e
    except yaml.YAMLError as e:
        raise ModelSpecError(f"{p}: not valid YAML: {yaml_problem(e)}") from e
    if not isinstance(data, Mapping):
        raise ModelSpecError(f"{p}: expected a mapping, got {type(data).__name__}")
    if "config" in data and "cost" in data:
        return ModelSpec.from_manifest(data)
    kwargs = dict(data)
    if "hf_config" in kwargs:
        kwargs = {**_from_hf_config(p, p.parent / str(kwargs.pop("hf_config"))), **kwargs}
    kwargs.setdefault("name", p.stem)
    try:
        return ModelSpec.from_description(**kwargs)
    except TypeError as e:
        raise ModelSpecError(f"{p}: {e}") from e


# config.json field -> description field (Llama lineage and gpt-oss/Mixtral MoE names)
_HF_FIELDS = {
    "num_hidden_layers": "n_layers",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_attention_heads": "n_heads",
    "num_key_value_heads": "n_kv_heads",
    "head_dim": "head_dim",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
    "num_local_experts": "n_experts",
    "num_experts_per_tok": "experts_per_token",
}


def _from_hf_config(desc: Path, path: Path) -> dict[str, Any]:
    """Description fields from a Hugging Face config.json named by a description."""
    import json

    try:
        hf = json.loads(path.read_text())
    except OSError as e:
        raise ModelSpecError(f"{desc}: hf_config: cannot read {path}: {e}") from e
    except json.JSONDecodeError as e:
        raise ModelSpecError(f"{desc}: hf_config: {path} is not valid JSON: {e}") from e
    if not isinstance(hf, Mapping):
        raise ModelSpecError(f"{desc}: hf_config: {path} is not a JSON object")
    out = {ours: hf[theirs] for theirs, ours in _HF_FIELDS.items() if theirs in hf}
    if "head_dim" not in out and "hidden_size" in hf and "num_attention_heads" in hf:
        out["head_dim"] = int(hf["hidden_size"]) // int(hf["num_attention_heads"])
    out.setdefault("n_kv_heads", out.get("n_heads"))
    types = hf.get("layer_types")
    if hf.get("sliding_window") and isinstance(types, list):
        out["sliding_window"] = hf["sliding_window"]
        out["sliding_layers"] = [i for i, t in enumerate(types) if t == "sliding_attention"]
    return out


def _windows(n_layers: int, window: Any, layers: Any, name: str) -> tuple[int, ...]:
    """`layer_kv_window` from a window and the layers that slide (none: empty)."""
    if window is None or not layers:
        return ()
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ModelSpecError(f"{name}: sliding_window must be a positive integer, got {window!r}")
    if not isinstance(layers, list) or not all(
        isinstance(i, int) and 0 <= i < n_layers for i in layers
    ):
        raise ModelSpecError(
            f"{name}: sliding_layers must list layers in [0, {n_layers}), got {layers!r}"
        )
    return tuple(window if i in set(layers) else 0 for i in range(n_layers))


def _section(d: Mapping[str, Any], key: str, name: str) -> Mapping[str, Any]:
    value = d.get(key)
    if not isinstance(value, Mapping):
        raise ModelSpecError(f"{name}: manifest needs a mapping {key!r}, got {value!r}")
    return value


def _num(d: Mapping[str, Any], key: str, where: str) -> float:
    value = d.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ModelSpecError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def _int(d: Mapping[str, Any], key: str, where: str) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSpecError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _list(d: Mapping[str, Any], key: str, where: str) -> tuple[float, ...]:
    value = d.get(key)
    if not isinstance(value, list) or not value:
        raise ModelSpecError(f"{where}: {key} must be a non-empty list, got {value!r}")
    return tuple(_num({key: x}, key, f"{where}[{i}]") for i, x in enumerate(value))
