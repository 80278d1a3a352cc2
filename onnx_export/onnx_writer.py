"""Write an ONNX model whose large initializers stay numpy arrays until they reach the file.

`onnx.save_model` needs every weight copied into the protobuf and then serialized again: three
copies of a segment in memory (an fp32 embedding table of 150k tokens is 0.5-1 GB). Protobuf
merges repeated fields wherever they appear in a message, so the file can be the serialized
model without its large initializers followed by one `initializer` entry per array, each
written straight from the array's buffer: peak memory stays at the arrays themselves.
"""

from __future__ import annotations

import hashlib
import mmap
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

DEFERRED_BYTES = 1 << 16
"""Initializers at least this large are streamed; smaller ones live in the proto."""

_GRAPH_FIELD, _INITIALIZER_FIELD, _RAW_DATA_FIELD = 7, 5, 9  # ModelProto, GraphProto, TensorProto
_CHUNK = 16 << 20


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, length: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return _varint(number << 3 | 2) + _varint(length)


@dataclass
class SegmentModel:
    """A built segment: `proto` (the model minus its large initializers) and `arrays`."""

    proto: onnx.ModelProto
    arrays: list[tuple[str, np.ndarray]] = field(default_factory=list)

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def _tensor_heads(self) -> Iterator[tuple[bytes, np.ndarray]]:
        """Per array: its serialized TensorProto up to the raw data, and the array."""
        for name, arr in self.arrays:
            arr = np.ascontiguousarray(arr)
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            t = onnx.TensorProto(
                name=name,
                dims=list(arr.shape),
                data_type=helper.np_dtype_to_tensor_dtype(arr.dtype),
            )
            yield t.SerializeToString() + _field(_RAW_DATA_FIELD, arr.nbytes), arr

    def save(self, path: Path) -> tuple[str, int]:
        """Write the model to `path`; returns its sha256 and size in bytes."""
        model_wo_graph = onnx.ModelProto()
        model_wo_graph.CopyFrom(self.proto)
        model_wo_graph.ClearField("graph")
        head = model_wo_graph.SerializeToString()
        graph = self.proto.graph.SerializeToString()
        heads = list(self._tensor_heads())
        entries = [len(h) + a.nbytes for h, a in heads]
        graph_len = len(graph) + sum(len(_field(_INITIALIZER_FIELD, n)) + n for n in entries)
        digest, size = hashlib.sha256(), 0
        with path.open("wb") as f:

            def put(b: bytes | memoryview) -> None:
                nonlocal size
                f.write(b)
                digest.update(b)
                size += len(b)

            put(head)
            put(_field(_GRAPH_FIELD, graph_len))
            put(graph)
            for (h, arr), n in zip(heads, entries, strict=True):
                put(_field(_INITIALIZER_FIELD, n))
                put(h)
                flat = arr.reshape(-1).view(np.uint8).data
                for i in range(0, len(flat), _CHUNK):
                    put(flat[i : i + _CHUNK])
                _drop_pages(arr)
        return digest.hexdigest(), size

    def SerializeToString(self) -> bytes:
        """The whole model in memory, as `onnx.ModelProto.SerializeToString` (tests)."""
        return self.to_proto().SerializeToString()

    def to_proto(self) -> onnx.ModelProto:
        m = onnx.ModelProto()
        m.CopyFrom(self.proto)
        m.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in self.arrays)
        return m


def is_deferred(array: Any) -> bool:
    return isinstance(array, np.ndarray) and array.nbytes >= DEFERRED_BYTES


def spill(array: np.ndarray) -> np.ndarray:
    """`array` moved to an unlinked temporary file (TMPDIR) and mapped back read-only: the
    same values, held by the page cache rather than the process, read again when the
    segment is saved (`SegmentModel.save` then drops its pages). A layer range builds
    every layer before anything is written; spilled, it holds one layer's arrays at a time
    instead of them all (Qwen2.5-1.5B's 28 quantized layers: 1.1 GB)."""
    arr = np.ascontiguousarray(array)
    with tempfile.TemporaryFile() as f:
        f.write(arr.reshape(-1).view(np.uint8).data)
        f.flush()
        mapped = mmap.mmap(f.fileno(), arr.nbytes, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, arr.dtype).reshape(arr.shape)


def _drop_pages(array: np.ndarray) -> None:
    """Unmap the resident pages of a `spill`ed array (re-read from its file on demand)."""
    base: Any = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is not None and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)
