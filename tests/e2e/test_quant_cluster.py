"""A quantized model too big for any one device: a 4-agent cluster whose memory budgets
make every replica span at least two devices serves a small qwen2 model stored like
llama.cpp's Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0 mixed within q/k/v), with the contrib graph in
exact precision, and answers token for token like the local path. The planner sizes the
stages from the manifest's per-layer bytes, which are what the segments hold. The real
Qwen2.5-Coder-0.5B runs the same way in `bench/real_models.py`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import quant_model

from e2llm_edge.client import Client, collect
from e2llm_edge.device.local import LocalModel
from e2llm_edge.ops.broker import MosquittoBroker
from e2llm_edge.ops.localcluster import LocalCluster
from onnx_export.export import export_model
from onnx_export.manifest import Manifest
from planner import Plan

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

N_LAYERS = 4
VARIANT = ("contrib", "exact")
PROMPTS = [[5, 17, 42, 99, 7, 250, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [200, 100, 50]]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("q4km")
    quant_model.write_quant_gguf(
        d / "tiny-qwen2.gguf",
        arch="qwen2",
        n_layers=N_LAYERS,
        embed_type="Q5_0",
        head_type="Q8_0",
        roles=quant_model.Q4_K_M,
        variants=[{}, {"attn_v": "Q5_0", "ffn_down": "Q4_K"}],  # llama.cpp alternates
    )
    return export_model(
        d / "tiny-qwen2.gguf", d / "model", ranges=f"0-{N_LAYERS}", progress=False,
        graph_name=VARIANT[0], precision=VARIANT[1],
    ).directory  # fmt: skip


@pytest.fixture(scope="module")
def live(mosquitto: MosquittoBroker, model_dir: Path) -> Iterator[LocalCluster]:
    cost = Manifest.load(model_dir).cost
    assert cost["variant"] == "contrib/exact"
    total = sum(cost["layer_param_bytes"]) + cost["embed_param_bytes"] + cost["head_param_bytes"]
    # no device holds the model; two together do, with the KV cache the planner sizes for
    # its workload's peak context (a few hundred tokens at these means)
    kv = cost["kv_bytes_per_token_per_layer"] * N_LAYERS * 128
    budget_mb = (0.6 * total + kv) / 1e6
    inv = {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": f"q{i}", "memory_mb": budget_mb, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
            for i in range(4)
        ],
    }
    with LocalCluster(
        model_dir,
        inv,
        broker_url=mosquitto.url,
        cluster="quant",
        orchestrator_args=["--mean-prompt", "16", "--mean-output", "16"],
        agent_args=["--graph", VARIANT[0], "--precision", VARIANT[1]],
    ) as c:
        c.plan = c.wait_serving(timeout=180)  # type: ignore[attr-defined]
        yield c


def test_every_replica_spans_two_devices(live: LocalCluster) -> None:
    plan: Plan = live.plan  # type: ignore[attr-defined]
    assert plan.replicas and all(len(r.stages) >= 2 for r in plan.replicas), plan


async def test_answers_equal_the_local_path(live: LocalCluster, model_dir: Path) -> None:
    local = LocalModel(model_dir, variant=VARIANT)
    async with Client(live.bus_config()) as client:
        for ids in PROMPTS:
            want = list(local.generate(ids, 12))
            got = await collect(client, prompt_ids=ids, max_new_tokens=12, timeout=60)
            assert got["new_ids"] == want, ids
