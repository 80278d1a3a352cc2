"""The distributed runtime end to end: a real Mosquitto, the orchestrator and four agents
as separate processes, two replicas (PREFILL and DECODER, pinned: the planner's own role
search prefers mixed replicas on this pool, and the KV handoff is what this module proves).
Answers must equal the local path (and transformers) token for token; the KV cache must
really move. The model directory is read-only and holds per-layer segments only: every
device composes the session of its layer range itself, and nobody writes a file there."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import yaml
from readonly import readonly_model, snapshot

from e2llm_edge.client import Client, GenerationError, collect
from e2llm_edge.device.local import LocalModel
from e2llm_edge.ops.broker import MosquittoBroker
from e2llm_edge.ops.demo import bundled_inventory
from e2llm_edge.ops.localcluster import LocalCluster, pinned_prefill_decoder
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus
from onnx_export.manifest import Manifest, Segment
from planner import Plan

pytestmark = [pytest.mark.model, pytest.mark.mosquitto, pytest.mark.slow]

EOS = 2


@pytest.fixture(scope="module")
def live(
    mosquitto: MosquittoBroker, default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    inv = yaml.safe_load(bundled_inventory().read_text())
    manifest = Manifest.load(default_model)

    def portable_no_ranges(s: Segment) -> bool:
        return (s.graph, s.precision) == ("standard", "fp32") and len(s.layers) <= 1

    # the portable graph here; tests/e2e/test_pinned_plan.py runs the contrib graph
    with (
        readonly_model(manifest, portable_no_ranges, tmp_path_factory.mktemp("ro")) as ro,
        LocalCluster(
            ro,
            inv,
            broker_url=mosquitto.url,
            cluster="e2e",
            orchestrator_args=[
                "--plan",
                str(
                    pinned_prefill_decoder(
                        tmp_path_factory.mktemp("plan") / "plan.yaml",
                        ("pi-a", "jetson"),
                        ("pi-b", "minipc"),
                        30,
                        split=14,
                    )
                ),
            ],
            agent_args=["--graph", "standard", "--precision", "fp32"],
        ) as c,
    ):
        c.readonly = (ro, snapshot(ro))  # type: ignore[attr-defined]
        c.plan = c.wait_serving(timeout=180)  # type: ignore[attr-defined]
        yield c


def expected(case: dict[str, Any]) -> list[int]:
    """transformers' greedy ids, up to and including the first end-of-sequence token."""
    ids = case["new_ids"]
    return ids[: ids.index(EOS) + 1] if EOS in ids else ids


def test_plan_has_prefill_and_decoder_replicas(live: LocalCluster) -> None:
    plan: Plan = live.plan  # type: ignore[attr-defined]
    assert sorted(r.role for r in plan.replicas) == ["decoder", "prefill"], plan
    assert all(len(r.stages) >= 2 for r in plan.replicas)


@pytest.mark.parametrize("variant", ["standard/fp32", "contrib/exact"])
def test_no_bundled_device_holds_the_model_alone(default_model: Path, variant: str) -> None:
    """The bundled pool (the demo's) needs a pipeline in every replica, whichever graph the
    devices run; the planner says so before anything starts."""
    from e2llm_edge.fog.orchestrator import planning_model
    from planner import Inventory, PlanInfeasible, Workload, make_plan

    model = planning_model(Manifest.load(default_model), variant)
    inv = Inventory.from_dict(yaml.safe_load(bundled_inventory().read_text()), source="bundled")
    try:
        plan = make_plan(inv, model, Workload(256, 128, 0.5), method="e2llm", seed=0, version=1)
    except PlanInfeasible as exc:  # fp32 (651 MB) exceeds the four budgets together
        assert variant == "standard/fp32" and "short by" in str(exc), exc
        return
    assert plan.replicas and all(len(r.stages) >= 2 for r in plan.replicas), plan


async def test_greedy_output_equals_local_path(
    live: LocalCluster, reference: dict[str, Any]
) -> None:
    cases = [
        c
        for c in reference["cases"]
        if c["name"] in ("chat_capital", "raw_story", "raw_code", "chat_long")
    ]
    assert any(len(c["prompt_ids"]) > 500 for c in cases)
    async with Client(live.bus_config()) as client:
        for case in cases:
            got = await collect(
                client,
                case["prompt"],
                raw=case["raw"],
                max_new_tokens=reference["max_new_tokens"],
                timeout=60,
            )
            assert got["prompt_ids"] == case["prompt_ids"], case["name"]
            assert got["new_ids"] == expected(case), case["name"]


async def test_eight_concurrent_requests(live: LocalCluster, default_model: Path) -> None:
    prompts = [f"Give me one fact about the number {n}." for n in range(8)]
    local = LocalModel(default_model)
    async with Client(live.bus_config()) as client:
        results = await asyncio.gather(
            *[collect(client, p, max_new_tokens=16, timeout=120) for p in prompts]
        )
    for p, r in zip(prompts, results, strict=True):
        want = list(local.generate(r["prompt_ids"], 16))
        assert r["new_ids"] == want, p
        assert r["stats"]["new_tokens"] == len(want)


async def test_kv_cache_moved_from_prefill_to_decoder(live: LocalCluster) -> None:
    plan: Plan = live.plan  # type: ignore[attr-defined]
    async with Client(live.bus_config()) as client:
        await collect(client, "Name three colours.", max_new_tokens=8)
    devices = {s.device_id: r.role for r in plan.replicas for s in r.stages}
    tel = await live.telemetry(list(devices), timeout=15)
    for dev, role in devices.items():
        c = tel[dev]
        if role == "prefill":
            assert c.prefills > 0 and c.kv_chunks_out > 0, (dev, c)
            assert c.decode_steps == 0 and c.kv_chunks_in == 0, (dev, c)
        else:
            assert c.prefills == 0, (dev, c)  # the decoder never ran the prompt
            assert c.kv_chunks_in > 0 and c.decode_steps > 0, (dev, c)


async def test_devices_announce_the_cost_of_their_message_path(live: LocalCluster) -> None:
    """Each agent probed its own message path through the broker before announcing, and
    the profile it announced (what the planner reads) carries the result."""
    plan: Plan = live.plan  # type: ignore[attr-defined]
    devices = {s.device_id for r in plan.replicas for s in r.stages}
    got: dict[str, m.ProfileData] = {}
    async with Bus(live.bus_config()) as bus:
        await bus.subscribe(t.DEVICE_PROFILE)
        while set(got) != devices:
            env = await bus.recv(timeout=10)
            if isinstance(env.msg, m.DeviceProfileMsg) and env.msg.device_id in devices:
                got[env.msg.device_id] = env.msg.profile
    for dev, p in got.items():
        assert p.pass_s > 0 and p.io_s_per_mb > 0, (dev, p)
        assert p.measured is not None and p.measured.cpu_share is not None, (dev, p)
        assert 0 < p.measured.cpu_share <= 1 and p.measured.decode_layers >= 1, (dev, p)


async def test_bad_input_is_answered_and_service_continues(live: LocalCluster) -> None:
    plan: Plan = live.plan  # type: ignore[attr-defined]
    dev = plan.replicas[0].stages[0].device_id
    inbox = t.DEVICE_INBOX.format(cluster="e2e", device_id=dev)
    orch_inbox = t.ORCHESTRATOR_INBOX.format(cluster="e2e", device_id=dev)
    async with Bus(live.bus_config()) as raw:
        good = m.encode(m.DecodeStep(request_id="ghost", attempt=0, token_id=5, position=3, step=1))
        wrong_version = msgpack.unpackb(good, raw=False)
        wrong_version["v"] = 99
        act = m.Activation(
            request_id="r",
            attempt=0,
            phase="decode",
            hidden=np.ones((1, 1, 576), np.float32),
            position_start=0,
            step=1,
        )
        bad_shape = msgpack.unpackb(m.encode(act), raw=False)
        bad_shape["b"]["hidden"]["sh"] = [1, 2, 576]
        bad_dtype = msgpack.unpackb(m.encode(act), raw=False)
        bad_dtype["b"]["hidden"]["dt"] = "complex128"
        payloads = [
            b"\x00garbage\xff" * 20,
            msgpack.packb(wrong_version),
            msgpack.packb(bad_shape),
            msgpack.packb(bad_dtype),
            good,
        ]  # well-formed, for a request this device never heard of
        for topic in (inbox, orch_inbox):
            for p in payloads:
                await raw.publish_raw(topic, p, qos=1)
    # over the receivers' 4 MiB limit, under the broker's packet limit
    async with Bus(live.bus_config(max_message_bytes=8 << 20)) as big:
        for topic in (inbox, orch_inbox):
            await big.publish_raw(topic, b"\x93" + bytes((4 << 20) + 8192), qos=1)
    async with Bus(live.bus_config()) as raw:
        # a requester that sent garbage gets an error on its response topic
        await raw.subscribe(t.RESPONSE, client_id="fuzzer")
        await raw.publish_raw(t.REQUEST.format(cluster="e2e", client_id="fuzzer"), b"nonsense")
        ev = await raw.recv(timeout=10)
        assert isinstance(ev.msg, m.ResponseEvent) and ev.msg.event == "error"
        assert ev.msg.error_code == "bad_request"
    async with Client(live.bus_config()) as client:
        for kwargs, code in [
            ({"prompt": "   "}, "bad_request"),
            ({"prompt": "hi", "temperature": -1.0}, "bad_request"),
            ({"prompt": "hi", "max_new_tokens": 10**6}, "bad_request"),
            ({"prompt_ids": [10**7]}, "bad_request"),
        ]:
            with pytest.raises(GenerationError) as err:
                await collect(client, **kwargs)
            assert err.value.code == code, kwargs
        got = await collect(client, "What is the capital of France?", max_new_tokens=12)
        assert "Paris" in got["text"]
    for p in live.agents.values():
        assert p.alive, p.tail()
    assert live.orchestrator is not None and live.orchestrator.alive


def test_the_model_directory_was_only_read(live: LocalCluster) -> None:
    """After every test above: the plan's stages span several layers, no range file was
    ever in the directory, and nothing was written to it."""
    plan: Plan = live.plan  # type: ignore[attr-defined]
    assert any(s.layer_end - s.layer_start > 1 for r in plan.replicas for s in r.stages)
    ro, before = live.readonly  # type: ignore[attr-defined]
    assert snapshot(ro) == before
    assert not [p.name for p in ro.iterdir() if p.name.startswith("layers_")]
