"""Build on the device the one graph a stage runs, from the segment files it already has.

A stage's layers [start, end) are covered by per-layer segments (or exported ranges where
the manifest has them). `compose` joins their graphs into one: each segment's tensor names
get its segment name as prefix, `hidden_out` of one feeds `hidden` of the next, identical
constants (the contrib graph's rotary tables, 2 MB per layer file) are kept once, and every
initializer over `INLINE_BYTES` becomes ONNX external data pointing at the bytes where they
already are: inside the segment's own .onnx file (a protobuf `bytes` field is stored
verbatim, so its location, offset and length are exact; each is checked byte for byte).
onnxruntime then loads the small composed graph from memory with the model directory as its
external-data folder. Nothing is written anywhere, the model directory can be read-only, and
no cache grows with the plans a device sees.

Why this way (bench/range_sessions.py on the default model, onnxruntime 1.32): onnxruntime
copies initializers embedded in a model but reads external data straight into place. In a
memory cgroup a stage loaded so peaked at 1.11-1.14x its weights (fp32, 15 and 30 layers)
and loaded under a limit of 1.25x; an exported range file loaded by path needed 1.34x
(contrib 1.9x), chained per-layer sessions 1.6x (contrib 3.8x: each file's rotary tables),
a composed graph with the weights copied in 3x. Decode, alternating in one process, was
as fast as the range file loaded by path or faster (fp32 1.04-1.16x, contrib 0.94-1.03x
over two runs); chained per-layer sessions were 12-15% slower (contrib).
"""

from __future__ import annotations

import mmap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import onnx
from google.protobuf.message import DecodeError
from onnx import AttributeProto, TensorProto, helper

from onnx_export.errors import ExportError
from onnx_export.manifest import Manifest, Segment

_Message = TypeVar("_Message", onnx.NodeProto, TensorProto, onnx.ValueInfoProto)

# Initializers up to this size are copied into the composed graph (norm weights, shapes);
# larger ones are read by onnxruntime from the segment file.
INLINE_BYTES = 1024
# Bytes of an initializer used to find it in its file (then compared in full).
_PROBE = 64


@dataclass(frozen=True)
class _Kept:
    """An initializer already in the composed graph, for sharing identical ones."""

    name: str
    inline: bytes | None
    path: Path | None
    offset: int
    length: int

    def same(self, raw: bytes) -> bool:
        if self.inline is not None:
            return self.inline == raw
        assert self.path is not None
        with self.path.open("rb") as f:
            f.seek(self.offset)
            return f.read(self.length) == raw


def compose(
    manifest: Manifest, segments: Sequence[Segment], *, verify: bool = True
) -> tuple[bytes, Path]:
    """The serialized graph that runs `segments` in order, and the folder its external data
    is in (pass it as onnxruntime's `session.model_external_initializers_file_folder_path`).

    One segment: its own graph, weights left in place. Several: contiguous layer segments,
    chained. With `verify`, every file is checked against the manifest (size, sha256) on the
    very bytes that are parsed and referenced.
    """
    if not segments:
        raise ExportError(f"{manifest.directory}: no segments to load")
    paths = [manifest.path(s) for s in segments]
    folders = {p.resolve().parent for p in paths}
    if len(folders) != 1:
        raise ExportError(
            f"{manifest.directory}: segment files resolve to {len(folders)} folders "
            f"({', '.join(sorted(map(str, folders)))}); they must share one"
        )
    if len(segments) > 1:
        _check_chain(manifest, segments)
    out = _Composer()
    for k, (seg, path) in enumerate(zip(segments, paths, strict=True)):
        out.add(
            manifest, seg, path.resolve(), first=k == 0, last=k == len(segments) - 1, verify=verify
        )
    name = segments[0].name if len(segments) == 1 else f"{segments[0].name}..{segments[-1].name}"
    return out.model(name).SerializeToString(), folders.pop()


def _check_chain(manifest: Manifest, segments: Sequence[Segment]) -> None:
    prev: Segment | None = None
    for s in segments:
        names = {t.name for t in s.inputs}, {t.name for t in s.outputs}
        if s.kind != "layers" or "hidden" not in names[0] or "hidden_out" not in names[1]:
            raise ExportError(
                f"{manifest.path(s)}: segment {s.name!r} is not a layer segment "
                "(hidden -> hidden_out); only layer segments can be chained"
            )
        if prev is not None and prev.layer_end != s.layer_start:
            raise ExportError(
                f"{manifest.directory}: segments {prev.name!r} and {s.name!r} are not contiguous"
            )
        prev = s


class _Composer:
    """Accumulates the nodes, initializers and interface of the graphs added so far."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.opsets: dict[str, int] = {}
        self.ir_version = 0
        self.hidden: str | None = None  # the previous segment's hidden_out, renamed
        self.kept: dict[tuple[object, ...], list[_Kept]] = {}

    def add(
        self, manifest: Manifest, seg: Segment, path: Path, *, first: bool, last: bool, verify: bool
    ) -> None:
        if not path.is_file() or path.stat().st_size != seg.bytes:
            manifest.verify(seg)  # raises, naming the file (missing, or both sizes)
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if verify:
                manifest.check(seg, data)
            model = onnx.ModelProto()
            with memoryview(data) as view:
                try:
                    model.ParseFromString(view)
                except DecodeError as exc:
                    raise ExportError(f"{path}: not an ONNX model ({exc})") from exc
            self._add_graph(model, seg, path, data, first=first, last=last)

    def _add_graph(
        self,
        model: onnx.ModelProto,
        seg: Segment,
        path: Path,
        data: mmap.mmap,
        *,
        first: bool,
        last: bool,
    ) -> None:
        g = model.graph
        chained_in = "hidden" if not first else None
        chained_out = "hidden_out" if not last else None
        # Graph inputs and outputs keep their names (the stage binds them), except the
        # hidden state passed between chained segments; everything else is prefixed.
        keep = {v.name for v in (*g.input, *g.output)} - {chained_in, chained_out}
        renamed: dict[str, str] = {}

        def name(n: str) -> str:
            if not n or n in keep:
                return n
            if n == chained_in:
                assert self.hidden is not None
                return self.hidden
            return renamed.setdefault(n, f"{seg.name}/{n}")

        if g.sparse_initializer:
            raise ExportError(f"{path}: sparse initializers are not supported")
        start = 0
        for t in g.initializer:
            alias, start = self._initializer(t, path, data, start, name)
            if alias is not None:
                renamed[t.name] = alias
        for node in g.node:
            if any(a.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for a in node.attribute):
                raise ExportError(f"{path}: node {node.name or node.op_type} has a subgraph")
            node.input[:] = [name(n) for n in node.input]
            node.output[:] = [name(n) for n in node.output]
            if node.name:
                node.name = f"{seg.name}/{node.name}"
            self.nodes.append(_copy(node))
        seen = {v.name for v in self.inputs}
        self.inputs += [_copy(v) for v in g.input if v.name != chained_in and v.name not in seen]
        outs = [_copy(v) for v in g.output if v.name != chained_out]
        hidden_out = [v for v in outs if v.name == "hidden_out"]
        # hidden_out first, then the present K/V in layer order: the range file's layout
        self.outputs = hidden_out + self.outputs + [v for v in outs if v.name != "hidden_out"]
        for v in g.value_info:
            v.name = name(v.name)
            self.value_info.append(_copy(v))
        if chained_out is not None:
            self.hidden = name(chained_out)
        for o in model.opset_import:
            self.opsets[o.domain] = max(self.opsets.get(o.domain, 0), o.version)
        self.ir_version = max(self.ir_version, model.ir_version)

    def _initializer(
        self, t: TensorProto, path: Path, data: mmap.mmap, start: int, name: Callable[[str], str]
    ) -> tuple[str | None, int]:
        """Add `t` (renamed, its bytes left in the file when large) unless an identical
        tensor is already in; return the name of that one (or None) and where to search next."""
        if t.data_location == TensorProto.EXTERNAL:
            # Already external: a table the exporter moved to a shared file (RoPE caches,
            # embedding rows, `onnx_export.shared_data`). Every segment names the same
            # file, so it is referenced once and onnxruntime maps it once.
            ext = {e.key: e.value for e in t.external_data}
            if not (path.parent / ext.get("location", "")).is_file():
                raise ExportError(
                    f"{path}: initializer {t.name} is in {ext.get('location')!r}, "
                    f"not found in {path.parent}"
                )
            where = (t.data_type, tuple(t.dims), ext["location"], ext.get("offset", "0"))
            ext_key = ("external", *where, ext.get("length"))
            for k in self.kept.get(ext_key, []):
                return k.name, start
            t.name = name(t.name)
            self.kept[ext_key] = [_Kept(t.name, None, None, 0, 0)]
            self.inits.append(_copy(t))
            return None, start
        if not t.HasField("raw_data"):
            t.name = name(t.name)
            self.inits.append(_copy(t))
            return None, start
        raw = t.raw_data
        key = (t.data_type, tuple(t.dims), len(raw), raw[:_PROBE], raw[-_PROBE:])
        for k in self.kept.get(key, []):
            if k.same(raw):
                return k.name, start
        t.name = name(t.name)
        if len(raw) <= INLINE_BYTES:
            self.kept.setdefault(key, []).append(_Kept(t.name, raw, None, 0, len(raw)))
            self.inits.append(_copy(t))
            return None, start
        offset = _locate(data, raw, start, path, t.name)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for k_, v in (("location", path.name), ("offset", str(offset)), ("length", str(len(raw)))):
            entry = t.external_data.add()
            entry.key, entry.value = k_, v
        self.kept.setdefault(key, []).append(_Kept(t.name, None, path, offset, len(raw)))
        self.inits.append(_copy(t))
        return None, offset + len(raw)

    def model(self, name: str) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, self.inputs, self.outputs, self.inits, value_info=self.value_info
        )
        m = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()],
            producer_name="e2llm-edge device",
        )
        m.ir_version = self.ir_version
        return m


def _copy(msg: _Message) -> _Message:
    """A standalone copy: keeping parts of a parsed segment would keep all of its memory
    (its weights included) alive until the whole range is composed."""
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _locate(data: mmap.mmap, raw: bytes, start: int, path: Path, what: str) -> int:
    """Where `raw` is stored in the file. Initializers are serialized in order, so the search
    starts after the previous one; every candidate is compared in full."""
    probe = raw[:_PROBE]
    for begin in (start, 0):
        at = data.find(probe, begin)
        while at >= 0:
            if data.find(raw, at, at + len(raw)) == at:
                return at
            at = data.find(probe, at + 1)
    raise ExportError(f"{path}: the bytes of initializer {what} are not in the file")
