"""Profiles stay valid for the planner even when a busy machine makes samples noisy."""

from __future__ import annotations

import itertools
from pathlib import Path

import tiny_model

from e2llm_edge.device.profile import _fill, load_or_measure_profile, profile_problem
from onnx_export.export import export_model


def test_fill_is_non_decreasing_and_non_negative() -> None:
    noisy = {1: 0.008, 2: 0.0066, 4: 0.0068, 8: 0.0050}  # measured on a loaded machine
    out = _fill(noisy, 16)
    assert len(out) == 16
    assert all(b >= a for a, b in itertools.pairwise(out))
    assert min(out) >= 0.0
    rising = _fill({1: 1.0, 2: 2.0, 4: 3.0, 8: 5.0}, 10)
    assert rising[:8] == [1.0, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
    assert rising[8:] == [5.5, 6.0]  # extrapolated with the last slope


def test_profile_problem_names_the_bad_field() -> None:
    good = {
        "prefill_tokens": [16, 64],
        "layer_prefill_s": [0.001, 0.003],
        "layer_decode_s": [0.0005, 0.0006],
        "embed_s": 1e-7,
        "head_prefill_s": 0.002,
        "head_decode_s": [0.002, 0.0025],
        "measured": {"threads": 1},
    }
    assert profile_problem(good) is None
    bad = {**good, "head_decode_s": [0.002, -0.001]}
    problem = profile_problem(bad)
    assert problem is not None and "head_decode_s" in problem


def test_profile_message_only_when_it_measures(tmp_path: Path) -> None:
    """`on_measure` fires when the profile is measured, not when it comes from the cache."""
    tiny_model.write_gguf(tmp_path / "tiny.gguf")
    manifest = export_model(tmp_path / "tiny.gguf", tmp_path / "m", progress=False)
    calls: list[str] = []
    where = tmp_path / "profile.yaml"
    first = load_or_measure_profile(manifest, 1, where, on_measure=lambda: calls.append("m"))
    again = load_or_measure_profile(manifest, 1, where, on_measure=lambda: calls.append("m"))
    assert calls == ["m"] and first == again
