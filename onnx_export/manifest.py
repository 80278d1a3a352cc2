"""The model directory's manifest: the one contract between the exporter and everything else.

Downstream code (runner, agents, planner) reads segment files, shapes and costs from here
and never guesses. Agents verify each segment's sha256 before loading it.
"""

from __future__ import annotations

import hashlib
import mmap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onnx_export.errors import ExportError

FORMAT = "e2llm-model/1"
MANIFEST = "manifest.yaml"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: list[int | str]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


VARIANT_PREFERENCE = (("contrib", "exact"), ("standard", "fp32"), ("contrib", "int8"))
"""(graph, precision) in the order runtimes prefer them: exact contrib (fast, same tokens),
the portable graph, int8 (fastest, tokens drift) only when it is all there is or asked for."""


@dataclass(frozen=True)
class Segment:
    """One ONNX file: kind 'embed', 'layers' (layer range [start, end)) or 'head'.

    `data`: shared files it maps (`onnx_export.shared_data`); `param_bytes`: bytes of the
    weights it holds itself (what a device pays to load it); `weights`: how its GGUF types
    are stored and which tensors fell back to fp32, and why.
    """

    name: str
    kind: str
    file: str
    sha256: str
    bytes: int
    layer_start: int | None
    layer_end: int | None
    graph: str
    precision: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    data: list[str] = field(default_factory=list)
    param_bytes: int | None = None
    weights: dict[str, Any] | None = None

    @property
    def layers(self) -> range:
        if self.layer_start is None or self.layer_end is None:
            return range(0)
        return range(self.layer_start, self.layer_end)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "file": self.file,
            "sha256": self.sha256,
            "bytes": self.bytes,
        }
        if self.kind == "layers":
            d["layers"] = [self.layer_start, self.layer_end]
        d.update(
            graph=self.graph,
            precision=self.precision,
            inputs=[t.to_dict() for t in self.inputs],
            outputs=[t.to_dict() for t in self.outputs],
        )
        if self.data:
            d["data"] = list(self.data)
        if self.param_bytes is not None:
            d["param_bytes"] = self.param_bytes
        if self.weights:
            d["weights"] = self.weights
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Segment:
        layers = d.get("layers") or [None, None]
        return cls(
            name=d["name"],
            kind=d["kind"],
            file=d["file"],
            sha256=d["sha256"],
            bytes=int(d["bytes"]),
            layer_start=layers[0],
            layer_end=layers[1],
            graph=d.get("graph", "standard"),
            precision=d.get("precision", "fp32"),
            inputs=[TensorSpec(**t) for t in d["inputs"]],
            outputs=[TensorSpec(**t) for t in d["outputs"]],
            data=list(d.get("data", [])),
            param_bytes=d.get("param_bytes"),
            weights=d.get("weights"),
        )


@dataclass
class Manifest:
    name: str
    config: dict[str, Any]
    cost: dict[str, Any]
    source: dict[str, Any]
    fingerprint: str
    segments: list[Segment] = field(default_factory=list)
    tokenizer: dict[str, str] = field(default_factory=dict)
    directory: Path = Path(".")
    data_files: dict[str, str] = field(default_factory=dict)
    """Shared data files (`Segment.data`) by name: their sha256."""
    profile_ids: list[int] = field(default_factory=list)
    """Token ids of real text (`onnx_export.tokenizer.PROFILE_TEXT`) that device profiles
    feed the layers: a mixture of experts then routes as it does on real inputs."""
    _verified: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "name": self.name,
            "fingerprint": self.fingerprint,
            "source": self.source,
            "config": self.config,
            "cost": self.cost,
            "tokenizer": self.tokenizer,
            "data_files": dict(self.data_files),
            "profile_ids": list(self.profile_ids),
            "segments": [s.to_dict() for s in self.segments],
        }

    def write(self) -> Path:
        path = self.directory / MANIFEST
        tmp = path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        directory = Path(directory)
        path = directory / MANIFEST
        if not path.is_file():
            raise ExportError(f"{path}: no such file (export the model first: e2llm export)")
        try:
            # libyaml when PyYAML has it: 0.17 s instead of 0.77 s for SmolLM2's manifest,
            # which every command and agent reads at start
            d = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        except yaml.YAMLError as exc:
            raise ExportError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ExportError(f"{path}: not an {FORMAT} manifest")
        try:
            return cls(
                name=d["name"],
                config=d["config"],
                cost=d["cost"],
                source=d["source"],
                fingerprint=d["fingerprint"],
                tokenizer=d.get("tokenizer", {}),
                segments=[Segment.from_dict(s) for s in d["segments"]],
                directory=directory,
                data_files=dict(d.get("data_files") or {}),
                profile_ids=[int(i) for i in d.get("profile_ids") or []],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from exc

    # -- lookups

    def segment(self, name: str) -> Segment:
        for s in self.segments:
            if s.name == name:
                return s
        raise ExportError(f"{self.directory / MANIFEST}: no segment named {name!r}")

    def by_kind(self, kind: str, graph: str = "standard", precision: str = "fp32") -> list[Segment]:
        return [
            s
            for s in self.segments
            if s.kind == kind and s.graph == graph and s.precision == precision
        ]

    def variants(self) -> list[tuple[str, str]]:
        """(graph, precision) pairs with a complete set of segments."""
        out = []
        for g, p in dict.fromkeys((s.graph, s.precision) for s in self.segments):
            layers = {i for s in self.by_kind("layers", g, p) for i in s.layers}
            if (
                self.by_kind("embed", g, p)
                and self.by_kind("head", g, p)
                and layers == set(range(int(self.config["n_layers"])))
            ):
                out.append((g, p))
        return out

    def cover(
        self,
        start: int,
        end: int,
        graph: str = "standard",
        precision: str = "fp32",
        longest: bool = True,
    ) -> list[Segment]:
        """Segments that exactly tile [start, end): fewest (longest ranges) or one per layer."""
        layer_segs = [
            s for s in self.by_kind("layers", graph, precision) if longest or len(s.layers) == 1
        ]
        best: dict[int, list[Segment]] = {start: []}
        for pos in range(start, end):
            if pos not in best:
                continue
            for s in layer_segs:
                if s.layer_start == pos and s.layer_end is not None and s.layer_end <= end:
                    cand = [*best[pos], s]
                    if s.layer_end not in best or len(cand) < len(best[s.layer_end]):
                        best[s.layer_end] = cand
        if end not in best:
            raise ExportError(
                f"{self.directory / MANIFEST}: no segments cover layers "
                f"[{start}, {end}) with graph {graph!r}, precision {precision!r}"
            )
        return best[end]

    def path(self, seg: Segment) -> Path:
        return self.directory / seg.file

    def verify(self, seg: Segment) -> Path:
        """The segment's path after checking size and sha256 (and those of the shared data
        files it maps, each once per manifest); ExportError names the file."""
        p = self.path(seg)
        if not p.is_file():
            raise ExportError(f"{p}: segment file missing")
        self._check(seg, p.stat().st_size, lambda: sha256_path(p))
        return p

    def check(self, seg: Segment, data: bytes | mmap.mmap) -> None:
        """Check the segment's bytes as read (size and sha256): what is parsed is what was
        verified, in one read. ExportError names the file."""
        self._check(seg, len(data), lambda: hashlib.sha256(data).hexdigest())

    def _check(self, seg: Segment, size: int, digest: Callable[[], str]) -> None:
        p = self.path(seg)
        if size != seg.bytes:
            raise ExportError(f"{p}: size {size} != manifest's {seg.bytes} (corrupted segment)")
        got = digest()
        if got != seg.sha256:
            raise ExportError(
                f"{p}: sha256 mismatch (corrupted segment): "
                f"{got[:12]}... != manifest's {seg.sha256[:12]}..."
            )
        self._verify_data(seg)

    def _verify_data(self, seg: Segment) -> None:
        """Check the shared data files `seg` maps (present, sha256), each once per
        manifest: the mapped tables are weights too."""
        for name in seg.data:
            if name in self._verified:
                continue
            want = self.data_files.get(name)
            if want is None:
                raise ExportError(
                    f"{self.directory / MANIFEST}: {seg.name} maps {name}, not listed"
                )
            f = self.directory / name
            if not f.is_file():
                raise ExportError(f"{f}: shared data file missing")
            _check_digest(f, want, "shared data")
            self._verified.add(name)

    def variant_of_cost(self) -> tuple[str, str] | None:
        """The variant whose weight bytes `cost` holds: the first complete one runtimes
        prefer (`VARIANT_PREFERENCE`)."""
        have = set(self.variants())
        return next((v for v in VARIANT_PREFERENCE if v in have), None)


def kv_windows(config: Mapping[str, Any]) -> dict[int, int]:
    """Layer -> window for the sliding-window layers of a manifest's `config`: the KV those
    layers keep (on a device, in a handoff) is their last `window` positions, which is all
    a later query sees (keys q - window < k <= q). Full-attention layers are absent."""
    window = config.get("sliding_window")
    if not window:
        return {}
    return {int(i): int(window) for i in config.get("sliding_layers") or []}


def _check_digest(path: Path, want: str, what: str) -> None:
    digest = sha256_path(path)
    if digest != want:
        raise ExportError(
            f"{path}: sha256 mismatch (corrupted {what}): "
            f"{digest[:12]}... != manifest's {want[:12]}..."
        )


def sha256_path(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
