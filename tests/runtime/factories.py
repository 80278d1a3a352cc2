"""One valid instance of every message type, for round-trip and fuzz tests."""

from __future__ import annotations

import numpy as np

from e2llm_edge.wire import messages as m

RNG = np.random.default_rng(0)


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def examples() -> list[m.Message]:
    return [
        m.DeviceState(
            device_id="pi-1",
            status="ready",
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
            device_id="pi-1",
            memory_mb=3800.0,
            profile={"prefill_ms_per_token": [0.1, 0.2], "decode_ms": 1.0},
            hardware={"cpu": "a72", "cores": 4},
            link=None,
            capabilities={"dtypes": ["float32"]},
        ),
        m.PlanMsg(
            plan={"version": 4, "replicas": [{"role": "prefill", "devices": ["a"]}]}, plan_version=4
        ),
        m.OrchestratorState(orchestrator_id="fog", status="online", ts=2.0),
        m.GenerateRequest(
            request_id="r1",
            client_id="cli",
            prompt="Hi",
            prompt_ids=None,
            raw=False,
            max_new_tokens=16,
            temperature=0.7,
            top_p=0.9,
            seed=7,
        ),
        m.ResponseEvent(request_id="r1", event="token", token_ids=[1, 2], text="ab", index=0),
        m.PrefillStart(
            request_id="r1",
            plan_version=4,
            token_ids=[1, 2, 3],
            position_start=0,
            decoder_replica=1,
            sampling={"temperature": 0.0},
            max_new_tokens=8,
            generated=[5],
        ),
        m.Activation(
            request_id="r1", phase="prefill", hidden=f32(1, 7, 576), position_start=0, step=0, seq=2
        ),
        m.KVChunk(
            request_id="r1",
            layer=3,
            token_start=0,
            n_tokens_total=5,
            key=f32(1, 3, 5, 64),
            value=f32(1, 3, 5, 64),
            chunk=0,
            n_chunks=1,
        ),
        m.DecodeStep(request_id="r1", token_id=42, position=7, step=1),
        m.TokenOut(
            request_id="r1",
            token_id=42,
            index=0,
            finished=True,
            finish_reason="stop",
            timings={"decode_ms": 3.2},
        ),
        m.Release(request_id="r1", reason="done"),
        m.ErrorReport(device_id="pi-1", request_id=None, code="oom", message="out of memory"),
        m.Heartbeat(device_id="pi-1", ts=3.0),
        m.Telemetry(source="pi-1", data={"tokens_per_s": 11.0}),
        m.RequestEvent(request_id="r1", event="routed", data={"replica": 0}),
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
        else:
            assert x == y, name
