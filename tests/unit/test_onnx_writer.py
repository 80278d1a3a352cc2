"""The streaming ONNX writer: the file it writes is the model onnx itself would write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from onnx_export.graph import GraphBuilder
from onnx_export.manifest import sha256_path
from onnx_export.onnx_writer import DEFERRED_BYTES


def build(spill: bool = False) -> tuple[GraphBuilder, dict[str, np.ndarray]]:
    g = GraphBuilder("w", spill=spill)
    x = g.add_input("x", TensorProto.FLOAT, ["n", 300])
    rng = np.random.default_rng(0)
    big = rng.normal(size=(300, 200)).astype(np.float32)  # streamed
    small = rng.normal(size=(200,)).astype(np.float32)  # kept in the proto
    ints = np.arange(DEFERRED_BYTES // 8 + 5, dtype=np.int64)  # streamed, another dtype
    y = g.op("Add", [g.op("MatMul", [x, g.init("big", big)]), g.init("small", small)])
    n = g.op("Gather", [g.init("ints", ints), g.const([0, 1])], axis=0)
    g.add_output("y", y, TensorProto.FLOAT, ["n", 200])
    g.add_output("n", n, TensorProto.INT64, [2])
    return g, {"big": big, "small": small, "ints": ints}


def test_streamed_file_equals_the_in_memory_model(tmp_path: Path) -> None:
    g, arrays = build()
    big, small, ints = arrays["big"], arrays["small"], arrays["ints"]
    seg = g.segment(("com.microsoft", 1))
    assert [name for name, _ in seg.arrays] == ["big", "ints"]
    digest, size = seg.save(tmp_path / "m.onnx")
    assert (digest, size) == (
        sha256_path(tmp_path / "m.onnx"),
        (tmp_path / "m.onnx").stat().st_size,
    )
    loaded = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(loaded)
    inits = {t.name: numpy_helper.to_array(t) for t in loaded.graph.initializer}
    np.testing.assert_array_equal(inits["big"], big)
    np.testing.assert_array_equal(inits["ints"], ints)
    np.testing.assert_array_equal(inits["small"], small)
    assert {o.domain for o in loaded.opset_import} == {"", "com.microsoft"}
    assert loaded.graph.node == seg.to_proto().graph.node


def test_spilled_arrays_write_the_same_file(tmp_path: Path) -> None:
    """A layer range spills its arrays to temporary files as they are made (read back
    when saved): same file, byte for byte, and the arrays are no longer in the heap."""
    g, _ = build(spill=True)
    spilled = dict(g.arrays)
    assert set(spilled) == {"big", "ints"}
    assert not any(a.flags.writeable or a.flags.owndata for a in spilled.values())
    got = g.segment(("com.microsoft", 1)).save(tmp_path / "spilled.onnx")
    want = build()[0].segment(("com.microsoft", 1)).save(tmp_path / "kept.onnx")
    assert got == want
