"""Model costs from a manifest and from a description."""

from __future__ import annotations

from typing import Any

import pytest
from planner_factories import MB, tiny_model

from planner import ModelSpec
from planner.errors import ModelSpecError
from planner.sim.paper import paper_model


def manifest(**cost_changes: Any) -> dict[str, Any]:
    cost = {
        "layer_param_bytes": [3_500_000] * 30,
        "embed_param_bytes": 28_311_552,
        "head_param_bytes": 28_312_704,
        "kv_bytes_per_token_per_layer": 1536,
        "activation_bytes_per_token": 2304,
        "layer_flops_per_token": [7_000_000] * 30,
        "head_flops_per_token": 56_623_104,
    }
    cost.update(cost_changes)
    return {
        "name": "smollm2-135m",
        "config": {
            "n_layers": 30,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "n_heads": 9,
            "n_kv_heads": 3,
            "head_dim": 64,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
        },
        "cost": cost,
    }


def test_from_manifest_reads_config_and_cost() -> None:
    m = ModelSpec.from_manifest(manifest())
    assert m.n_layers == 30 and m.tie_word_embeddings
    assert m.kv_bytes_per_token_per_layer == 1536
    # tied: a device with both embedding and head pays for the shared weight once
    assert m.edge_bytes(embed=True, head=True) == 28_312_704
    assert m.edge_bytes(embed=True, head=False) == 28_311_552
    assert m.total_param_bytes == 30 * 3_500_000 + 28_312_704


def test_untied_pays_both() -> None:
    m = tiny_model(tied=False)
    assert m.edge_bytes(embed=True, head=True) == 60 * MB


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer_param_bytes": [1] * 29}, "layer_param_bytes must have n_layers=30 entries"),
        ({"kv_bytes_per_token_per_layer": -1}, "kv_bytes_per_token_per_layer must be a number"),
        ({"layer_flops_per_token": "many"}, "layer_flops_per_token must be a non-empty list"),
    ],
)
def test_manifest_errors_name_the_field(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        ModelSpec.from_manifest(manifest(**changes))


def test_paper_model_is_about_20b_and_moe() -> None:
    m = paper_model()
    assert m.n_layers == 24
    # about 21 B parameters: weights ~13.7 GB with MXFP4 experts
    assert 13e9 < m.total_param_bytes < 14.5e9
    # ~3.6 B active parameters, 0.58 B of them the embedding: the rest over 24 layers
    assert m.layer_flops_per_token[0] == pytest.approx(2 * (3.6e9 - 0.58e9) / 24, rel=0.05)
    # a decode step of one token touches 4 of 32 experts; a big batch nearly all
    one, many = m.decode_weight_bytes(0, 1), m.decode_weight_bytes(0, 64)
    assert one < many <= m.layer_param_bytes[0]
    assert many == pytest.approx(m.layer_param_bytes[0], rel=0.01)


def test_description_validation() -> None:
    with pytest.raises(ModelSpecError, match="n_layers must be a positive integer"):
        ModelSpec.from_description(
            n_layers=0,
            hidden_size=8,
            intermediate_size=8,
            n_heads=1,
            n_kv_heads=1,
            head_dim=8,
            vocab_size=10,
        )
    with pytest.raises(ModelSpecError, match="experts_per_token must be <= n_experts"):
        ModelSpec.from_description(
            n_layers=2,
            hidden_size=8,
            intermediate_size=8,
            n_heads=1,
            n_kv_heads=1,
            head_dim=8,
            vocab_size=10,
            n_experts=2,
            experts_per_token=3,
        )


def test_sliding_layers_count_their_window_of_kv() -> None:
    """A sliding layer holds min(context, window) of a request's KV: in what one request
    hands over, in a stage's memory (at the workload's mean context), in the KV a replica
    can hold, and in what a decode step reads; the paper's gpt-oss-20b slides every other
    layer over 128 positions."""
    from dataclasses import replace

    from planner_factories import hardware_device

    from planner import Inventory
    from planner.costs import CostModel, Layout
    from planner.workload import Workload

    full = tiny_model(n_layers=4)
    slide = replace(full, layer_kv_window=(100, 0, 100, 0))
    kv = full.kv_bytes_per_token_per_layer
    assert slide.request_kv_bytes(1000) == kv * (100 + 1000 + 100 + 1000)
    assert slide.request_kv_bytes(60, 0, 1) == kv * 60  # within the window: all of it
    assert slide.request_kv_bytes(1000, 0, 1) == kv * 100
    assert full.request_kv_bytes(1000) == kv * 4000
    inv = Inventory.from_dict({"devices": [hardware_device("a", 900, 1.0, 10.0)]})
    wl = Workload(mean_prompt_tokens=600, mean_output_tokens=400, arrival_rate_rps=1.0)
    lay = Layout(devices=(0,), bounds=(0, 4), embed_last=False)
    c_full, c_slide = CostModel(inv, full, wl), CostModel(inv, slide, wl)
    assert c_slide.kv_bytes(0, 4) == pytest.approx(kv * (2 * 100 / 1000 + 2))
    mem_full = c_full.stage_memory(lay, kv_tokens=5000, pass_tokens=1)[0]
    mem_slide = c_slide.stage_memory(lay, kv_tokens=5000, pass_tokens=1)[0]
    assert mem_full - mem_slide == pytest.approx(5000 * kv * 2 * 0.9)
    assert c_slide.kv_budget_tokens(lay, 1) > c_full.kv_budget_tokens(lay, 1)
    send, _ = c_slide.kv_flows(lay, lay, 1000)
    assert send[0] == slide.request_kv_bytes(1000)
    # a decode step reads a sliding layer's window, not the whole context
    assert c_slide.decode_layers(0, 1)[0] < c_slide.decode_layers(0, 1)[1]
    paper = paper_model()
    assert paper.layer_kv_window == (128, 0) * 12
    assert paper.request_kv_bytes(4096) == paper.kv_bytes_per_token_per_layer * 12 * (128 + 4096)


def test_sliding_layers_must_name_layers_of_the_model() -> None:
    bad = manifest()
    bad["config"].update(sliding_window=4, sliding_layers=[0, 30])
    with pytest.raises(ModelSpecError, match=r"sliding_layers must list layers in \[0, 30\)"):
        ModelSpec.from_manifest(bad)
