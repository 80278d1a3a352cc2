"""Profiles stay valid for the planner even when a busy machine makes samples noisy."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import pytest
import tiny_model
import yaml

from e2llm_edge.device.probe import cpu_share, fit
from e2llm_edge.device.profile import (
    PREFILL_PROBE_BYTES,
    PREFILL_PROBE_LAYERS,
    _fill,
    decode_probe_layers,
    load_or_measure_profile,
    prefill_probe_layers,
    profile_problem,
    save_profile,
    with_message_path,
)
from e2llm_edge.sysinfo import last_level_cache_bytes
from onnx_export.export import export_model
from onnx_export.manifest import Manifest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    tmp = tmp_path_factory.mktemp("tiny")
    tiny_model.write_gguf(tmp / "tiny.gguf")
    return export_model(tmp / "tiny.gguf", tmp / "m", progress=False)


@pytest.fixture(scope="module")
def measured(tiny: Manifest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny model's profile, measured once for the tests that only read it."""
    where = tmp_path_factory.mktemp("profile") / "p.yaml"
    return load_or_measure_profile(tiny, 1, where, ("standard", "fp32"))


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


def test_decode_is_timed_over_more_weights_than_the_cache_holds(
    tiny: Manifest, measured: dict[str, Any]
) -> None:
    """One layer of a small model stays in the CPU's cache; a stage's layers do not."""
    manifest = tiny
    variant = ("standard", "fp32")
    n_layers = int(manifest.config["n_layers"])
    layer = manifest.cost["variants"]["standard/fp32"]["layer_param_bytes"][0]
    assert decode_probe_layers(manifest, variant, 0) == 1  # cache size unknown
    assert decode_probe_layers(manifest, variant, layer // 4) == 1
    assert decode_probe_layers(manifest, variant, layer) == min(2, n_layers)
    assert decode_probe_layers(manifest, variant, 10**12) == n_layers
    assert last_level_cache_bytes() >= 0
    want = decode_probe_layers(manifest, variant, last_level_cache_bytes())
    assert measured["measured"]["decode_layers"] == want


def test_a_profile_from_before_the_cache_fix_is_measured_again(
    tiny: Manifest, measured: dict[str, Any], tmp_path: Path
) -> None:
    where = tmp_path / "profile.yaml"
    older = {**measured, "measured": dict(measured["measured"])}
    del older["measured"]["prefill_layers"]  # prefill timed on one layer
    where.write_text(yaml.safe_dump(older))
    calls: list[str] = []
    again = load_or_measure_profile(
        tiny, 1, where, ("standard", "fp32"), on_measure=lambda: calls.append("m")
    )
    assert calls == ["m"] and "prefill_layers" in again["measured"]


def test_a_prefill_is_timed_over_several_layers_within_a_weight_cap(
    tiny: Manifest, measured: dict[str, Any]
) -> None:
    """A pass's own cost (its inputs, outputs and arena) is shared by its layers: timed
    over one layer it would be counted once per layer of a stage."""
    variant = ("standard", "fp32")
    n_layers = int(tiny.config["n_layers"])
    want = min(n_layers, PREFILL_PROBE_LAYERS)
    assert prefill_probe_layers(tiny, variant, 1) == want
    assert prefill_probe_layers(tiny, variant, n_layers) == n_layers  # the decode probe's
    huge = dataclasses.replace(
        tiny,
        cost={"layer_param_bytes": [PREFILL_PROBE_BYTES] * n_layers},
    )
    assert prefill_probe_layers(huge, variant, 1) == 1
    assert measured["measured"]["prefill_layers"] == prefill_probe_layers(
        tiny, variant, measured["measured"]["decode_layers"]
    )


def test_message_path_fit_separates_the_cost_per_pass_from_the_cost_per_byte() -> None:
    # 0.4 ms per round trip of small messages, 2.4 ms of 1 MB ones, on a 10% share
    small, big = 2304, 1024 * 1024
    per_byte = 2.0e-3 / (2 * (big - small))
    got = fit({small: 0.4e-3, big: 2.4e-3}, share=0.1)
    assert got.io_s_per_mb == pytest.approx(per_byte * 1e6 / 0.1)
    assert got.pass_s == pytest.approx((0.4e-3 - 2 * small * per_byte) / 0.1)
    assert got.cpu_share == 0.1
    # noise that makes big messages look cheaper never gives a negative cost
    flat = fit({small: 0.5e-3, big: 0.4e-3}, share=1.0)
    assert flat.io_s_per_mb == 0.0 and flat.pass_s == pytest.approx(0.5e-3)
    assert 0.0 < cpu_share(0.05) <= 1.0


def test_probed_costs_are_kept_with_the_profile_and_the_planner_reads_them(
    tiny: Manifest, measured: dict[str, Any], tmp_path: Path
) -> None:
    from planner.inventory import Inventory

    manifest = tiny
    where = tmp_path / "profile.yaml"
    prof = with_message_path(measured, 0.002, 1.5, 0.25)
    save_profile(where, prof)
    cached = load_or_measure_profile(manifest, 1, where)
    assert cached["pass_s"] == 0.002 and cached["io_s_per_mb"] == 1.5
    assert cached["measured"]["cpu_share"] == 0.25
    inv = Inventory.from_dict(
        {
            "devices": [
                {
                    "id": "d",
                    "memory_mb": 100,
                    "link": {"bandwidth_mbps": 100, "latency_ms": 1},
                    "profile": {k: v for k, v in cached.items() if k != "measured"},
                }
            ]
        }
    )
    p = inv.devices[0].profile
    assert p is not None and (p.pass_s, p.io_s_per_mb) == (0.002, 1.5)
    assert "pass_s" in (profile_problem({**cached, "pass_s": -1.0}) or "")
