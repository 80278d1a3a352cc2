"""The exporter end to end on a tiny real GGUF, and every bad input it must name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import numpy_ref as ref
import pytest
import tiny_model

from e2llm_edge.cli import main as cli_main
from e2llm_edge.device.local import LocalModel
from onnx_export.errors import ExportError
from onnx_export.export import export_model, parse_ranges
from onnx_export.manifest import Manifest
from onnx_export.source import load_gguf, load_hf_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path_factory.mktemp("tiny")
    expected = tiny_model.write_gguf(d / "tiny.gguf")
    return d / "tiny.gguf", expected


@pytest.fixture(scope="module")
def exported(tiny: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return export_model(tiny[0], tmp_path_factory.mktemp("out"), ranges="0-2", progress=False)


def test_reader_dequantizes_and_unpermutes(tiny: tuple[Path, dict]) -> None:
    w = load_gguf(tiny[0])
    for name, want in tiny[1].items():
        np.testing.assert_array_equal(w.get(name), want, err_msg=name)


def test_manifest_lists_segments_and_costs(exported: Manifest) -> None:
    m = Manifest.load(exported.directory)
    names = [s.name for s in m.segments]
    std = ["embed", "layer_00", "layer_01", "layer_02", "layers_00_02", "head"]
    # the default export holds the portable graph and the fast exact one
    assert names == [*std, *(f"contrib_exact_{n}" for n in std), "contrib_exact_head_unscreened"]
    seg = m.segment("layers_00_02")
    assert (seg.layer_start, seg.layer_end) == (0, 2)
    ins = {t.name: t for t in seg.inputs}
    assert ins["hidden"].shape == ["batch", "tokens", 64]
    assert ins["past_key_1"].shape == ["batch", 2, "past", 16]
    assert {t.name for t in seg.outputs} >= {"hidden_out", "present_key_0", "present_value_1"}
    for s in m.segments:
        assert m.verify(s).stat().st_size == s.bytes
    cost = m.cost
    assert cost["kv_bytes_per_token_per_layer"] == 2 * 2 * 16 * 4
    assert cost["activation_bytes_per_token"] == 64 * 4
    assert len(cost["layer_param_bytes"]) == 3
    per_layer = 4 * (2 * 64 + 64 * 64 * 2 + 2 * 32 * 64 + 3 * 64 * 96)
    # The bytes each layer's segment holds, for the variant runtimes prefer (the fast one,
    # its Q4_1 matrices quantized); the portable graph's are its fp32 weights and a few
    # graph constants.
    assert cost["variant"] == "contrib/exact"
    assert cost["layer_param_bytes"][0] == m.segment("contrib_exact_layer_00").param_bytes
    fp32 = cost["variants"]["standard/fp32"]["layer_param_bytes"][0]
    assert fp32 == m.segment("layer_00").param_bytes
    assert per_layer <= fp32 <= per_layer + 1024
    assert cost["layer_param_bytes"][0] < fp32 / 2
    tok = json.loads((m.directory / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok["chat_template"]


def test_local_generation_matches_numpy_reference(exported: Manifest, tiny: tuple) -> None:
    """Greedy tokens of the ONNX local path equal a float64 numpy forward of the same weights."""
    w = tiny[1]
    c = {**tiny_model.CFG}
    prompt = [5, 17, 42, 99, 7]
    model = LocalModel(exported.directory)
    got = list(model.generate(prompt, 6, stop_at_eos=False))
    ids = list(prompt)
    for _ in range(6):
        x = w["model.embed_tokens.weight"][ids][None].astype(np.float64)
        pos = np.arange(len(ids))[None]
        mask = np.ones((1, len(ids)), np.int64)
        for i in range(c["n_layers"]):
            p = f"model.layers.{i}."
            lw = {k[len(p) :]: v.astype(np.float64) for k, v in w.items() if k.startswith(p)}
            z = np.zeros((1, c["n_kv_heads"], 0, c["head_dim"]))
            x, _, _ = ref.layer(x, pos, mask, z, z, lw, c)
        h = ref.rms_norm(x[0, -1], w["model.norm.weight"], c["rms_norm_eps"])
        ids.append(int(np.argmax(h @ w["model.embed_tokens.weight"].T)))
    assert got == ids[len(prompt) :]
    per_layer = LocalModel(exported.directory, prefer_ranges=False)
    assert list(per_layer.generate(prompt, 6, stop_at_eos=False)) == got


def test_rerun_is_a_noop_and_ranges_add(tiny: tuple, tmp_path: Path) -> None:
    m1 = export_model(tiny[0], tmp_path, progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    m2 = export_model(tiny[0], tmp_path, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes
    assert [s.sha256 for s in m1.segments] == [s.sha256 for s in m2.segments]
    m3 = export_model(tiny[0], tmp_path, ranges="1-3", progress=False)
    assert "layers_01_03" in [s.name for s in m3.segments]
    assert (tmp_path / "layer_00.onnx").stat().st_mtime_ns == mtimes["layer_00.onnx"]
    assert [s.name for s in m3.cover(0, 3)] == ["layer_00", "layers_01_03"]


def test_an_unchanged_source_is_not_even_opened(
    tiny: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every command that runs a model starts with export_model: with the source's size
    and mtime as recorded, it neither parses nor hashes the GGUF; a touched file is hashed
    once (same bytes: nothing re-exported) and a changed one is exported again."""
    import onnx_export.export as ex

    src = tmp_path / "m.gguf"
    shutil.copy(tiny[0], src)
    out = tmp_path / "out"
    export_model(src, out, progress=False)
    opened: list[Path] = []
    real_open = ex.open_model

    def counting_open(spec: object) -> object:
        opened.append(Path(str(spec)))
        return real_open(spec)  # type: ignore[arg-type]

    monkeypatch.setattr(ex, "open_model", counting_open)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    export_model(src, out, progress=False)
    assert opened == []
    src.touch()
    export_model(src, out, progress=False)
    assert len(opened) == 1
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.suffix == ".onnx"} == {
        n: t for n, t in mtimes.items() if n.endswith(".onnx")
    }
    export_model(src, out, progress=False)
    assert len(opened) == 1, "the new mtime was recorded"
    m = export_model(src, out, ranges="1-3", progress=False)  # asks for more: opened
    assert len(opened) == 2 and "layers_01_03" in [s.name for s in m.segments]
    # same size and mtime but other bytes would fool the check, as it fools make: a real
    # change moves the mtime
    data = bytearray(src.read_bytes())
    data[-1] ^= 1
    src.write_bytes(bytes(data))
    m = export_model(src, out, progress=False)
    assert len(opened) == 3 and m.source["sha256"] != tiny_sha(tiny[0])


def tiny_sha(p: Path) -> str:
    from onnx_export.manifest import sha256_path

    return sha256_path(p)


def test_parse_ranges() -> None:
    assert parse_ranges("0-10,10-30", 30) == [(0, 10), (10, 30)]
    with pytest.raises(ExportError, match="START-END"):
        parse_ranges("0:10", 30)
    with pytest.raises(ExportError, match="0 <= START < END <= 30"):
        parse_ranges("20-40", 30)


def _cli_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert cli_main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_bad_sources_give_one_clear_line(
    tmp_path: Path, tiny: tuple, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.gguf"
    assert str(missing) in _cli_error(capsys, "export", str(missing), "--out", str(tmp_path / "o"))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 definitely not a gguf" * 10)
    line = _cli_error(capsys, "export", str(junk), "--out", str(tmp_path / "o"))
    assert str(junk) in line and "not a GGUF" in line
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(tiny[0].read_bytes()[:5000])
    line = _cli_error(capsys, "export", str(trunc), "--out", str(tmp_path / "o"))
    assert str(trunc) in line
    other = tmp_path / "mamba.gguf"
    tiny_model.write_gguf(other, arch="mamba")
    line = _cli_error(capsys, "export", str(other), "--out", str(tmp_path / "o"))
    assert str(other) in line and "unsupported architecture 'mamba'" in line


def test_corrupted_segment_is_refused(
    exported: Manifest, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(exported.directory, bad)
    seg = bad / "layer_01.onnx"
    data = bytearray(seg.read_bytes())
    data[len(data) // 2] ^= 0xFF
    seg.write_bytes(bytes(data))
    std = ("standard", "fp32")
    with pytest.raises(ExportError, match=r"layer_01\.onnx: sha256 mismatch"):
        LocalModel(bad, prefer_ranges=False, variant=std)
    # the range segment covering layer 1 is intact, so the default path still runs...
    assert list(LocalModel(bad, variant=std).generate([1, 2], 2, stop_at_eos=False))
    emb = bad / "contrib_exact_embed.onnx"
    emb.write_bytes(emb.read_bytes()[:-10] + b"0123456789")
    line = _cli_error(capsys, "generate", "hi", "--model", str(bad), "--max-new-tokens", "1")
    assert "contrib_exact_embed.onnx: sha256 mismatch" in line
    shutil.copy(exported.directory / emb.name, emb)
    (bad / "head.onnx").unlink()
    with pytest.raises(ExportError, match=r"head\.onnx: segment file missing"):
        LocalModel(bad, variant=std)


def test_hf_directory_source(tmp_path: Path) -> None:
    """A Hugging Face directory (safetensors + tokenizer.json) exports to the same model."""
    tiny_model.write_hf_dir(tmp_path, tmp_path / "g")
    g_manifest = Manifest.load(tmp_path / "g" / "from_gguf")
    hf = load_hf_dir(tmp_path)
    assert hf.config.n_kv_heads == 2 and hf.config.tie_word_embeddings
    m = export_model(tmp_path, tmp_path / "from_hf", progress=False)
    prompt = [3, 9, 27]
    a = list(LocalModel(m.directory).generate(prompt, 5, stop_at_eos=False))
    b = list(LocalModel(g_manifest.directory).generate(prompt, 5, stop_at_eos=False))
    assert a == b
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["MambaForCausalLM"]}))
    with pytest.raises(ExportError, match="unsupported architecture"):
        load_hf_dir(tmp_path)


def test_unreadable_tensor_types_and_dtypes_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An integer weight in a GGUF and an int8 safetensors tensor: one line each, nothing
    written."""
    gg = tmp_path / "int.gguf"
    q = tiny_model.hf_weights()["model.layers.1.self_attn.q_proj.weight"]
    tiny_model.write_gguf(gg, raw={"model.layers.1.self_attn.q_proj.weight": q.astype(np.int32)})
    out = tmp_path / "o"
    line = _cli_error(capsys, "export", str(gg), "--out", str(out))
    assert str(gg) in line and "blk.1.attn_q.weight has type I32" in line
    assert not out.exists()
    from safetensors.numpy import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    w = tiny_model.hf_weights()
    w["model.norm.weight"] = w["model.norm.weight"].astype(np.int8)
    save_file(w, str(hf / "model.safetensors"))
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    line = _cli_error(capsys, "export", str(hf), "--out", str(out))
    assert "model.norm.weight has dtype I8" in line and not out.exists()


def test_failed_export_leaves_the_previous_directory(
    tiny: tuple, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure mid-way (here: building the new range) changes nothing: the old directory
    stays as it was and no temporary directory is left beside it."""
    from onnx_export import graph

    out = tmp_path / "m"
    export_model(tiny[0], out, progress=False, graph_name="standard")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    real = graph.layers_model

    def broken(cfg: object, start: int, end: int, *a: object, **k: object) -> object:
        if end - start > 1:
            raise KeyboardInterrupt  # as a person pressing Ctrl-C
        return real(cfg, start, end, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(graph, "layers_model", broken)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny[0], out, ranges="0-2", progress=False, graph_name="standard")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["m"]
    monkeypatch.setattr(graph, "layers_model", real)
    m = export_model(tiny[0], out, ranges="0-2", progress=False, graph_name="standard")
    assert "layers_00_02" in [s.name for s in m.segments]
    assert (out / "layer_00.onnx").stat().st_mtime_ns == before["layer_00.onnx"]  # kept, linked
