"""Tables stored beside the segments and mapped, not copied: RoPE caches, gathered tables.

An initializer whose name starts with `SHARED` (the same in every segment of a model: the
RoPE cos/sin caches) or `MAPPED` (a table rows are gathered from: an embedding, the
screened head's codes) moves to `shared_<sha256 prefix>.bin` in the model directory and is
referenced as ONNX external data. onnxruntime maps such files instead of copying them
(measured: four sessions over one 34 MB table added 2 MB of private memory, against
134 MB inline), so all sessions and processes on a device share one copy in the page
cache, and only the pages of the positions or rows in use are ever read: a Qwen2.5 layer
no longer carries its own 8.4 MB RoPE table, and its 153 MB embedding table costs the
rows looked up. The name carries the content hash, so segments exported later (layer
ranges) and other variants reuse the same file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnx_export.onnx_writer import SegmentModel

SHARED = "shared/"
"""Prefix of initializers every segment of a model holds alike (not counted per segment)."""
MAPPED = "mapped/"
"""Prefix of a segment's own tables that are mapped (counted in its weight bytes: at most
that much becomes resident)."""
WEIGHTS_KEY = "e2llm.weights"
"""ONNX metadata_props key where a graph builder records how it stored its weights, as
JSON {"forms": {GGUF type: storage}, "fallbacks": {tensor: why}}; copied into the
manifest's `Segment.weights`."""


def externalize(model: SegmentModel, directory: Path) -> tuple[dict[str, str], int]:
    """Move the `SHARED` and `MAPPED` arrays of `model` (those large enough to be streamed:
    smaller ones stay inline) to files in `directory`; returns {file: sha256} and the
    bytes of the `MAPPED` files (each once: several initializers may name one file). A file
    is written only when missing (content-addressed), atomically.
    """
    files: dict[str, str] = {}
    mapped: dict[str, int] = {}  # by file: two initializers over one table count once
    keep: list[tuple[str, np.ndarray]] = []
    for name, arr in model.arrays:
        own = name.startswith(MAPPED)
        if not (own or name.startswith(SHARED)):
            keep.append((name, arr))
            continue
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
        data = arr.reshape(-1).view(np.uint8)
        digest = hashlib.sha256(data.data).hexdigest()
        file = f"shared_{digest[:16]}.bin"
        path = directory / file
        if not path.is_file() or path.stat().st_size != data.nbytes:
            tmp = path.with_suffix(".bin.tmp")
            with tmp.open("wb") as f:
                f.write(data.data)
            os.replace(tmp, path)
        t = onnx.TensorProto(
            name=name, dims=list(arr.shape), data_type=helper.np_dtype_to_tensor_dtype(arr.dtype)
        )
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", file), ("offset", "0"), ("length", str(data.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        model.proto.graph.initializer.append(t)
        files[file] = digest
        if own:
            mapped[file] = data.nbytes
    model.arrays = keep
    return files, sum(mapped.values())


def inline_bytes(model: SegmentModel) -> int:
    """Bytes of the initializers stored in the segment itself: what a session holds for it
    (mapped files excluded)."""
    total = sum(arr.nbytes for _, arr in model.arrays)
    for t in model.proto.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            continue
        if t.raw_data:
            total += len(t.raw_data)
        else:  # typed fields (small constants written by helper.make_tensor)
            n = int(np.prod(t.dims)) if t.dims else 1
            total += n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total
