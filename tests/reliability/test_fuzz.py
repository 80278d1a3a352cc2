"""Thousands of malformed or nonsensical messages (hypothesis) on an agent's inbox and on
the orchestrator's request and inbox topics: every process keeps running and still answers
a normal request exactly as the local path does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2llm_edge.client import Client, GenerationError, collect
from e2llm_edge.device.local import LocalModel
from e2llm_edge.errors import CodecError
from e2llm_edge.ops.localcluster import LocalCluster
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus

pytestmark = [pytest.mark.model, pytest.mark.mosquitto, pytest.mark.slow]

N_EXAMPLES = 2500

rids = st.one_of(
    st.text(min_size=1, max_size=12), st.from_regex(r"[a-f0-9]{8}(@[0-9])?", fullmatch=True)
)
ints = st.integers(-(2**31), 2**31)
small = st.integers(-3, 64)
versions = st.sampled_from([0, 1, 2, 3, 99, 2**31])


def arrays(last: list[int]) -> st.SearchStrategy[np.ndarray]:
    return st.builds(
        lambda t, d, b: np.full((b, t, d), 0.5, np.float32),
        st.integers(0, 6),
        st.sampled_from(last),
        st.integers(1, 2),
    )


contexts = st.one_of(
    st.just({}),
    st.dictionaries(st.text(max_size=8), st.one_of(ints, st.text(max_size=8)), max_size=4),
    st.fixed_dictionaries(
        {  # plausible contexts with wild values
            "sampling": st.one_of(
                st.just({}),
                st.fixed_dictionaries(
                    {"temperature": st.floats(-5, 20), "top_p": st.floats(-1, 2)}
                ),
            ),
            "max_new_tokens": st.integers(-2, 10**6),
            "eos": st.one_of(st.none(), small),
            "prompt_len": st.integers(-2, 10**6),
            "index0": st.integers(-2, 10),
            "decoder_replica": st.integers(-1, 4),
        }
    ),
)

inbox_msgs = st.one_of(
    st.builds(
        m.PrefillStart,
        request_id=rids,
        token_ids=st.lists(st.integers(-10, 60_000), max_size=24),
        decoder_replica=st.integers(-1, 4),
        max_new_tokens=st.integers(-3, 3000),
        sampling=st.one_of(st.just({}), st.fixed_dictionaries({"temperature": st.floats(-1, 20)})),
        generated=st.lists(small, max_size=4),
        plan_version=versions,
    ),
    st.builds(
        m.Activation,
        request_id=rids,
        phase=st.sampled_from(["prefill", "decode"]),
        hidden=arrays([576, 7]),
        position_start=small,
        step=small,
        context=contexts,
        plan_version=versions,
    ),
    st.builds(
        m.KVChunk,
        request_id=rids,
        layer=st.integers(-2, 40),
        token_start=small,
        n_tokens_total=small,
        key=st.builds(lambda n: np.zeros((1, 3, n, 64), np.float32), st.integers(0, 4)),
        value=st.builds(lambda n: np.zeros((1, 3, n, 64), np.float32), st.integers(0, 4)),
        chunk=small,
        n_chunks=small,
        context=contexts,
        plan_version=versions,
    ),
    st.builds(
        m.DecodeStep,
        request_id=rids,
        token_id=st.integers(-5, 60_000),
        position=small,
        step=small,
        context=contexts,
        plan_version=versions,
    ),
    st.builds(m.Release, request_id=rids, reason=st.text(max_size=10)),
)

orch_msgs = st.one_of(
    st.builds(
        m.TokenOut,
        request_id=rids,
        token_id=ints,
        index=small,
        finished=st.booleans(),
        plan_version=versions,
    ),
    st.builds(
        m.ErrorReport,
        request_id=st.one_of(st.none(), rids),
        device_id=st.text(max_size=8),
        code=st.text(max_size=8),
        message=st.text(max_size=20),
        plan_version=versions,
    ),
    st.builds(m.Heartbeat, device_id=st.text(max_size=8), ts=st.floats(allow_nan=True)),
)

# only requests that must be refused: a valid one would be served (and take time)
bad_requests = st.one_of(
    st.builds(
        m.GenerateRequest,
        request_id=rids,
        client_id=st.just("fuzz"),
        prompt=st.sampled_from(["", "   ", "\n\t"]),
    ),
    st.builds(
        m.GenerateRequest,
        request_id=rids,
        client_id=st.just("fuzz"),
        prompt_ids=st.one_of(
            st.just([]), st.lists(st.integers(49_152, 10**9), min_size=1, max_size=3)
        ),
    ),
    st.builds(
        m.GenerateRequest,
        request_id=rids,
        client_id=st.just("fuzz"),
        prompt=st.just("hi"),
        prompt_ids=st.just([1, 2]),
    ),
    st.builds(
        m.GenerateRequest,
        request_id=rids,
        client_id=st.just("fuzz"),
        prompt=st.just("hi"),
        max_new_tokens=st.one_of(st.integers(-10, 0), st.integers(10**5, 10**9)),
    ),
    st.builds(
        m.GenerateRequest,
        request_id=rids,
        client_id=st.just("fuzz"),
        prompt=st.just("hi"),
        temperature=st.one_of(st.floats(max_value=-0.01), st.floats(min_value=10.01)),
    ),
    st.builds(
        m.GenerateRequest,
        request_id=rids,
        client_id=st.just("fuzz"),
        prompt=st.just("hi"),
        top_p=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.01)),
    ),
    st.builds(m.Release, request_id=rids, reason=st.text(max_size=10)),
)


def mutate(data: bytes, how: int, byte: int) -> bytes:
    """Damage a valid encoding: truncate, flip a byte, or rewrite a header field."""
    if how == 0:
        return data[: byte % max(len(data), 1)]
    if how == 1:
        i = byte % max(len(data), 1)
        return data[:i] + bytes([(data[i] ^ 0xFF) if data else 0]) + data[i + 1 :]
    obj = msgpack.unpackb(data, raw=False)
    key = ["v", "k", "rid", "seq", "pv", "b"][byte % 6]
    obj[key] = [99, 250, 7, -1, "x", None][how % 6]
    return msgpack.packb(obj)


def payloads(msgs: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    def enc(msg: Any, how: int, byte: int) -> bytes:
        try:
            data = m.encode(msg)
        except CodecError:
            return b"\x01"
        return data if how == 5 else mutate(data, how, byte)

    return st.one_of(
        st.binary(max_size=64), st.builds(enc, msgs, st.integers(0, 5), st.integers(0, 255))
    )


def draw(strategy: st.SearchStrategy[bytes], n: int) -> list[bytes]:
    out: list[bytes] = []

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect_one(p: bytes) -> None:
        out.append(p)

    collect_one()
    return out


async def test_fuzzed_topics_then_normal_service(small: LocalCluster, default_model: Path) -> None:
    devices = sorted(small.agents)
    cl = small.cluster
    targets: list[tuple[str, list[bytes]]] = []
    for dev in devices:
        targets.append(
            (
                t.DEVICE_INBOX.format(cluster=cl, device_id=dev),
                draw(payloads(inbox_msgs), N_EXAMPLES // 4),
            )
        )
    targets.append(
        (
            t.ORCHESTRATOR_INBOX.format(cluster=cl, device_id=devices[0]),
            draw(payloads(orch_msgs), N_EXAMPLES // 8),
        )
    )
    targets.append(
        (
            t.ORCHESTRATOR_INBOX.format(cluster=cl, device_id="ghost"),
            draw(payloads(orch_msgs), N_EXAMPLES // 8),
        )
    )
    targets.append(
        (
            t.REQUEST.format(cluster=cl, client_id="fuzz"),
            draw(payloads(bad_requests), N_EXAMPLES // 4),
        )
    )
    sent = refused = 0
    async with Bus(small.bus_config()) as bus:
        await bus.subscribe(t.RESPONSE, client_id="fuzz")
        for topic, batch in targets:
            for i, p in enumerate(batch):
                await bus.publish_raw(topic, p, qos=1)
                sent += 1
                if i % 100 == 99:  # let the receivers keep up (their queues are bounded)
                    refused += await _drain(bus, 0.05)
        refused += await _drain(bus, 3.0)
    assert sent >= N_EXAMPLES - 5
    # the orchestrator answered requesters it could name (topic-safe request ids)
    assert refused > 100, refused
    for p in [small.orchestrator, *small.agents.values()]:
        assert p is not None and p.alive, small.logs()
    async with Client(small.bus_config()) as client:
        with pytest.raises(GenerationError) as err:
            await collect(client, "", max_new_tokens=4)
        assert err.value.code == "bad_request"
        got = await collect(client, "What is the capital of France?", max_new_tokens=12, timeout=60)
    want = list(LocalModel(default_model).generate(got["prompt_ids"], 12))
    assert got["new_ids"] == want


async def _drain(bus: Bus, seconds: float) -> int:
    """Read error answers for `seconds`; returns how many arrived."""
    n = 0
    while True:
        try:
            env = await bus.recv(timeout=seconds)
        except Exception:
            return n
        if isinstance(env.msg, m.ResponseEvent) and env.msg.event == "error":
            n += 1
