"""A pinned plan that exercises the awkward paths, on the fast contrib graph (exact mode):
the PREFILL and DECODER replicas split layers differently (so each prefill device hands
its KV to two decoder devices), the decoder embeds on its last stage next to the head,
and the decoder batches its requests. Output must still equal transformers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2llm_edge.client import Client, collect
from e2llm_edge.device.local import LocalModel
from e2llm_edge.ops.broker import MosquittoBroker
from e2llm_edge.ops.localcluster import LocalCluster

pytestmark = [pytest.mark.model, pytest.mark.mosquitto, pytest.mark.slow]

PLAN = {
    "version": 1,
    "method": "pinned",
    "n_layers": 30,
    "predicted": {},
    "replicas": [
        {
            "replica_id": 0,
            "role": "prefill",
            "concurrency": 1,
            "stages": [
                {
                    "device_id": "p0",
                    "layer_start": 0,
                    "layer_end": 12,
                    "embed": True,
                    "head": False,
                    "predicted_prefill_s": 0.1,
                    "predicted_decode_s": 0.01,
                },
                {
                    "device_id": "p1",
                    "layer_start": 12,
                    "layer_end": 30,
                    "embed": False,
                    "head": True,
                    "predicted_prefill_s": 0.1,
                    "predicted_decode_s": 0.01,
                },
            ],
        },
        {
            "replica_id": 1,
            "role": "decoder",
            "concurrency": 4,
            "stages": [
                {
                    "device_id": "d0",
                    "layer_start": 0,
                    "layer_end": 20,
                    "embed": False,
                    "head": False,
                    "predicted_prefill_s": 0.1,
                    "predicted_decode_s": 0.01,
                },
                {
                    "device_id": "d1",
                    "layer_start": 20,
                    "layer_end": 30,
                    "embed": True,
                    "head": True,
                    "predicted_prefill_s": 0.1,
                    "predicted_decode_s": 0.01,
                },
            ],
        },
    ],
}


@pytest.fixture(scope="module")
def pinned(
    mosquitto: MosquittoBroker, default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    plan = tmp_path_factory.mktemp("plan") / "plan.yaml"
    plan.write_text(yaml.safe_dump(PLAN))
    inv = {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": d, "memory_mb": 2000, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
            for d in ("p0", "p1", "d0", "d1")
        ],
    }
    with LocalCluster(
        default_model,
        inv,
        broker_url=mosquitto.url,
        cluster="pinned",
        orchestrator_args=["--plan", str(plan)],
        agent_args=["--graph", "contrib", "--precision", "exact"],
    ) as c:
        got = c.wait_serving(timeout=180)
        assert [len(r.stages) for r in got.replicas] == [2, 2]
        yield c


def expected(case: dict[str, Any]) -> list[int]:
    ids = case["new_ids"]
    return ids[: ids.index(2) + 1] if 2 in ids else ids


async def test_contrib_graph_matches_transformers(
    pinned: LocalCluster, reference: dict[str, Any]
) -> None:
    cases = [
        c for c in reference["cases"] if c["name"] in ("chat_capital", "chat_long", "raw_code")
    ]
    async with Client(pinned.bus_config()) as client:
        for case in cases:
            got = await collect(
                client,
                case["prompt"],
                raw=case["raw"],
                max_new_tokens=reference["max_new_tokens"],
                timeout=60,
            )
            assert got["new_ids"] == expected(case), case["name"]


async def test_batched_decoder_matches_local(pinned: LocalCluster, default_model: Path) -> None:
    prompts = [f"Count from {n} to {n + 5}." for n in range(4)]
    local = LocalModel(default_model, variant=("contrib", "exact"))
    async with Client(pinned.bus_config()) as client:
        results = await asyncio.gather(
            *[collect(client, p, max_new_tokens=20, timeout=120) for p in prompts]
        )
    for p, r in zip(prompts, results, strict=True):
        assert r["new_ids"] == list(local.generate(r["prompt_ids"], 20)), p
    tel = await pinned.telemetry(["d0", "d1"], timeout=15)
    # the decoder ran its requests together: fewer passes than steps
    assert tel["d0"].decode_batches < tel["d0"].decode_steps, tel["d0"]
