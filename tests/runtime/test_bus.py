"""Bus against a real Mosquitto: delivery, retained state, last-will, reconnect, limits."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from e2llm_edge.errors import BusConnectError, BusTimeout, CodecError
from e2llm_edge.ops.broker import MosquittoBroker, MosquittoConfig, free_port
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import BadMessage, Bus, BusConfig, Will

from .factories import a_plan, f32

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(30)]
REPO = Path(__file__).resolve().parents[2]


def cfg_for(broker: MosquittoBroker, cluster: str, **kw: object) -> BusConfig:
    return BusConfig(host=broker.host, port=broker.port, cluster=cluster, **kw)  # type: ignore[arg-type]


def state(device_id: str, status: str = "ready") -> m.DeviceState:
    return m.DeviceState(device_id=device_id, status=m.DeviceStatus(status), ts=1.0)  # type: ignore[arg-type]


async def test_publish_subscribe_typed_with_ids(mosquitto: MosquittoBroker, cluster: str) -> None:
    cfg = cfg_for(mosquitto, cluster)
    async with Bus(cfg) as sender, Bus(cfg) as device:
        assert sender.tcp_nodelay_active() and device.tcp_nodelay_active()
        await device.subscribe(t.DEVICE_INBOX, device_id="d1")
        hidden = f32(1, 3, 576)
        await sender.publish(
            t.DEVICE_INBOX,
            m.DecodeStep(request_id="r", attempt=0, token_id=1, position=0, step=0),
            device_id="d2",
        )
        await sender.publish(
            t.DEVICE_INBOX,
            m.Activation(
                request_id="r",
                attempt=0,
                phase="prefill",
                hidden=hidden,
                position_start=0,
                step=0,
                seq=4,
                plan_version=2,
            ),
            device_id="d1",
        )
        env = await device.recv(timeout=5)
        assert env.topic is t.DEVICE_INBOX and env.ids == {"device_id": "d1"}
        assert isinstance(env.msg, m.Activation) and env.msg.seq == 4
        np.testing.assert_array_equal(env.msg.hidden, hidden)
        with pytest.raises(BusTimeout):  # d2's message never reached d1
            await device.recv(timeout=0.3)


async def test_wrong_payload_type_for_topic_is_refused_at_send(
    mosquitto: MosquittoBroker, cluster: str
) -> None:
    async with Bus(cfg_for(mosquitto, cluster)) as bus:
        with pytest.raises(CodecError, match="may not be sent"):
            await bus.publish(t.PLAN, state("d"))


async def test_large_message_round_trip(mosquitto: MosquittoBroker, cluster: str) -> None:
    cfg = cfg_for(mosquitto, cluster)
    async with Bus(cfg) as a, Bus(cfg) as b:
        await b.subscribe(t.DEVICE_INBOX, device_id="d")
        key = f32(1, 3, 2600, 64)  # 2 x 2 MB: close to the 4 MiB limit
        await a.publish(
            t.DEVICE_INBOX,
            m.KVChunk(
                request_id="r",
                attempt=0,
                layer=0,
                token_start=0,
                n_tokens_total=2600,
                key=key,
                value=key,
                chunk=0,
                n_chunks=1,
            ),
            device_id="d",
        )
        env = await b.recv(timeout=5)
        assert isinstance(env.msg, m.KVChunk)
        np.testing.assert_array_equal(env.msg.value, key)


async def test_retained_state_seen_by_late_subscriber(
    mosquitto: MosquittoBroker, cluster: str
) -> None:
    cfg = cfg_for(mosquitto, cluster)
    async with Bus(cfg, publish_will_on_close=False) as dev:
        await dev.publish(t.DEVICE_STATE, state("d1", "loading"), device_id="d1")
        await dev.publish(t.DEVICE_STATE, state("d1", "ready"), device_id="d1")
    async with Bus(cfg) as orch:
        await orch.subscribe(t.DEVICE_STATE)
        env = await orch.recv(timeout=5)
        assert env.retained and env.ids == {"device_id": "d1"}
        assert isinstance(env.msg, m.DeviceState) and env.msg.status == "ready"


async def test_clean_close_publishes_the_will(mosquitto: MosquittoBroker, cluster: str) -> None:
    cfg = cfg_for(mosquitto, cluster)
    async with Bus(cfg) as orch:
        await orch.subscribe(t.DEVICE_STATE, device_id="d1")
        async with Bus(
            cfg, will=Will(t.DEVICE_STATE, state("d1", "offline"), {"device_id": "d1"})
        ) as dev:
            await dev.publish(t.DEVICE_STATE, state("d1"), device_id="d1")
            first = await orch.recv(timeout=5)
            assert isinstance(first.msg, m.DeviceState) and first.msg.status == "ready"
        last = await orch.recv(timeout=5)
        assert isinstance(last.msg, m.DeviceState) and last.msg.status == "offline"


_CHILD = textwrap.dedent("""
    import asyncio, sys
    from e2llm_edge.wire import messages as m
    from e2llm_edge.wire import topics as t
    from e2llm_edge.wire.bus import Bus, BusConfig, Will
    async def main():
        cfg = BusConfig(port=int(sys.argv[1]), cluster=sys.argv[2], keepalive=5)
        will = Will(t.DEVICE_STATE, m.DeviceState(device_id="d9", status=m.DeviceStatus.OFFLINE),
                    {"device_id": "d9"})
        async with Bus(cfg, will=will) as bus:
            ready = m.DeviceState(device_id="d9", status=m.DeviceStatus.READY)
            await bus.publish(t.DEVICE_STATE, ready, device_id="d9")
            print("up", flush=True)
            await asyncio.sleep(60)
    asyncio.run(main())
""")


async def test_last_will_fires_when_process_is_killed(
    mosquitto: MosquittoBroker, cluster: str
) -> None:
    async with Bus(cfg_for(mosquitto, cluster)) as orch:
        await orch.subscribe(t.DEVICE_STATE)
        child = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-c", _CHILD, str(mosquitto.port), cluster],
            cwd=REPO,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        try:
            assert child.stdout is not None
            line = await asyncio.to_thread(child.stdout.readline)
            assert line.strip() == b"up"
            up = await orch.recv(timeout=5)
            assert isinstance(up.msg, m.DeviceState) and up.msg.status == "ready"
            child.send_signal(signal.SIGKILL)
            down = await orch.recv(timeout=5)
            assert isinstance(down.msg, m.DeviceState) and down.msg.status == "offline"
            assert down.ids == {"device_id": "d9"}
        finally:
            child.kill()
            child.wait()
            if child.stdout:
                child.stdout.close()
    async with Bus(cfg_for(mosquitto, cluster)) as late:  # the will was retained
        await late.subscribe(t.DEVICE_STATE)
        env = await late.recv(timeout=5)
        assert isinstance(env.msg, m.DeviceState) and env.msg.status == "offline"


async def test_garbage_is_dropped_reported_and_delivery_continues(
    mosquitto: MosquittoBroker, cluster: str
) -> None:
    cfg = cfg_for(mosquitto, cluster)
    bad: list[BadMessage] = []

    async def hook(b: BadMessage) -> None:
        bad.append(b)

    small = cfg_for(mosquitto, cluster, max_message_bytes=100_000)
    async with Bus(cfg) as a, Bus(small, on_bad_message=hook) as b:
        await b.subscribe(t.DEVICE_INBOX, device_id="d")
        inbox = t.DEVICE_INBOX.format(cluster=cluster, device_id="d")
        good = m.encode(m.DecodeStep(request_id="r7", attempt=0, token_id=1, position=2, step=0))
        wrong_version = good.replace(b"\xa1v\x01", b"\xa1v\x02", 1)
        assert wrong_version != good
        plan_on_inbox = m.encode(m.PlanMsg(plan=a_plan()))
        oversize = m.encode(
            m.Activation(
                request_id="big",
                attempt=0,
                phase="prefill",
                hidden=f32(1, 100, 576),
                position_start=0,
                step=0,
            )
        )
        for payload in (b"\x00garbage", wrong_version, plan_on_inbox, oversize):
            await a.publish_raw(inbox, payload)
        with pytest.raises(CodecError, match="exceeds limit"):  # senders refuse, too
            await a.publish_raw(inbox, b"x" * 5_000_000)
        await a.publish(
            t.DEVICE_INBOX,
            m.DecodeStep(request_id="ok", attempt=0, token_id=3, position=4, step=1),
            device_id="d",
        )
        env = await b.recv(timeout=5)
        assert isinstance(env.msg, m.DecodeStep) and env.msg.request_id == "ok"
        for _ in range(50):
            if len(bad) == 4:
                break
            await asyncio.sleep(0.02)
        assert b.stats.dropped_invalid == 4 and len(bad) == 4
        errors = [x.error for x in bad]
        assert all(isinstance(e, CodecError) for e in errors)
        assert [getattr(e, "field", None) for e in errors] == [
            "payload",
            "header.v",
            "header.k",
            "payload",
        ]
        assert "exceeds limit 100000" in bad[3].error.reason
        assert getattr(bad[1].error, "request_id", None) == "r7"
        assert bad[1].ids == {"device_id": "d"}
        await a.publish(t.DEVICE_INBOX, m.Release(request_id="z", reason="x"), device_id="d")
        assert isinstance((await b.recv(timeout=5)).msg, m.Release)


async def test_inbound_queue_is_bounded(mosquitto: MosquittoBroker, cluster: str) -> None:
    cfg = cfg_for(mosquitto, cluster)
    async with Bus(cfg) as a, Bus(cfg_for(mosquitto, cluster, queue_size=5)) as b:
        await b.subscribe(t.DEVICE_INBOX, device_id="d")
        for i in range(12):
            await a.publish(
                t.DEVICE_INBOX,
                m.DecodeStep(request_id="r", attempt=0, token_id=i, position=i, step=i),
                device_id="d",
            )
        for _ in range(100):
            if b.stats.received == 12:
                break
            await asyncio.sleep(0.02)
        assert b.pending() == 5 and b.stats.dropped_overflow == 7
        got = [(await b.recv(timeout=1)).msg for _ in range(5)]
        assert [x.token_id for x in got if isinstance(x, m.DecodeStep)] == [0, 1, 2, 3, 4]
        await a.publish(t.DEVICE_INBOX, m.Release(request_id="r", reason="x"), device_id="d")
        assert isinstance((await b.recv(timeout=5)).msg, m.Release)


async def test_queue_bytes_bound(mosquitto: MosquittoBroker, cluster: str) -> None:
    cfg = cfg_for(mosquitto, cluster)
    async with Bus(cfg) as a, Bus(cfg_for(mosquitto, cluster, queue_bytes=3_000_000)) as b:
        await b.subscribe(t.DEVICE_INBOX, device_id="d")
        act = m.Activation(
            request_id="r",
            attempt=0,
            phase="prefill",
            hidden=f32(1, 512, 576),
            position_start=0,
            step=0,
        )  # 1.2 MB
        for _ in range(4):
            await a.publish(t.DEVICE_INBOX, act, device_id="d")
        for _ in range(100):
            if b.stats.received == 4:
                break
            await asyncio.sleep(0.02)
        assert b.pending() == 2 and b.stats.dropped_overflow == 2


async def test_reconnect_after_broker_restart(tmp_path: Path, cluster: str) -> None:
    broker = MosquittoBroker(MosquittoConfig(persistence=True), workdir=tmp_path)
    async with broker:
        cfg = cfg_for(broker, cluster, backoff_max=0.5)
        async with Bus(cfg) as dev, Bus(cfg) as orch:
            await orch.subscribe(t.DEVICE_INBOX, device_id="d")
            await dev.publish(t.DEVICE_STATE, state("d"), device_id="d")
            await asyncio.to_thread(broker.restart, down_for=0.3, hard=True)
            # clean sessions: a subscriber must be back before it can receive
            for _ in range(200):
                if dev.stats.connects == 2 and orch.stats.connects == 2:
                    break
                await asyncio.sleep(0.02)
            # publish waits for the reconnect instead of failing
            await dev.publish(
                t.DEVICE_INBOX, m.Release(request_id="r", reason="x"), device_id="d", timeout=10
            )
            env = await orch.recv(timeout=10)
            assert isinstance(env.msg, m.Release)
            assert dev.stats.connects == 2 and orch.stats.connects == 2
            # the retained state was lost with the SIGKILLed broker and re-published
            await orch.subscribe(t.DEVICE_STATE)
            st = await orch.recv(timeout=5)
            assert st.retained and isinstance(st.msg, m.DeviceState)


async def test_publish_times_out_while_broker_down(tmp_path: Path, cluster: str) -> None:
    broker = MosquittoBroker(workdir=tmp_path)
    async with broker, Bus(cfg_for(broker, cluster)) as bus:
        await asyncio.to_thread(broker.stop)
        for _ in range(100):
            if not bus.connected:
                break
            await asyncio.sleep(0.02)
        with pytest.raises(BusTimeout) as info:
            await bus.publish(
                t.DEVICE_INBOX, m.Release(request_id="r", reason="x"), device_id="d", timeout=0.3
            )
        assert info.value.operation == "publish" and "device/d/inbox" in str(info.value)


async def test_refused_connection_fails_at_once_with_the_reason(cluster: str) -> None:
    """Nothing listens: the kernel refuses, so there is nothing to wait 10 s for."""
    port = free_port()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(BusConnectError) as info:
        async with Bus(BusConfig(port=port, cluster=cluster)):
            pass
    assert loop.time() - t0 < 2.0
    assert str(info.value) == f"cannot reach the broker at 127.0.0.1:{port}: connection refused"
    assert (info.value.host, info.value.port, info.value.reason) == (
        "127.0.0.1",
        port,
        "connection refused",
    )


async def test_unknown_host_and_silent_listener_have_their_own_reasons(cluster: str) -> None:
    with pytest.raises(BusConnectError) as info:
        async with Bus(BusConfig(host="no-such-host.invalid", cluster=cluster)):
            pass
    assert info.value.reason.startswith("unknown host (")
    # a TCP listener that never speaks MQTT: connected, but no CONNACK
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        with pytest.raises(BusConnectError) as info:
            async with Bus(BusConfig(port=port, cluster=cluster, connect_timeout=0.5)):
                pass
    assert str(info.value) == f"cannot reach the broker at 127.0.0.1:{port}: no answer within 0.5 s"


async def test_a_service_waits_for_a_broker_that_starts_later(
    tmp_path: Path, cluster: str, caplog: pytest.LogCaptureFixture
) -> None:
    """wait_for_broker: one line saying why, retries with backoff, connects once it is up."""
    port = free_port()
    broker = MosquittoBroker(MosquittoConfig(port=port), workdir=tmp_path)
    cfg = BusConfig(port=port, cluster=cluster, wait_for_broker=True, backoff_max=0.2)
    with caplog.at_level("WARNING", logger="e2llm_edge.wire.bus"):
        entering = asyncio.ensure_future(Bus(cfg).__aenter__())
        await asyncio.sleep(1.0)  # several attempts, all refused
        assert not entering.done()
        async with broker:
            bus = await asyncio.wait_for(entering, 10)
            try:
                assert bus.connected
            finally:
                await bus.__aexit__(None, None, None)
    where = f"the broker at 127.0.0.1:{port}"
    assert [r.getMessage() for r in caplog.records] == [
        f"cannot reach {where}: connection refused; retrying until it answers",
        f"{where} answers now",
    ]


async def test_a_device_probes_its_message_path_and_keeps_what_else_arrives(
    mosquitto: MosquittoBroker, cluster: str
) -> None:
    """The agent's probe (`device.probe`) through a real broker: it measures a cost per
    pass and per MB, and work that arrives on the inbox meanwhile is handed on, not lost."""
    from e2llm_edge.device.probe import probe_message_path

    cfg = cfg_for(mosquitto, cluster)
    async with Bus(cfg) as peer, Bus(cfg) as device:
        await device.subscribe(t.DEVICE_INBOX, device_id="d1")
        release = m.Release(request_id="r", attempt=0, reason="cancelled")
        await peer.publish(t.DEVICE_INBOX, release, device_id="d1")
        kept: list[m.Message] = []
        found = await probe_message_path(device, "d1", lambda env: kept.append(env.msg))
        assert found.pass_s > 0 and found.io_s_per_mb > 0 and 0 < found.cpu_share <= 1
        assert kept == [release]
        assert device.pending() == 0  # every probe came back and was consumed
