"""A device composes the session of its layer range from the segment files it has
(e2llm_edge/device/ranges.py), on a tiny real GGUF exported in both graph families: the
same outputs as the exported range, weights read in place, nothing written, and every bad
file named."""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import tiny_model
from readonly import readonly_model, snapshot

from e2llm_edge.device.fast_runner import FastLayerStack, contrib_supported, load_stage
from e2llm_edge.device.ranges import INLINE_BYTES, compose
from e2llm_edge.device.runner import LayerStack, Part, Stage, make_session
from onnx_export.errors import ExportError
from onnx_export.export import export_model
from onnx_export.manifest import Manifest

VARIANTS = [("standard", "fp32"), ("contrib", "exact")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny_ranges")
    tiny_model.write_gguf(d / "tiny.gguf")
    out = d / "model"
    for graph, precision in VARIANTS:
        if graph == "contrib" and not contrib_supported():
            continue
        export_model(
            d / "tiny.gguf",
            out,
            ranges="0-2",
            progress=False,
            graph_name=graph,
            precision=precision,
        )
    return out


def _variant(v: tuple[str, str]) -> tuple[str, str]:
    if v[0] == "contrib" and not contrib_supported():
        pytest.skip("this onnxruntime lacks the com.microsoft contrib operators")
    return v


def _stage(m: Manifest, a: int, b: int, v: tuple[str, str], prefer_ranges: bool = True) -> Stage:
    return load_stage(
        m, a, b, v, prefer_ranges=prefer_ranges, context=64 if v[0] == "contrib" else None
    )


def _run(stage: Stage, seed: int = 0) -> np.ndarray:
    """A prefill of 7 tokens and 3 decode steps; every output hidden state."""
    rng = np.random.default_rng(seed)
    cache = stage.new_cache(16)
    outs = [stage.run(rng.normal(0, 1, (1, 7, 64)).astype(np.float32), 0, cache)]
    for _ in range(3):
        outs.append(stage.run(rng.normal(0, 1, (1, 1, 64)).astype(np.float32), cache.length, cache))
    return np.concatenate(outs, axis=1)


def _chained(m: Manifest, a: int, b: int, v: tuple[str, str], longest: bool) -> np.ndarray:
    """Outputs of the old loading: every file of the cover a session of its own, by path."""
    parts = [Part(s.layers, make_session(m.verify(s))) for s in m.cover(a, b, *v, longest=longest)]
    if v[0] == "contrib":
        return _run(FastLayerStack(m, a, b, precision=v[1], max_batch=0, context=64, parts=parts))
    return _run(LayerStack(m, a, b, parts=parts))


@pytest.mark.parametrize("variant", VARIANTS, ids=["standard", "contrib"])
def test_composed_range_equals_the_exported_range_and_the_chain(
    tiny_dir: Path, variant: tuple[str, str]
) -> None:
    """Standard graph: the range composed from per-layer files gives the exported range's
    bits. Contrib: the exported range fuses each layer's last residual add into the next
    layer's norm (SkipSimplifiedLayerNormalization), per-layer files cannot, so composed
    equals the chain of per-layer sessions bit for bit and the range within rounding."""
    v = _variant(variant)
    m = Manifest.load(tiny_dir)
    composed = _run(_stage(m, 0, 2, v, prefer_ranges=False))
    exported = _chained(m, 0, 2, v, longest=True)
    np.testing.assert_array_equal(composed, _chained(m, 0, 2, v, longest=False))
    if v[0] == "standard":
        np.testing.assert_array_equal(composed, exported)
    else:
        np.testing.assert_allclose(composed, exported, rtol=1e-5, atol=1e-5)
    # the exported range through the in-place loader: its own bits
    np.testing.assert_array_equal(_run(_stage(m, 0, 2, v, prefer_ranges=True)), exported)
    # a cover mixing an exported range and a per-layer file
    assert [s.layers for s in m.cover(0, 3, *v)] == [range(0, 2), range(2, 3)]
    np.testing.assert_array_equal(_run(_stage(m, 0, 3, v)), _chained(m, 0, 3, v, longest=True))


@pytest.mark.parametrize("variant", VARIANTS, ids=["standard", "contrib"])
def test_weights_stay_in_the_segment_files(tiny_dir: Path, variant: tuple[str, str]) -> None:
    v = _variant(variant)
    m = Manifest.load(tiny_dir)
    segs = m.cover(0, 3, *v, longest=False)
    graph, folder = compose(m, segs)
    assert folder == tiny_dir.resolve()
    model = onnx.load_model_from_string(graph)
    inline = [t for t in model.graph.initializer if t.HasField("raw_data")]
    external = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) <= INLINE_BYTES for t in inline)
    assert external
    for t in external:  # every reference points at exactly the bytes of that initializer
        ref = dict((e.key, e.value) for e in t.external_data)
        seg = next(s for s in segs if s.file == ref["location"])
        src = onnx.load(str(m.path(seg)))
        original = {f"{seg.name}/{x.name}": x.raw_data for x in src.graph.initializer}
        data = m.path(seg).read_bytes()[int(ref["offset"]) :][: int(ref["length"])]
        assert data == original[t.name]
    names = [t.name for t in model.graph.initializer]
    assert len(names) == len(set(names))
    if v[0] == "contrib":  # the rotary tables every layer file carries: kept once
        assert sum(n.endswith("rope.cos") for n in names) == 1
    assert model.graph.output[0].name == "hidden_out"
    assert {i.name for i in model.graph.input} >= {"hidden", "past_key_0", "past_value_2"}


def test_a_read_only_model_directory_is_enough_and_nothing_is_written(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("E2LLM_CACHE", str(cache))
    m = Manifest.load(tiny_dir)
    with readonly_model(m, lambda s: s.name != "layers_00_02", tmp_path / "ro") as ro:
        before = snapshot(ro)
        rom = Manifest.load(ro)
        assert "layers_00_02" not in [s.name for s in rom.segments]
        for a, b in [(0, 1), (0, 2), (1, 3), (0, 3), (2, 3)]:
            np.testing.assert_array_equal(
                _run(_stage(rom, a, b, ("standard", "fp32"))),
                _chained(m, a, b, ("standard", "fp32"), longest=True),
            )
        assert snapshot(ro) == before
    assert list(cache.iterdir()) == []


def test_bad_files_are_named(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    m = Manifest.load(d)
    v = ("standard", "fp32")
    seg = m.segment("layer_01")
    data = bytearray(m.path(seg).read_bytes())
    data[len(data) // 2] ^= 0xFF  # a weight byte: same size, different content
    m.path(seg).write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"layer_01\.onnx: sha256 mismatch"):
        _stage(m, 0, 3, v, prefer_ranges=False)
    m.path(seg).write_bytes(bytes(data[:-10]))
    with pytest.raises(ExportError, match=r"layer_01\.onnx: size \d+ != manifest's"):
        _stage(m, 0, 3, v, prefer_ranges=False)
    m.path(seg).unlink()
    with pytest.raises(ExportError, match=r"layer_01\.onnx: segment file missing"):
        _stage(m, 0, 3, v, prefer_ranges=False)
    with pytest.raises(ExportError, match="not contiguous"):
        compose(m, [m.segment("layer_00"), m.segment("layer_02")])
    # files that match the manifest but onnxruntime refuses, or are no model at all
    shutil.copyfile(tiny_dir / "layer_01.onnx", m.path(seg))
    bad = onnx.load(str(m.path(m.segment("layer_02"))))
    bad.graph.node[0].op_type = "NoSuchOperator"
    cases = [
        ("layer_02", bad.SerializeToString(), r"layer_00\.onnx \.\. layer_02\.onnx: onnxruntime"),
        ("layer_01", b"\xff" * 64, r"layer_01\.onnx: not an ONNX model"),
    ]
    for name, data, error in cases:
        m.path(m.segment(name)).write_bytes(data)
        m.segments = [
            dataclasses.replace(s, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
            if s.name == name
            else s
            for s in m.segments
        ]
        with pytest.raises(ExportError, match=error):
            _stage(m, 0, 3, v, prefer_ranges=False)


def test_segment_files_linked_from_one_other_folder(tiny_dir: Path, tmp_path: Path) -> None:
    """Files that are symlinks into one store (as in a Hugging Face cache) load: onnxruntime
    refuses external data outside its folder, so the folder is where the files resolve."""
    store, d = tmp_path / "store", tmp_path / "m"
    shutil.copytree(tiny_dir, store)
    d.mkdir()
    for f in store.iterdir():
        (d / f.name).symlink_to(f)
    m = Manifest.load(d)
    v = ("standard", "fp32")
    np.testing.assert_array_equal(
        _run(_stage(m, 0, 3, v, prefer_ranges=False)), _chained(m, 0, 3, v, longest=False)
    )
    (d / "layer_02.onnx").unlink()
    shutil.copyfile(store / "layer_02.onnx", d / "layer_02.onnx")
    with pytest.raises(ExportError, match="resolve to 2 folders"):
        compose(m, m.cover(0, 3, *v, longest=False))
