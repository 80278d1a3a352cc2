"""Write a model directory: embed, per-layer (and optional layer-range) segments, head,
tokenizer and manifest. Re-running on an unchanged input is a no-op.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx

from onnx_export.errors import ExportError
from onnx_export.manifest import Manifest, Segment, TensorSpec, sha256_path
from onnx_export.onnx_writer import SegmentModel
from onnx_export.shared_data import WEIGHTS_KEY, externalize, inline_bytes
from onnx_export.source import ModelConfig, ModelWeights, fetch_default_gguf, open_model
from onnx_export.tokenizer import profile_ids, write_tokenizer

log = logging.getLogger(__name__)

# Part of every manifest fingerprint: bump when any builder writes a different graph, so model
# directories exported by older code are rebuilt instead of reused (5: the screened head and
# its unscreened alternative; 6: its finiteness check reads the row sum once; 7: every GGUF
# type quantized (`onnx_export.quant`), RoPE tables in shared files, measured weight bytes;
# 8: gpt-oss, MXFP4 decoded from its blocks instead of re-encoded; 9: the screened head's
# screen names its codes through initializers of its own, so they are held once; 10: parts of
# one matrix share its scales, one MatMulNBits each over x times a power of two; 11: also
# sliding-window layers' KV bounded by the window, and the profile's text in the manifest).
EXPORTER_VERSION = "11"
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
    variant runtimes prefer (`Manifest.variant_of_cost`), the one devices load. FLOPs come
    from the tensors' shapes; no weight is read."""
    c = w.config
    # A token runs n_experts_used of a layer's n_experts: its FLOPs follow the active weights.
    active = c.n_experts_used / c.n_experts if c.moe else 1.0

    def elements(i: int, experts: bool) -> int:
        return sum(
            int(np.prod(w.shape(t)))
            for t in w.layer_tensor_names(i)
            if (".mlp.experts." in t) == experts
        )

    dense = [elements(i, False) for i in range(c.n_layers)]
    expert = [elements(i, True) for i in range(c.n_layers)]
    layer_flops = [round(2 * (d + e * active)) for d, e in zip(dense, expert, strict=True)]
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
            "layer_param_bytes": [4 * (d + e) for d, e in zip(dense, expert, strict=True)],
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
        **(
            {
                "n_experts": c.n_experts,
                "experts_per_token": c.n_experts_used,
                "layer_expert_bytes": [
                    _expert_bytes(
                        manifest, i, top["layer_param_bytes"][i], expert[i], dense[i] + expert[i]
                    )
                    for i in range(c.n_layers)
                ],
            }
            if c.moe
            else {}
        ),
    }


def _expert_bytes(manifest: Manifest, layer: int, total: int, expert: int, all_: int) -> int:
    """Bytes of one layer's experts in the variant devices load: as the contrib graph
    measured them (`fast_graph._finish`), else the experts' share of the layer's elements
    (exact for the standard graph, which stores everything in fp32)."""
    chosen = manifest.variant_of_cost()
    segs = [] if chosen is None else manifest.by_kind("layers", *chosen)
    seg = next((s for s in segs if s.layers == range(layer, layer + 1)), None)
    measured = (seg.weights or {}).get("expert_bytes") if seg is not None else None
    if measured is not None:
        return int(measured)
    return round(total * expert / max(1, all_))


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


def _fingerprint(w: ModelWeights, source_digest: str) -> str:
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"exporter": EXPORTER_VERSION, "source": source_digest, "config": w.config.to_dict()},
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()


def _source_files(p: Path) -> list[Path]:
    """The files an export reads: a GGUF, or a Hugging Face folder's weights and configs."""
    if p.is_file():
        return [p]
    return [
        f
        for f in [*sorted(p.glob("*.safetensors")), p / "config.json", p / "tokenizer.json"]
        if f.is_file()
    ]


def _source_digest(w: ModelWeights) -> str:
    p = Path(w.source["path"])
    if p.is_file():
        return sha256_path(p)
    h = hashlib.sha256()
    for f in _source_files(p):
        h.update(f.name.encode())
        h.update(sha256_path(f).encode())
    return h.hexdigest()


def _source_stat(p: Path) -> list[list[Any]]:
    """Name, size and modification time of each source file: what `make` trusts to say a
    file is unchanged, without reading it."""
    out: list[list[Any]] = []
    for f in _source_files(p):
        st = f.stat()
        out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def _exported_moe(out: Path) -> bool:
    """Whether `out` holds an export of a mixture of experts."""
    try:
        return int(Manifest.load(out).config.get("n_experts") or 0) > 0
    except (ExportError, OSError, TypeError, ValueError):
        return False


def _still_current(
    source: Path,
    out: Path,
    variants: Sequence[tuple[str, str]],
    ranges: str | None,
) -> Manifest | None:
    """The existing export, if it already holds everything asked for and its source files
    are unchanged (same size and mtime as when it was written): every command that runs the
    default model starts here, and opening the GGUF to re-hash it cost seconds each time."""
    try:
        old = Manifest.load(out)
        if Path(old.source.get("path", "")).resolve() != source.resolve():
            return None
        if old.source.get("stat") != _source_stat(source):
            return None
        same_exporter = {"exporter": EXPORTER_VERSION, "source": old.source["sha256"]}
        h = hashlib.sha256(
            json.dumps({**same_exporter, "config": old.config}, sort_keys=True).encode()
        )
        if h.hexdigest() != old.fingerprint:
            return None
        n = int(old.config["n_layers"])
        wanted = parse_ranges(ranges, n)
    except (ExportError, OSError, KeyError, TypeError, ValueError):
        return None
    have = {s.name: s for s in old.segments}
    for graph_name, precision in variants:
        pre = segment_prefix(graph_name, precision)
        names = [pre + "embed", pre + "head", *(f"{pre}layer_{i:02d}" for i in range(n))]
        names += [f"{pre}layers_{a:02d}_{b:02d}" for a, b in wanted if b - a > 1]
        if any(x not in have for x in names):
            return None
    for seg in old.segments:
        f = out / seg.file
        if not f.is_file() or f.stat().st_size != seg.bytes:
            return None
    if not all((out / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    if not all((out / f).is_file() for f in old.data_files):  # shared tables segments map
        return None
    return old


def default_model_dir() -> Path:
    from onnx_export.source import DEFAULT_MODEL_NAME, cache_dir

    return cache_dir() / "models" / DEFAULT_MODEL_NAME


class GraphBuilders(Protocol):
    """A graph family: standard ONNX ops (`onnx_export.graph`) or contrib ops (fast)."""

    def embed_model(self, cfg: ModelConfig, w: ModelWeights, precision: str) -> SegmentModel: ...

    def layers_model(
        self, cfg: ModelConfig, start: int, end: int, w: ModelWeights, precision: str
    ) -> SegmentModel: ...

    def head_model(self, cfg: ModelConfig, w: ModelWeights, precision: str) -> SegmentModel: ...


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


DEFAULT_VARIANTS: tuple[tuple[str, str], ...] = (("standard", "fp32"), ("contrib", "exact"))
"""What `e2llm export` writes unless told: the portable graph and the fast exact one, so a
first `e2llm generate` and the demo run the fast path."""


MOE_DEFAULT_VARIANTS: tuple[tuple[str, str], ...] = (("contrib", "exact"),)
"""What `e2llm export` writes of a mixture of experts unless told: the contrib graph alone,
which keeps quantized experts quantized (the standard graph holds every expert in fp32:
~80 GB for gpt-oss-20b)."""

MOE_FP32_EXPERTS_MAX = 1_000_000_000
"""Bytes of fp32 experts a default export writes at most: past that, a mixture of experts
whose source stores them unquantized (every graph would write them in fp32) is refused
until a graph is named."""


def default_variants(w: ModelWeights) -> tuple[tuple[str, str], ...]:
    """The variants an export writes when none is named: `DEFAULT_VARIANTS`, or for a
    mixture of experts `MOE_DEFAULT_VARIANTS` (refused, before anything is written, when
    even that graph would hold over `MOE_FP32_EXPERTS_MAX` bytes of fp32 experts)."""
    c = w.config
    if not c.moe:
        return DEFAULT_VARIANTS
    from onnx_export.fast_graph import stored

    raw = stored(w, "model.layers.0.mlp.experts.0.gate_proj.weight")
    if raw is not None and raw.qtype not in ("F32", "F16", "BF16"):
        return MOE_DEFAULT_VARIANTS
    fp32 = 4 * c.n_layers * c.n_experts * 3 * c.hidden_size * c.intermediate_size
    if fp32 > MOE_FP32_EXPERTS_MAX:
        raise ExportError(
            f"{w.source['path']}: a mixture of experts stored unquantized: every graph would "
            f"write its experts in fp32 ({size_text(fp32)}); name the graph to write it "
            f"anyway (--graph contrib, or --graph standard), or export a quantized source "
            f"(a GGUF, MXFP4 safetensors)"
        )
    return MOE_DEFAULT_VARIANTS


def size_text(n: float) -> str:
    """Bytes for a person: GB from 1 GB, else MB."""
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _check_variants(variants: Sequence[tuple[str, str]]) -> list[tuple[str, GraphBuilders]]:
    out = []
    for graph_name, precision in variants:
        builders = graph_family(graph_name)
        supported = getattr(builders, "PRECISIONS", ("fp32",))
        if precision not in supported:
            raise ExportError(
                f"--precision: graph {graph_name!r} supports {', '.join(supported)}, "
                f"not {precision!r}"
            )
        out.append((precision, builders))
    return out


Job = tuple[str, str, int | None, int | None, str, str, Callable[[], SegmentModel]]


def _jobs(
    w: ModelWeights,
    variants: Sequence[tuple[str, str]],
    family: list[tuple[str, GraphBuilders]],
    wanted_ranges: list[tuple[int, int]],
) -> list[Job]:
    """(name, kind, first, stop, graph, precision, build) for every segment of `variants`."""
    cfg = w.config
    jobs: list[Job] = []
    for (graph_name, precision), (_, builders) in zip(variants, family, strict=True):
        pre = segment_prefix(graph_name, precision)
        tag = (graph_name, precision)
        jobs.append(
            (pre + "embed", "embed", None, None, *tag,
             functools.partial(builders.embed_model, cfg, w, precision))
        )  # fmt: skip
        spans = [(i, i + 1) for i in range(cfg.n_layers)]
        spans += [r for r in wanted_ranges if r[1] - r[0] > 1]
        for a, b in spans:
            name = f"{pre}layer_{a:02d}" if b == a + 1 else f"{pre}layers_{a:02d}_{b:02d}"
            layers = functools.partial(builders.layers_model, cfg, a, b, w, precision)
            jobs.append((name, "layers", a, b, *tag, layers))
        jobs.append(
            (pre + "head", "head", None, None, *tag,
             functools.partial(builders.head_model, cfg, w, precision))
        )  # fmt: skip
        alternatives = getattr(builders, "alternative_heads", None)  # same kind; runtime picks
        for suffix, build in (alternatives(cfg, w, precision) if alternatives else {}).items():
            jobs.append((pre + suffix, "head", None, None, *tag, build))
    return jobs


def export_model(
    source: str | Path | None,
    out_dir: str | Path | None = None,
    ranges: str | None = None,
    progress: bool = True,
    graph_name: str | None = None,
    precision: str | None = None,
    variants: Sequence[tuple[str, str]] | None = None,
) -> Manifest:
    """Export (or update) a model directory and return its manifest.

    Writes `variants` (default: `DEFAULT_VARIANTS`; `graph_name`/`precision` name a single
    one). Several variants live in one directory; each call adds or refreshes the ones it
    names and keeps the others. Everything is written into a temporary sibling directory
    that replaces `out_dir` only when complete, so an interrupted or refused export leaves
    the previous directory (or none) as it was; unchanged input is a no-op. Weights are read
    per segment, so peak memory is about one segment's fp32 weights, not the model's.
    """
    defaulted = variants is None and graph_name is None and precision is None
    if variants is None:
        if defaulted:
            variants = DEFAULT_VARIANTS
        else:
            g = graph_name or "standard"
            variants = [(g, precision or ("fp32" if g == "standard" else "exact"))]
    out = Path(out_dir) if out_dir else default_model_dir()
    source_path = fetch_default_gguf() if source is None else Path(source)
    if defaulted and _exported_moe(out):  # what the MoE default wrote earlier is all there is
        variants = MOE_DEFAULT_VARIANTS
    family = _check_variants(variants)
    current = _still_current(source_path, out, variants, ranges)
    if current is not None:
        return current
    w = open_model(source_path)
    if defaulted:
        variants = default_variants(w)
        family = _check_variants(variants)
    for _, builders in family:
        check = getattr(builders, "check_config", None)
        problem = check(w.config) if check else None
        if problem:
            raise ExportError(f"{w.source['path']}: {problem}")
    wanted_ranges = parse_ranges(ranges, w.config.n_layers)
    digest = _source_digest(w)
    fp = _fingerprint(w, digest)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        old: Manifest | None = None
        existing: dict[str, Segment] = {}
        with contextlib.suppress(ExportError):
            old = Manifest.load(out)
        if old is not None and old.fingerprint == fp:
            existing = {
                s.name: s
                for s in old.segments
                if (out / s.file).is_file() and (out / s.file).stat().st_size == s.bytes
            }
        jobs = _jobs(w, variants, family, wanted_ranges)
        job_names = {j[0] for j in jobs}
        # Keep segments from earlier runs (other variants, other --ranges): adding is cheap,
        # losing is not.
        kept = [s for n, s in existing.items() if n not in job_names]
        todo = [j for j in jobs if j[0] not in existing]
        tok_files = ["tokenizer.json", "tokenizer_config.json"]
        stat = _source_stat(Path(w.source["path"]))
        if old is not None and not todo and all((out / f).is_file() for f in tok_files):
            if old.source.get("stat") != stat:  # touched, not changed: remember the new stat
                old.source = {**old.source, "stat": stat}
                with contextlib.suppress(OSError):  # a read-only directory stays as it is
                    old.write()
            return old  # unchanged input, nothing missing: a no-op
        stale = (
            {s.file for s in old.segments} - {s.file for s in existing.values()} if old else set()
        )
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # what mkdir would have made, not mkdtemp's 0700
        try:
            if out.is_dir():
                _carry_over(out, tmp, skip=stale | {f"{j[0]}.onnx" for j in todo})
            segments = {n: s for n, s in existing.items()}
            data_files = dict(old.data_files) if old is not None and existing else {}
            with _progress(progress, len(todo), f"exporting {w.name}") as advance:
                for name, kind, first, stop, g_name, prec, build in todo:
                    model = build()
                    weights = _weights_info(model)
                    data, mapped = externalize(model, tmp)
                    data_files.update(data)
                    path = tmp / f"{name}.onnx"
                    digest_, size = model.save(path)
                    segments[name] = Segment(
                        name=name,
                        kind=kind,
                        file=path.name,
                        sha256=digest_,
                        bytes=size,
                        layer_start=first,
                        layer_end=stop,
                        graph=g_name,
                        precision=prec,
                        inputs=_specs(model.graph.input),
                        outputs=_specs(model.graph.output),
                        data=sorted(data),
                        param_bytes=inline_bytes(model) + mapped,
                        weights=weights,
                    )
                    del model
                    w.release()  # drop the source pages this segment read from memory
                    advance(name)
            write_tokenizer(w.tokenizer, tmp)
            text_ids = profile_ids(tmp / "tokenizer.json")
            all_segments = [segments[j[0]] for j in jobs] + kept
            used = {f for seg in all_segments for f in seg.data}
            for f in tmp.glob("shared_*.bin"):  # carried over, no longer mapped by anyone
                if f.name not in used:
                    f.unlink()
            manifest = Manifest(
                name=w.name,
                config=w.config.to_dict(),
                cost={},
                source={**w.source, "sha256": digest, "stat": stat},
                fingerprint=fp,
                segments=all_segments,
                tokenizer={"file": "tokenizer.json", "config": "tokenizer_config.json"},
                directory=tmp,
                data_files={f: h for f, h in data_files.items() if f in used},
                profile_ids=text_ids,
            )
            manifest.cost = model_cost(w, manifest)
            manifest.write()
            _replace_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    manifest.directory = out
    return manifest


def _weights_info(model: SegmentModel) -> dict[str, Any] | None:
    """What the graph builder recorded about its weights (`shared_data.WEIGHTS_KEY`)."""
    for prop in model.proto.metadata_props:
        if prop.key == WEIGHTS_KEY:
            info: dict[str, Any] = json.loads(prop.value)
            return info
    return None


def _carry_over(src: Path, dst: Path, skip: set[str]) -> None:
    """Hard-link (same file system: no copy) every file of `src` the new export keeps."""
    for f in src.iterdir():
        if f.is_file() and f.name not in skip and not f.name.endswith(".tmp"):
            try:
                os.link(f, dst / f.name)
            except OSError:
                shutil.copy2(f, dst / f.name)


_RENAME_EXCHANGE = 2  # linux/fs.h


def _replace_dir(new: Path, out: Path) -> None:
    """Make `new` become `out`: one rename when `out` is absent, else an atomic exchange
    (Linux renameat2) so readers never see a missing directory; elsewhere, two renames."""
    if not out.exists():
        os.rename(new, out)
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "renameat2", None)
        if fn is not None and fn(-100, bytes(new), -100, bytes(out), _RENAME_EXCHANGE) == 0:
            shutil.rmtree(new)  # it now holds the previous directory
            return
    aside = new.with_name(new.name + ".old")
    os.rename(out, aside)
    os.rename(new, out)
    shutil.rmtree(aside)


class _locked:
    """One export at a time per model directory (the orchestrator adds ranges while a
    person may be exporting): an flock on a sibling lock file."""

    def __init__(self, out: Path) -> None:
        self.path = out.parent / f".{out.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> None:
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)


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
