"""gpt-oss across devices: a 4-agent cluster whose memory budgets make every replica span
two devices serves a tiny gpt-oss (MXFP4 experts as exact 4-bit parts, attention sinks, sliding
layers of a 4-token window alternating with full ones) in the contrib graph, with a PREFILL
and a DECODER replica: the prompt's KV (sliding layers included) moves from one to the
other, and every answer equals the local path's token for token, for prompts several times
the window."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import arch_models

from e2llm_edge.client import Client, collect
from e2llm_edge.device.local import LocalModel
from e2llm_edge.ops.broker import MosquittoBroker
from e2llm_edge.ops.localcluster import LocalCluster, pinned_prefill_decoder
from onnx_export.export import export_model
from onnx_export.manifest import Manifest
from planner import Plan

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

N_LAYERS = 4
VARIANT = ("contrib", "exact")
PROMPTS = [[5, 17, 42, 99, 7, 250, 3, 8, 9, 10, 11], [1, 2, 3], list(range(20, 45))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gpt-oss")
    model = arch_models.reference_model("gpt-oss", layers=N_LAYERS)
    arch_models.write_gguf(model, "gpt-oss", d / "tiny-gpt-oss.gguf", "MXFP4")
    return export_model(
        d / "tiny-gpt-oss.gguf", d / "model", progress=False, variants=[VARIANT]
    ).directory


@pytest.fixture(scope="module")
def live(mosquitto: MosquittoBroker, model_dir: Path) -> Iterator[LocalCluster]:
    cost = Manifest.load(model_dir).cost
    total = sum(cost["layer_param_bytes"]) + cost["embed_param_bytes"] + cost["head_param_bytes"]
    budget_mb = 0.75 * total / 1e6  # no device holds the model; two together do
    inv = {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": f"m{i}", "memory_mb": budget_mb, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
            for i in range(4)
        ],
    }
    with LocalCluster(
        model_dir,
        inv,
        broker_url=mosquitto.url,
        cluster="moe",
        # a workload like the prompts below: the KV of a 256-token mean prompt would
        # outweigh this tiny model and the planner would pool all four devices
        orchestrator_args=[
            *("--mean-prompt", "16", "--mean-output", "10", "--rate", "4"),
            # PREFILL and DECODER pinned: the role search prefers mixed replicas here, and
            # the KV handoff between them is what this module proves
            *(
                "--plan",
                str(
                    pinned_prefill_decoder(
                        model_dir.parent / "plan.yaml", ("m0", "m1"), ("m2", "m3"), N_LAYERS
                    )
                ),
            ),
        ],
        agent_args=["--graph", VARIANT[0], "--precision", VARIANT[1]],
    ) as c:
        c.plan = c.wait_serving(timeout=180)  # type: ignore[attr-defined]
        yield c


def test_prefill_and_decoder_replicas_of_two_devices(live: LocalCluster, model_dir: Path) -> None:
    plan: Plan = live.plan  # type: ignore[attr-defined]
    assert sorted(r.role for r in plan.replicas) == ["decoder", "prefill"], plan
    assert all(len(r.stages) >= 2 for r in plan.replicas), plan
    # the planner, on the same budgets, must pipeline every replica too
    from e2llm_edge.fog.orchestrator import planning_model
    from planner import Inventory, Workload, make_plan

    inv = Inventory.from_dict(live.inventory, source="moe")
    own = make_plan(inv, planning_model(Manifest.load(model_dir)), Workload(16, 10, 4.0), version=1)
    assert own.replicas and all(len(r.stages) >= 2 for r in own.replicas), own


async def test_answers_equal_the_local_path_with_kv_handed_over(
    live: LocalCluster, model_dir: Path
) -> None:
    local = LocalModel(model_dir, variant=VARIANT)
    plan: Plan = live.plan  # type: ignore[attr-defined]
    devices = {s.device_id: r.role for r in plan.replicas for s in r.stages}
    before = await live.telemetry(list(devices), timeout=15)
    async with Client(live.bus_config()) as client:
        for ids in PROMPTS:
            want = list(local.generate(ids, 10))
            got = await collect(client, prompt_ids=ids, max_new_tokens=10, timeout=60)
            assert got["new_ids"] == want, ids
    tel = await live.telemetry(list(devices), timeout=15)
    # the handoff carries a sliding layer's last window of positions, a full layer all
    cfg = local.manifest.config
    windows = {i: cfg["sliding_window"] for i in cfg["sliding_layers"]}
    per_token = 2 * cfg["n_kv_heads"] * cfg["head_dim"] * 4
    want_bytes = per_token * sum(
        min(len(p), windows.get(i, len(p))) for p in PROMPTS for i in range(N_LAYERS)
    )
    for kind, role in (("kv_bytes_out", "prefill"), ("kv_bytes_in", "decoder")):
        moved = sum(
            getattr(tel[d], kind) - getattr(before[d], kind)
            for d, r in devices.items()
            if r == role
        )
        assert moved == want_bytes < per_token * N_LAYERS * sum(map(len, PROMPTS)), kind
    for dev, role in devices.items():
        c = tel[dev]
        if role == "prefill":
            assert c.prefills > 0 and c.kv_chunks_out > 0 and c.decode_steps == 0, (dev, c)
        else:
            assert c.prefills == 0 and c.kv_chunks_in > 0 and c.decode_steps > 0, (dev, c)
