"""A short soak: 30 s of requests without pause (some abandoned by their client) on the
shared small cluster; resident memory of the orchestrator and agents stays flat, and
every device's request state (KV caches) is freed once the traffic stops."""

from __future__ import annotations

import asyncio
import time
from types import ModuleType

import numpy as np
import pytest

from e2llm_edge.ops.localcluster import LocalCluster
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus

from .conftest import AGENT_REQUEST_TIMEOUT

pytestmark = [pytest.mark.model, pytest.mark.mosquitto, pytest.mark.slow]

GROWTH_MB = 60.0  # generous: allocator noise on a shared machine, not a leak of KV caches


async def test_memory_flat_over_a_short_soak(small: LocalCluster, soak: ModuleType) -> None:
    res = await soak.soak(small, 30.0, 3.0, concurrency=3, max_new_tokens=16)
    print(res.table())
    assert res.errors == 0 and res.done >= 10 and res.abandoned >= 2, res
    growth = res.growth_mb(warmup=2)
    assert small.orchestrator is not None
    assert set(growth) == {small.orchestrator.name, *small.agents}, growth
    assert all(g < GROWTH_MB for g in growth.values()), (growth, res.table())


async def test_abandoned_request_state_is_freed(small: LocalCluster) -> None:
    dev = sorted(small.agents)[0]
    tel = await small.telemetry([dev], timeout=10)
    async with Bus(small.bus_config()) as bus:
        await bus.subscribe(t.PLAN)
        env = await bus.recv(timeout=10)
        assert isinstance(env.msg, m.PlanMsg)
        plan = env.msg.plan
        stage = next(s for r in plan.replicas for s in r.stages if s.device_id == dev)
        ctx = m.RequestContext(
            sampling=m.Sampling(),
            max_new_tokens=8,
            eos_token_id=None,
            prompt_len=4,
            index0=0,
            decoder_replica=next(
                r.replica_id for r in plan.replicas if r.role in ("decoder", "mixed")
            ),
        )
        # one layer of a KV handoff that never completes: the state must not live forever
        chunk = m.KVChunk(
            request_id=m.RequestId("abandoned"),
            attempt=0,
            layer=stage.layer_start,
            token_start=0,
            n_tokens_total=4,
            key=np.zeros((1, 3, 2, 64), np.float32),
            value=np.zeros((1, 3, 2, 64), np.float32),
            chunk=0,
            n_chunks=2,
            context=ctx,
            plan_version=plan.version,
        )
        await bus.publish(t.DEVICE_INBOX, chunk, device_id=dev)
    before = tel[dev].requests
    held = False
    deadline = time.monotonic() + AGENT_REQUEST_TIMEOUT + 12
    while time.monotonic() < deadline:
        now = (await small.telemetry([dev], timeout=10))[dev]
        if now.requests > before:
            held = True
        if held and now.requests == before and now.kv_pending_bytes == 0:
            return
        await asyncio.sleep(0.5)
    pytest.fail(f"request state not freed: held={held}, telemetry {now}")
