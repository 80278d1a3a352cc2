"""On the real default model: a device loads the session of a layer range it has no range
file for, from a read-only model directory (e2llm_edge/device/ranges.py composes it from the
per-layer files), gets the outputs of the exported range, writes nothing anywhere, and its
memory does not grow with the number of ranges it has loaded."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from readonly import readonly_model, snapshot

from e2llm_edge.device.fast_runner import (
    FastLayerStack,
    VariantEmbedder,
    contrib_supported,
    load_stage,
)
from e2llm_edge.device.runner import LayerStack, Part, Stage, make_session
from onnx_export.manifest import Manifest, Segment

pytestmark = pytest.mark.model

VARIANTS = [("standard", "fp32"), ("contrib", "exact")]
END = 15  # the default model is exported with the ranges 0-15 and 15-30


@pytest.fixture(scope="module")
def readonly(default_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The per-layer segments of layers [0, 15) of both variants, no range file, read-only."""

    def keep(s: Segment) -> bool:
        return (s.graph, s.precision) in VARIANTS and len(s.layers) == 1 and s.layers.start < END

    with readonly_model(Manifest.load(default_model), keep, tmp_path_factory.mktemp("ro")) as d:
        yield d


def _variant(v: tuple[str, str]) -> tuple[str, str]:
    if v[0] == "contrib" and not contrib_supported():
        pytest.skip("this onnxruntime lacks the com.microsoft contrib operators")
    return v


def _by_path(m: Manifest, v: tuple[str, str], longest: bool) -> Stage:
    """Layers [0, 15) loaded as before: every file of the cover by path, one session each."""
    parts = [
        Part(s.layers, make_session(m.verify(s))) for s in m.cover(0, END, *v, longest=longest)
    ]
    if v[0] == "contrib":
        return FastLayerStack(m, 0, END, precision=v[1], max_batch=0, context=256, parts=parts)
    return LayerStack(m, 0, END, parts=parts)


def _run(stage: Stage, embed: Any, prompt: list[int]) -> np.ndarray:
    """The prompt, then 8 tokens one by one; every hidden state out of the stage."""
    cache = stage.new_cache(len(prompt) + 8)
    outs = [stage.run(embed.run(np.asarray([prompt], np.int64)), 0, cache)]
    for t in prompt[:8]:
        outs.append(stage.run(embed.run(np.asarray([[t]], np.int64)), cache.length, cache))
    return np.concatenate(outs, axis=1)


@pytest.mark.parametrize("variant", VARIANTS, ids=["standard", "contrib-exact"])
def test_a_range_without_its_file_equals_the_exported_range(
    default_model: Path, readonly: Path, reference: dict[str, Any], variant: tuple[str, str]
) -> None:
    """Standard graph: bit for bit. Contrib: the exported range fuses each layer's last
    residual add into the next layer's norm, which per-layer files cannot; the composed
    range equals the chained per-layer sessions bit for bit, and the range to rounding."""
    v = _variant(variant)
    m, ro = Manifest.load(default_model), Manifest.load(readonly)
    assert [s.layers for s in m.cover(0, END, *v)] == [range(0, END)]  # the exported range
    assert all(len(s.layers) == 1 for s in ro.segments)  # the device has no range file
    embed = VariantEmbedder(m, v)
    prompt = next(c for c in reference["cases"] if c["name"] == "chat_capital")["prompt_ids"]
    got = _run(load_stage(ro, 0, END, v, context=256), embed, prompt)
    exported = _run(_by_path(m, v, longest=True), embed, prompt)
    if v[0] == "standard":
        np.testing.assert_array_equal(got, exported)
    else:
        np.testing.assert_array_equal(got, _run(_by_path(m, v, longest=False), embed, prompt))
        scale = float(np.abs(exported).max())
        np.testing.assert_allclose(got, exported, rtol=0, atol=1e-5 * scale)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_many_ranges_write_nothing_and_memory_does_not_grow(
    readonly: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing is cached: the device's cache directory stays empty and the model directory
    unchanged, whatever ranges come; the memory a range holds while loaded is the same after
    many others were loaded and dropped."""
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("E2LLM_CACHE", str(cache))
    before = snapshot(readonly)
    ro = Manifest.load(readonly)
    v = ("standard", "fp32")

    def loaded_rss(a: int, b: int, variant: tuple[str, str] = v) -> float:
        stage = load_stage(ro, a, b, variant, context=64)
        rss = _rss_mb()
        del stage
        gc.collect()
        return rss

    first = loaded_rss(0, END)
    variants = [v, ("contrib", "exact")] if contrib_supported() else [v]
    for a, b in [(3, 9), (1, 14), (5, 15), (0, 7), (2, 13), (4, 11), (0, 1), (14, 15)]:
        for var in variants:
            loaded_rss(a, b, var)
    last = loaded_rss(0, END)
    weights_mb = sum(s.bytes for s in ro.cover(0, END, *v)) / 2**20
    assert last - first < 0.1 * weights_mb, (first, last, weights_mb)
    assert snapshot(readonly) == before
    assert list(cache.iterdir()) == []
