"""Write a model directory: embed, per-layer (and optional layer-range) segments, head,
tokenizer and manifest. Re-running on an unchanged input is a no-op.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from onnx_export.errors import ExportError
from onnx_export.manifest import Manifest, Segment, TensorSpec, sha256_path
from onnx_export.shared_data import WEIGHTS_KEY, externalize, inline_bytes
from onnx_export.source import ModelConfig, ModelWeights, open_model
from onnx_export.tokenizer import write_tokenizer

log = logging.getLogger(__name__)

# Part of every manifest fingerprint: bump when any builder writes a different graph, so model
# directories exported by older code are rebuilt instead of reused (5: the screened head and
# its unscreened alternative; 6: its finiteness check reads the row sum once; 7: every GGUF
# type quantized (`onnx_export.quant`), RoPE tables in shared files, measured weight bytes).
EXPORTER_VERSION = "7"
_ELEM: dict[int, str] = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.FLOAT16: "float16",
}


def parse_ranges(text: str | None, n_layers: int) -> list[tuple[int, int]]:
    """'0-10,10-20,20-30' -> [(0, 10), (10, 20), (20, 30)], half-open, validated."""
    if not text:
        return []
    out = []
    for part in text.split(","):
        try:
            a, b = (int(x) for x in part.strip().split("-"))
        except ValueError:
            raise ExportError(f"--ranges: {part!r} is not START-END (e.g. 0-10)") from None
        if not 0 <= a < b <= n_layers:
            raise ExportError(f"--ranges: {part!r} must satisfy 0 <= START < END <= {n_layers}")
        out.append((a, b))
    return out


def _specs(values: Sequence[onnx.ValueInfoProto]) -> list[TensorSpec]:
    out = []
    for v in values:
        t = v.type.tensor_type
        shape: list[int | str] = [
            d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim
        ]
        out.append(TensorSpec(v.name, _ELEM[t.elem_type], shape))
    return out


def model_cost(w: ModelWeights, manifest: Manifest) -> dict[str, Any]:
    """Bytes and FLOPs the planner needs. Weight bytes are those the exported segments hold
    (`Segment.param_bytes`), per complete variant under `variants`; the top level is the
    variant runtimes prefer (`Manifest.variant_of_cost`), the one devices load."""
    c = w.config
    layer_flops = [
        2 * sum(_numel(w, t) for t in w.layer_tensor_names(i)) for i in range(c.n_layers)
    ]
    emb = c.vocab_size * c.hidden_size
    variants: dict[str, dict[str, Any]] = {}
    for graph, precision in manifest.variants():
        v = _variant_bytes(manifest, graph, precision, c.n_layers)
        if v is not None:
            variants[f"{graph}/{precision}"] = v
    chosen = manifest.variant_of_cost()
    top = variants.get(f"{chosen[0]}/{chosen[1]}") if chosen else None
    if top is None:  # nothing measured (no complete variant): fp32 weights
        top = {
            "layer_param_bytes": [f // 2 * 4 for f in layer_flops],
            "embed_param_bytes": 4 * emb,
            "head_param_bytes": 4 * (emb + c.hidden_size),
        }
    return {
        "variant": f"{chosen[0]}/{chosen[1]}" if chosen else None,
        **top,
        "kv_bytes_per_token_per_layer": 2 * c.n_kv_heads * c.head_dim * 4,
        "activation_bytes_per_token": c.hidden_size * 4,
        "layer_flops_per_token": layer_flops,
        "head_flops_per_token": 2 * emb,
        "variants": variants,
    }


def _variant_bytes(m: Manifest, graph: str, precision: str, n_layers: int) -> dict[str, Any] | None:
    single = {
        s.layer_start: s.param_bytes
        for s in m.by_kind("layers", graph, precision)
        if len(s.layers) == 1 and s.param_bytes is not None
    }
    embed = [s.param_bytes for s in m.by_kind("embed", graph, precision)]
    head = [s.param_bytes for s in m.by_kind("head", graph, precision)]  # the first: screened
    if len(single) != n_layers or not embed or not head or None in (embed[0], head[0]):
        return None
    return {
        "layer_param_bytes": [single[i] for i in range(n_layers)],
        "embed_param_bytes": embed[0],
        "head_param_bytes": head[0],
    }


def _numel(w: ModelWeights, name: str) -> int:
    """Elements of a tensor, from its stored shape when there is one (no dequantizing)."""
    try:
        return int(np.prod(w.raw(name).shape))
    except ExportError:
        return int(w.get(name).size)


def _fingerprint(w: ModelWeights, source_digest: str) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"exporter": EXPORTER_VERSION, "source": source_digest, "config": w.config.to_dict()},
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()


def _source_digest(w: ModelWeights) -> str:
    p = Path(w.source["path"])
    if p.is_file():
        return sha256_path(p)
    h = hashlib.sha256()
    for f in [*sorted(p.glob("*.safetensors")), p / "config.json", p / "tokenizer.json"]:
        if f.is_file():
            h.update(f.name.encode())
            h.update(sha256_path(f).encode())
    return h.hexdigest()


def default_model_dir() -> Path:
    from onnx_export.source import DEFAULT_MODEL_NAME, cache_dir

    return cache_dir() / "models" / DEFAULT_MODEL_NAME


class GraphBuilders(Protocol):
    """A graph family: standard ONNX ops (`onnx_export.graph`) or contrib ops (fast)."""

    def embed_model(self, cfg: ModelConfig, w: ModelWeights, precision: str) -> onnx.ModelProto: ...

    def layers_model(
        self, cfg: ModelConfig, start: int, end: int, w: ModelWeights, precision: str
    ) -> onnx.ModelProto: ...

    def head_model(self, cfg: ModelConfig, w: ModelWeights, precision: str) -> onnx.ModelProto: ...


def graph_family(name: str) -> GraphBuilders:
    """Graph families by name; each module registers the precisions it supports."""
    import importlib

    modules = {"standard": "onnx_export.graph", "contrib": "onnx_export.fast_graph"}
    if name not in modules:
        raise ExportError(f"--graph: unknown graph {name!r} (choose from {', '.join(modules)})")
    module: Any = importlib.import_module(modules[name])
    return module


def segment_prefix(graph_name: str, precision: str) -> str:
    """File/segment name prefix: none for the portable default, else e.g. 'contrib_int8_'."""
    return "" if (graph_name, precision) == ("standard", "fp32") else f"{graph_name}_{precision}_"


def export_model(
    source: str | Path | None,
    out_dir: str | Path | None = None,
    ranges: str | None = None,
    progress: bool = True,
    graph_name: str = "standard",
    precision: str = "fp32",
) -> Manifest:
    """Export (or update) a model directory and return its manifest.

    Several graph variants may live in one directory; each call adds or refreshes one.
    """
    builders = graph_family(graph_name)
    supported = getattr(builders, "PRECISIONS", ("fp32",))
    if precision not in supported:
        raise ExportError(
            f"--precision: graph {graph_name!r} supports {', '.join(supported)}, not {precision!r}"
        )
    w = open_model(source)
    out = Path(out_dir) if out_dir else default_model_dir()
    out.mkdir(parents=True, exist_ok=True)
    digest = _source_digest(w)
    fp = _fingerprint(w, digest)
    wanted_ranges = parse_ranges(ranges, w.config.n_layers)

    existing: dict[str, Segment] = {}
    old: Manifest | None = None
    try:
        old = Manifest.load(out)
        if old.fingerprint == fp:
            existing = {
                s.name: s
                for s in old.segments
                if (out / s.file).is_file() and (out / s.file).stat().st_size == s.bytes
            }
    except ExportError:
        pass

    w.cache()
    cfg, pre = w.config, segment_prefix(graph_name, precision)
    jobs: list[tuple[str, str, int | None, int | None, Callable[[], onnx.ModelProto]]] = [
        (pre + "embed", "embed", None, None, lambda: builders.embed_model(cfg, w, precision)),
    ]
    spans = [(i, i + 1) for i in range(cfg.n_layers)]
    spans += [r for r in wanted_ranges if r[1] - r[0] > 1]
    for a, b in spans:
        name = f"{pre}layer_{a:02d}" if b == a + 1 else f"{pre}layers_{a:02d}_{b:02d}"
        layers = functools.partial(builders.layers_model, cfg, a, b, w, precision)
        jobs.append((name, "layers", a, b, layers))
    jobs.append((pre + "head", "head", None, None, lambda: builders.head_model(cfg, w, precision)))
    alternatives = getattr(builders, "alternative_heads", None)  # same kind; runtime picks
    for suffix, build in (alternatives(cfg, w, precision) if alternatives else {}).items():
        jobs.append((pre + suffix, "head", None, None, build))
    # Keep range segments from earlier runs with other --ranges: adding is cheap, losing is not.
    kept = [s for n, s in existing.items() if n not in {j[0] for j in jobs}]

    todo = [j for j in jobs if j[0] not in existing]
    tok_files = ["tokenizer.json", "tokenizer_config.json"]
    if not todo and all((out / f).is_file() for f in tok_files):
        assert old is not None
        return old  # unchanged input, nothing missing: a no-op
    segments: dict[str, Segment] = {n: existing[n] for n, *_ in jobs if n in existing}
    data_files = dict(old.data_files) if old is not None and existing else {}
    with _progress(progress, len(todo), f"exporting {w.name}") as advance:
        for name, kind, first, stop, build in todo:
            model = build()
            weights = _weights_info(model)
            data, mapped = externalize(model, out)
            data_files.update(data)
            path = out / f"{name}.onnx"
            tmp = path.with_suffix(".onnx.tmp")
            onnx.save_model(model, str(tmp))
            os.replace(tmp, path)
            segments[name] = Segment(
                name=name,
                kind=kind,
                file=path.name,
                sha256=sha256_path(path),
                bytes=path.stat().st_size,
                layer_start=first,
                layer_end=stop,
                graph=graph_name,
                precision=precision,
                inputs=_specs(model.graph.input),
                outputs=_specs(model.graph.output),
                data=sorted(data),
                param_bytes=inline_bytes(model) + mapped,
                weights=weights,
            )
            advance(name)

    if not existing or not all((out / f).is_file() for f in tok_files):
        write_tokenizer(w.tokenizer, out)
    all_segments = [segments[n] for n, *_ in jobs] + kept
    used = {f for s in all_segments for f in s.data}
    manifest = Manifest(
        name=w.name,
        config=w.config.to_dict(),
        cost={},
        source={**w.source, "sha256": digest},
        fingerprint=fp,
        segments=all_segments,
        tokenizer={"file": "tokenizer.json", "config": "tokenizer_config.json"},
        directory=out,
        data_files={f: h for f, h in data_files.items() if f in used},
    )
    manifest.cost = model_cost(w, manifest)
    manifest.write()
    return manifest


def _weights_info(model: onnx.ModelProto) -> dict[str, Any] | None:
    """What the graph builder recorded about its weights (`fast_graph.WEIGHTS_KEY`)."""
    for prop in model.metadata_props:
        if prop.key == WEIGHTS_KEY:
            info: dict[str, Any] = json.loads(prop.value)
            return info
    return None


class _progress:
    """A rich progress bar when a person is watching; silent otherwise."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self.enabled, self.total, self.label = enabled and total > 0, total, label
        self._bar: Any = None

    def __enter__(self) -> Callable[[str], None]:
        if self.enabled:
            from rich.progress import Progress

            self._bar = Progress(transient=False)
            self._bar.start()
            task = self._bar.add_task(self.label, total=self.total)

            def advance(name: str) -> None:
                self._bar.update(task, advance=1, description=f"{self.label}: {name}")

            return advance
        return lambda name: None

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
