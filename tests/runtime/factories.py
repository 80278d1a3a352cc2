"""One valid instance of every message type, for round-trip and fuzz tests."""

from __future__ import annotations

import numpy as np

from e2llm_edge.wire import messages as m
from planner.plan import Plan, Replica, Stage

RNG = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def a_plan(version: int = 4) -> Plan:
    def st(dev: str, a: int, b: int, embed: bool, head: bool) -> Stage:
        return Stage(dev, a, b, embed, head, 0.01, 0.002)

    return Plan(
        version,
        "e2llm",
        30,
        [
            Replica(0, "prefill", 1, [st("a", 0, 15, True, False), st("b", 15, 30, False, True)]),
            Replica(1, "decoder", 4, [st("c", 0, 30, True, True)]),
        ],
        {"bottleneck_s": 1.5, "bottleneck_phase": "decode", "idle_devices": ["d"]},
    )


def a_context() -> m.RequestContext:
    return m.RequestContext(
        sampling=m.Sampling(temperature=0.7, top_p=0.9, seed=3),
        max_new_tokens=8,
        eos_token_id=2,
        prompt_len=5,
        index0=0,
        decoder_replica=1,
    )


def examples() -> list[m.Message]:
    return [
        m.DeviceState(
            device_id=m.DeviceId("pi-1"),
            status=m.DeviceStatus.READY,
            plan_version=3,
            role="prefill",
            replica_id=0,
            layers=(0, 15),
            queue_depth=2,
            in_flight=1,
            tokens_per_s=12.5,
            mem_bytes=123456789,
            last_error=None,
            ts=1.5,
        ),
        m.DeviceProfileMsg(
            device_id=m.DeviceId("pi-1"),
            memory_mb=3800.0,
            profile=m.ProfileData(
                prefill_tokens=[16, 64],
                layer_prefill_s=[0.001, 0.003],
                layer_decode_s=[0.0005, 0.0007],
                embed_s=1e-6,
                head_prefill_s=0.002,
                head_decode_s=[0.002, 0.003],
                measured=m.ProfileMeta(
                    threads=1,
                    graph="contrib",
                    precision="exact",
                    past_tokens=128,
                    decode_batches=[1, 2],
                    model="smollm2",
                    at="2026-12-07T10:00:00",
                ),
            ),
            hardware=m.HardwareSpec(tflops=1.5, mem_bw_gbps=8.0),
            link=m.LinkSpec(bandwidth_mbps=100.0, latency_ms=2.0),
            capabilities=m.Capabilities(
                variants=[("contrib", "exact")], running=("contrib", "exact")
            ),
        ),
        m.PlanMsg(plan=a_plan(), epoch=2, plan_version=4),
        m.OrchestratorState(orchestrator_id="fog", status="online", epoch=2, ts=2.0),
        m.OrchestratorLease(holder="fog", epoch=2, ttl_s=3.0),
        m.GenerateRequest(
            request_id=m.RequestId("r1"),
            client_id=m.ClientId("cli"),
            prompt="Hi",
            prompt_ids=None,
            raw=False,
            max_new_tokens=16,
            temperature=0.7,
            top_p=0.9,
            seed=7,
            resume=[4, 5],
        ),
        m.ResponseEvent(
            request_id=m.RequestId("r1"), event="token", token_ids=[1, 2], text="ab", index=0
        ),
        m.PrefillStart(
            request_id=m.RequestId("r1"),
            attempt=1,
            plan_version=4,
            token_ids=[1, 2, 3],
            decoder_replica=1,
            sampling=m.Sampling(),
            max_new_tokens=8,
            generated=[5],
        ),
        m.Activation(
            request_id=m.RequestId("r1"),
            attempt=0,
            phase="prefill",
            hidden=f32(1, 7, 576),
            position_start=0,
            step=0,
            context=a_context(),
            queued_s=0.25,
            seq=2,
        ),
        m.KVChunk(
            request_id=m.RequestId("r1"),
            attempt=0,
            layer=3,
            token_start=0,
            n_tokens_total=5,
            key=f32(1, 3, 5, 64),
            value=f32(1, 3, 5, 64),
            chunk=0,
            n_chunks=1,
            sent_at=12.5,
        ),
        m.DecodeStep(request_id=m.RequestId("r1"), attempt=0, token_id=42, position=7, step=1),
        m.DecodeBatch(
            steps=(
                m.DecodeStep(
                    request_id=m.RequestId("r1"), attempt=0, token_id=42, position=7, step=1
                ),
                m.Activation(
                    request_id=m.RequestId("r2"),
                    attempt=1,
                    phase="decode",
                    hidden=f32(1, 1, 576),
                    position_start=9,
                    step=2,
                    stalled_s=0.5,
                    seq=2,
                    plan_version=3,
                ),
            ),
            plan_version=3,
        ),
        m.TokenOut(
            request_id=m.RequestId("r1"),
            attempt=0,
            token_id=42,
            index=0,
            finished=True,
            finish_reason="stop",
            timings=m.StepTimings(prefill_queued_s=0.01, kv_wait_s=0.0),
        ),
        m.Release(request_id=m.RequestId("r1"), attempt=None, reason="done"),
        m.ErrorReport(
            device_id=m.DeviceId("pi-1"),
            request_id=None,
            code=m.ErrorCode.INTERNAL,
            message="out of memory",
        ),
        m.Heartbeat(device_id=m.DeviceId("pi-1"), ts=3.0),
        m.Probe(device_id=m.DeviceId("pi-1"), seq=4, data=f32(576)),
        m.DeviceTelemetry(
            device_id=m.DeviceId("pi-1"),
            counters=m.DeviceCounters(status=m.DeviceStatus.READY, decode_steps=4),
        ),
        m.ClusterTelemetry(
            summary=m.ClusterSummary(
                orchestrator_id="fog",
                epoch=1,
                phase="serving",
                plan_version=4,
                serving=True,
                plan_error=None,
                devices={"a": m.DeviceStatus.READY},
                replicas=[
                    m.ReplicaSummary(
                        replica_id=0,
                        role="prefill",
                        concurrency=1,
                        devices=["a"],
                        prefill_queue_tokens=0,
                        decoding=0,
                    )
                ],
                queued=0,
                in_flight=1,
                completed=2,
                failed=0,
                dead_replicas=[],
                draining=False,
                restarted=0,
                last_recovery_s=None,
                rss_bytes=1000,
                mean_wait_s=0.1,
                mean_ttft_s=0.2,
                tokens_out=20,
                uptime_s=5.0,
            )
        ),
        m.RequestEvent(
            request_id=m.RequestId("r1"),
            event=m.RequestEventKind.ROUTED,
            data=m.RequestEventData(prefill_replica=0, decoder_replica=1),
        ),
    ]


def assert_same(a: m.Message, b: m.Message) -> None:
    """Field-by-field equality (arrays compared by value, dtype and shape)."""
    assert type(a) is type(b)
    for name in a.__dataclass_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if isinstance(x, np.ndarray):
            assert isinstance(y, np.ndarray)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x, y)
        elif isinstance(x, tuple) and x and isinstance(x[0], m.Message):  # a batch's steps
            assert isinstance(y, tuple) and len(x) == len(y), name
            for xi, yi in zip(x, y, strict=True):
                assert_same(xi, yi)
        else:
            assert x == y, name
