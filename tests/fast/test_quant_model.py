"""A tiny model holding every GGUF type (K-quants, IQ4, mixed q/k/v and gate/up), exported
to the contrib graph: its exact precision gives the greedy tokens of a float64 numpy
forward of gguf's dequantized weights, every type stays quantized (the manifest says how),
nothing falls back to fp32, and each layer holds about its GGUF bytes (measured ratio)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import numpy_ref as ref
import onnx
import pytest
import quant_model
from gguf import GGUFReader

from e2llm_edge.device.fast_runner import contrib_supported
from e2llm_edge.device.local import LocalModel
from e2llm_edge.device.ranges import compose
from onnx_export import quant
from onnx_export.errors import ExportError
from onnx_export.export import export_model
from onnx_export.manifest import Manifest

pytestmark = pytest.mark.skipif(not contrib_supported(), reason="no com.microsoft contrib ops")

CFG = {"n_heads": 4, "n_kv_heads": 2, "head_dim": 64, "rope_theta": 10000.0, "rms_norm_eps": 1e-6}
N_LAYERS = 3


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Manifest, dict[str, np.ndarray]]:
    d = tmp_path_factory.mktemp("kquant")
    w = quant_model.write_quant_gguf(d / "tiny.gguf", n_layers=N_LAYERS)
    for precision in ("exact", "int8"):
        m = export_model(
            d / "tiny.gguf", d / "out", ranges=f"0-{N_LAYERS}", progress=False,
            graph_name="contrib", precision=precision,
        )  # fmt: skip
    return m, w


def numpy_greedy(w: dict[str, np.ndarray], prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        x = w["model.embed_tokens.weight"][ids][None].astype(np.float64)
        pos = np.arange(len(ids))[None]
        mask = np.ones((1, len(ids)), np.int64)
        for i in range(N_LAYERS):
            p = f"model.layers.{i}."
            lw = {k[len(p) :]: v.astype(np.float64) for k, v in w.items() if k.startswith(p)}
            z = np.zeros((1, CFG["n_kv_heads"], 0, CFG["head_dim"]))
            x, _, _ = ref.layer(x, pos, mask, z, z, lw, CFG)
        h = ref.rms_norm(x[0, -1], w["model.norm.weight"], CFG["rms_norm_eps"])
        ids.append(int(np.argmax(h @ w["lm_head.weight"].astype(np.float64).T)))
    return ids[len(prompt) :]


def test_every_type_is_stored_quantized(model: tuple[Manifest, dict]) -> None:
    m, _ = model
    forms: dict[str, str] = {}
    for s in m.segments:
        assert s.weights is None or not s.weights["fallbacks"], s.name
        if s.precision == "exact" and s.weights:
            forms.update(s.weights["forms"])
    # MXFP4 exists only as gpt-oss experts (3-D tensors): tests/unit/test_gpt_oss.py
    # checks how they are stored
    assert set(forms) == set(quant_model.SCALE_FIELDS) == set(quant.LAYOUTS) - {"MXFP4"} | {"IQ3_S"}
    assert all(f.startswith("MatMulNBits 4-bit") for f in forms.values())
    assert forms["IQ3_S"].endswith("re-encoded")


def test_exact_greedy_tokens_equal_the_float64_reference(model: tuple[Manifest, dict]) -> None:
    m, w = model
    prompt = [5, 17, 42, 99, 7, 250, 3]
    want = numpy_greedy(w, prompt, 8)
    local = LocalModel(m.directory, variant=("contrib", "exact"))
    assert list(local.generate(prompt, 8, stop_at_eos=False)) == want
    # the same layers composed in place from the per-layer files (shared tables and all)
    per_layer = LocalModel(m.directory, variant=("contrib", "exact"), prefer_ranges=False)
    assert list(per_layer.generate(prompt, 8, stop_at_eos=False)) == want
    int8 = LocalModel(m.directory, variant=("contrib", "int8"))
    got = list(int8.generate(prompt, 8, stop_at_eos=False))
    assert got[0] == want[0]  # int8 activations: the first token at least; drift allowed


def test_a_composed_range_maps_each_shared_table_once(model: tuple[Manifest, dict]) -> None:
    """Composing per-layer quantized segments (e2llm_edge/device/ranges.py) keeps their
    weights where they lie and references each shared file (RoPE caches) once, by its
    verified name: one mapping per device, not one per layer."""
    m, _ = model
    segs = m.cover(0, N_LAYERS, "contrib", "exact", longest=False)
    shared = {f for s in segs for f in s.data}
    assert shared and shared <= set(m.data_files)
    graph, folder = compose(m, segs)
    refs = [
        {e.key: e.value for e in t.external_data}
        for t in onnx.load_model_from_string(graph).graph.initializer
        if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    in_shared = [r["location"] for r in refs if r["location"] in shared]
    assert sorted(in_shared) == sorted(shared)  # each once
    assert {r["location"] for r in refs} == shared | {s.file for s in segs}
    assert all((folder / r["location"]).is_file() for r in refs)


def test_a_missing_or_corrupted_shared_table_is_named(
    model: tuple[Manifest, dict], tmp_path: Path
) -> None:
    m, _ = model
    d = tmp_path / "m"
    shutil.copytree(m.directory, d)
    copy = Manifest.load(d)
    segs = copy.cover(0, N_LAYERS, "contrib", "exact", longest=False)
    table = d / segs[0].data[0]
    table.write_bytes(table.read_bytes()[::-1])
    with pytest.raises(ExportError, match=rf"{table.name}: sha256 mismatch \(corrupted shared"):
        compose(copy, segs)
    table.unlink()
    with pytest.raises(ExportError, match=rf"{table.name}: shared data file missing"):
        compose(Manifest.load(d), segs)


def test_layer_bytes_follow_the_types(model: tuple[Manifest, dict]) -> None:
    """The manifest's per-layer bytes are what the segments hold: in exact precision about
    1.4-1.9x the GGUF bytes (4-bit codes and fp32 block scales; see quant.py), not the 7x of
    fp32 weights."""
    m, _ = model
    reader = GGUFReader(m.source["path"])
    for i in range(N_LAYERS):
        gguf_bytes = sum(t.n_bytes for t in reader.tensors if t.name.startswith(f"blk.{i}."))
        held = m.cost["variants"]["contrib/exact"]["layer_param_bytes"][i]
        assert m.cost["layer_param_bytes"][i] == held
        assert 1.2 * gguf_bytes < held < 2.0 * gguf_bytes, (i, held / gguf_bytes)
