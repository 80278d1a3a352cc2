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

import onnx
from onnx import TensorProto

SHARED = "shared/"
"""Prefix of initializers every segment of a model holds alike (not counted per segment)."""
MAPPED = "mapped/"
"""Prefix of a segment's own tables that are mapped (counted in its weight bytes: at most
that much becomes resident)."""
WEIGHTS_KEY = "e2llm.weights"
"""ONNX metadata_props key where a graph builder records how it stored its weights, as
JSON {"forms": {GGUF type: storage}, "fallbacks": {tensor: why}}; copied into the
manifest's `Segment.weights`."""


def externalize(model: onnx.ModelProto, directory: Path) -> tuple[dict[str, str], int]:
    """Move `SHARED` and `MAPPED` initializers of `model` to files in `directory`; returns
    {file: sha256} and the bytes of the `MAPPED` ones.

    Writes a file only when it is missing (content-addressed), atomically.
    """
    files: dict[str, str] = {}
    mapped = 0
    for t in model.graph.initializer:
        own = t.name.startswith(MAPPED)
        if not (own or t.name.startswith(SHARED)) or t.data_location == TensorProto.EXTERNAL:
            continue
        data = t.raw_data
        digest = hashlib.sha256(data).hexdigest()
        name = f"shared_{digest[:16]}.bin"
        path = directory / name
        if not path.is_file() or path.stat().st_size != len(data):
            tmp = path.with_suffix(".bin.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", name), ("offset", "0"), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        files[name] = digest
        mapped += len(data) if own else 0
    return files, mapped


def inline_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers stored in the model itself: what a session holds for it
    (shared tables excluded: mapped, one copy per device)."""
    total = 0
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            continue
        if t.raw_data:
            total += len(t.raw_data)
        else:  # typed fields (small constants written by helper.make_tensor)
            elem = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            n = 1
            for d in t.dims:
                n *= d
            total += n * elem
    return total
