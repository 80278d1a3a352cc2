"""Broker auth and the generated ACL, proven against a real Mosquitto."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from e2llm_edge.errors import BusAuthError, BusTimeout, SubscriptionRefused
from e2llm_edge.ops.broker import Credentials, MosquittoBroker, render_acl
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig

from .factories import a_plan

ACL_CLUSTER = "aclc"  # matches tests/conftest.py auth_mosquitto

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(30)]
Auth = tuple[MosquittoBroker, Credentials]
QUIET = 0.4  # how long "nothing arrives" is watched


@contextlib.asynccontextmanager
async def login(auth: Auth, user: str, password: str | None = None) -> AsyncIterator[Bus]:
    broker, creds = auth
    cfg = BusConfig(
        host=broker.host,
        port=broker.port,
        cluster=ACL_CLUSTER,
        username=user,
        password=password if password is not None else creds.users[user],
        connect_timeout=3,
    )
    async with Bus(cfg, publish_will_on_close=False) as bus:
        yield bus


async def nothing_arrives(bus: Bus) -> None:
    with pytest.raises(BusTimeout):
        env = await bus.recv(timeout=QUIET)
        pytest.fail(f"unexpected delivery on {env.topic_str}")


async def subscribe_or_refused(bus: Bus, topic: t.Topic, device_id: str | None = None) -> None:
    """Mosquitto may refuse in SUBACK or accept and filter deliveries; both keep data out."""
    with contextlib.suppress(SubscriptionRefused):
        if device_id is None:
            await bus.subscribe(topic)
        else:
            await bus.subscribe(topic, device_id=device_id)


async def test_wrong_password_and_anonymous_are_refused(auth_mosquitto: Auth) -> None:
    with pytest.raises(BusAuthError) as info:
        async with login(auth_mosquitto, "dev-a", "not-the-password"):
            pass
    assert info.value.username == "dev-a"
    broker, _ = auth_mosquitto
    with pytest.raises(BusAuthError):
        async with Bus(
            BusConfig(host=broker.host, port=broker.port, cluster=ACL_CLUSTER, connect_timeout=3)
        ):
            pass


async def test_device_reads_only_its_own_inbox(auth_mosquitto: Auth) -> None:
    step = m.DecodeStep(request_id="r", attempt=0, token_id=1, position=0, step=0)
    async with (
        login(auth_mosquitto, "orchestrator") as orch,
        login(auth_mosquitto, "dev-a") as a,
        login(auth_mosquitto, "dev-b") as b,
    ):
        await subscribe_or_refused(a, t.DEVICE_INBOX, device_id="dev-b")
        await subscribe_or_refused(a, t.DEVICE_INBOX)  # wildcard: still only its own
        await b.subscribe(t.DEVICE_INBOX, device_id="dev-b")
        await orch.publish(t.DEVICE_INBOX, step, device_id="dev-b")
        assert isinstance((await b.recv(timeout=3)).msg, m.DecodeStep)
        await nothing_arrives(a)
        # data path: a device may write a peer's inbox (activations, KV handoff)
        await a.publish(t.DEVICE_INBOX, m.Release(request_id="r", reason="x"), device_id="dev-b")
        assert isinstance((await b.recv(timeout=3)).msg, m.Release)


async def test_only_orchestrator_publishes_the_plan(auth_mosquitto: Auth) -> None:
    async with (
        login(auth_mosquitto, "orchestrator") as orch,
        login(auth_mosquitto, "dev-a") as a,
        login(auth_mosquitto, "monitor") as mon,
    ):
        await a.subscribe(t.PLAN)
        await mon.subscribe(t.PLAN)
        await a.publish(t.PLAN, m.PlanMsg(plan=a_plan(99), plan_version=99))
        await nothing_arrives(mon)
        await orch.publish(t.PLAN, m.PlanMsg(plan=a_plan(1), plan_version=1))
        for bus in (a, mon):
            env = await bus.recv(timeout=3)
            assert isinstance(env.msg, m.PlanMsg) and env.msg.plan == a_plan(1)


async def test_device_cannot_speak_for_another_device(auth_mosquitto: Auth) -> None:
    async with login(auth_mosquitto, "orchestrator") as orch, login(auth_mosquitto, "dev-a") as a:
        await orch.subscribe(t.ORCHESTRATOR_INBOX)
        await orch.subscribe(t.DEVICE_STATE)
        hb = m.Heartbeat(device_id="dev-b", ts=1.0)
        await a.publish(t.ORCHESTRATOR_INBOX, hb, device_id="dev-b")
        await a.publish(
            t.DEVICE_STATE,
            m.DeviceState(device_id="dev-b", status=m.DeviceStatus.ERROR),
            device_id="dev-b",
        )
        await nothing_arrives(orch)
        await a.publish(
            t.ORCHESTRATOR_INBOX, m.Heartbeat(device_id="dev-a", ts=2.0), device_id="dev-a"
        )
        env = await orch.recv(timeout=3)
        assert env.ids == {"device_id": "dev-a"}


async def test_clients_see_only_their_responses_and_monitor_no_user_data(
    auth_mosquitto: Auth,
) -> None:
    async with (
        login(auth_mosquitto, "orchestrator") as orch,
        login(auth_mosquitto, "client") as cli,
        login(auth_mosquitto, "monitor") as mon,
        login(auth_mosquitto, "dev-a") as a,
    ):
        await cli.subscribe(t.RESPONSE, client_id="client")
        await subscribe_or_refused(mon, t.RESPONSE)
        await subscribe_or_refused(mon, t.REQUEST)
        await subscribe_or_refused(a, t.RESPONSE)
        await orch.subscribe(t.REQUEST)
        await cli.publish(
            t.REQUEST,
            m.GenerateRequest(request_id="q1", client_id="client", prompt="secret"),
            client_id="client",
        )
        req = await orch.recv(timeout=3)
        assert req.ids == {"client_id": "client"}
        await cli.publish(
            t.REQUEST,
            m.GenerateRequest(request_id="q2", client_id="x", prompt="spoof"),
            client_id="someone",
        )
        await nothing_arrives(orch)
        ev = m.ResponseEvent(request_id="q1", event="done", text="answer")
        await orch.publish(t.RESPONSE, ev, client_id="client", request_id="q1")
        await orch.publish(t.RESPONSE, ev, client_id="someone", request_id="q1")
        got = await cli.recv(timeout=3)
        assert got.ids == {"client_id": "client", "request_id": "q1"}
        await nothing_arrives(cli)
        await nothing_arrives(mon)
        await nothing_arrives(a)
        await mon.subscribe(t.REQUEST_EVENTS)
        await orch.publish(
            t.REQUEST_EVENTS,
            m.RequestEvent(request_id="q1", event=m.RequestEventKind.DONE),
            request_id="q1",
        )
        assert isinstance((await mon.recv(timeout=3)).msg, m.RequestEvent)


def test_render_acl_rules_are_built_from_topics() -> None:
    acl = render_acl(["pi-1"], "orch", "mon", "lab")
    lines = acl.splitlines()
    block = lines[lines.index("user pi-1") : lines.index("user orch")]
    assert "topic read e2llm/lab/device/pi-1/inbox" in block
    assert "topic write e2llm/lab/device/+/inbox" in block
    assert not any(x.startswith("topic read e2llm/lab/device/+") for x in block)
    assert "topic readwrite e2llm/lab/plan" in acl
    assert not any("plan" in x and "write" in x for x in block)
    assert "pattern read e2llm/lab/response/%u/+" in acl
