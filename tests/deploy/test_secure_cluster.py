"""A real cluster with authentication on: Mosquitto from the project's rendered config with
passwords and the ACL that `e2llm broker init` generates, the orchestrator and 4 agents as
processes, each logged in as its own user.

Proves: the pipeline still answers exactly as the local path does (Python client and the
`e2llm generate` CLI); wrong passwords are refused (library and a real agent process);
a device that spies on another device's inbox or forges a plan gets nothing through while
real traffic flows; the monitor user reads telemetry and request events but never
requests or responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2llm_edge.client import Client, collect
from e2llm_edge.device.local import LocalModel
from e2llm_edge.errors import BusAuthError, BusTimeout, SubscriptionRefused
from e2llm_edge.fog.textio import ChatTokenizer
from e2llm_edge.ops.broker_cli import init, password_file
from e2llm_edge.ops.demo import bundled_inventory
from e2llm_edge.ops.localcluster import LocalCluster
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig, Envelope

pytestmark = [pytest.mark.model, pytest.mark.mosquitto, pytest.mark.slow, pytest.mark.timeout(240)]

CLUSTER = "secure"
PROMPT = "List three primary colours."
MAX_NEW = 12
E2LLM = [sys.executable, "-m", "e2llm_edge.cli"]


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("secure") / "secrets"
    devices = [d["id"] for d in yaml.safe_load(bundled_inventory().read_text())["devices"]]
    init(devices, out, cluster=CLUSTER, clients=["client", "other-client"], force=False)
    return out


@pytest.fixture(scope="module")
def cluster(
    default_model: Path, secrets_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    inventory = yaml.safe_load(bundled_inventory().read_text())
    with LocalCluster(
        default_model,
        inventory,
        cluster=CLUSTER,
        verbose=False,
        secrets_dir=secrets_dir,
        workdir=tmp_path_factory.mktemp("secure-cluster"),
    ) as c:
        c.wait_serving(timeout=150)  # as the monitor user: plan + cluster telemetry
        yield c


@pytest.fixture(scope="module")
def local_ids(default_model: Path) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) of PROMPT on the local, single-process path."""
    model = LocalModel(default_model)
    prompt = ChatTokenizer(model.manifest).encode_prompt(PROMPT)
    return prompt, list(model.generate(prompt, MAX_NEW))


@contextlib.asynccontextmanager
async def login(
    c: LocalCluster, user: str, password: str | None = None, **over: Any
) -> AsyncIterator[Bus]:
    cfg = c.bus_config(user, connect_timeout=5, **over)
    if password is not None:
        cfg = BusConfig(**{**cfg.__dict__, "password": password})
    async with Bus(cfg, publish_will_on_close=False) as bus:
        yield bus


async def subscribe_or_refused(bus: Bus, topic: t.Topic, **ids: str) -> None:
    """Mosquitto may refuse in SUBACK or accept and filter deliveries; both keep data out."""
    with contextlib.suppress(SubscriptionRefused):
        await bus.subscribe(topic, **ids)


async def drain(bus: Bus, quiet: float = 0.5, most: float = 5.0) -> list[Envelope]:
    """What arrives until ``quiet`` seconds pass without a message (at most ``most`` s)."""
    got: list[Envelope] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + most
    with contextlib.suppress(BusTimeout):
        while (left := deadline - loop.time()) > 0:
            got.append(await bus.recv(timeout=min(quiet, left)))
    return got


async def ask(c: LocalCluster, prompt: str = PROMPT, user: str = "client") -> dict[str, Any]:
    async with Client(c.bus_config(user)) as client:
        return await collect(client, prompt, max_new_tokens=MAX_NEW, timeout=60)


def roles(c: LocalCluster) -> dict[str, list[str]]:
    """Device ids per role under the current plan."""
    plan = c.wait_serving(timeout=10)
    out: dict[str, list[str]] = {}
    for r in plan.replicas:
        out.setdefault(r.role, []).extend(s.device_id for s in r.stages)
    return out


def test_pipeline_answers_like_the_local_path_with_auth_on(
    cluster: LocalCluster, local_ids: tuple[list[int], list[int]]
) -> None:
    prompt_ids, new_ids = local_ids
    got = asyncio.run(ask(cluster))
    assert got["prompt_ids"] == prompt_ids
    assert got["new_ids"] == new_ids
    # and as a user runs it: the CLI with its own user and password file
    assert cluster.broker_url is not None and cluster.secrets_dir is not None
    cli = subprocess.run(
        [
            *E2LLM,
            "generate",
            "--broker",
            cluster.broker_url,
            "--cluster",
            CLUSTER,
            "--username",
            "other-client",
            "--password-file",
            str(password_file(cluster.secrets_dir, "other-client")),
            "--max-new-tokens",
            str(MAX_NEW),
            "--json",
            PROMPT,
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["new_ids"] == new_ids


def test_wrong_password_is_refused(cluster: LocalCluster, tmp_path: Path) -> None:
    async def attempt(user: str, password: str) -> None:
        with pytest.raises(BusAuthError):
            async with login(cluster, user, password):
                pass

    async def anonymous() -> None:
        assert cluster.broker_url is not None
        with pytest.raises(BusAuthError):
            async with Bus(BusConfig.from_url(cluster.broker_url, connect_timeout=5)):
                pass

    asyncio.run(attempt("pi-a", "guess"))
    asyncio.run(
        attempt(
            "orchestrator",
            cluster.credentials.users["pi-a"],  # type: ignore[union-attr]
        )
    )
    asyncio.run(anonymous())
    # a real agent process with a wrong password file gives up instead of serving
    bad = tmp_path / "bad.password"
    bad.write_text("not-the-password\n")
    assert cluster.broker_url is not None
    proc = subprocess.run(
        [
            *E2LLM,
            "agent",
            "--broker",
            cluster.broker_url,
            "--cluster",
            CLUSTER,
            "--username",
            "pi-a",
            "--password-file",
            str(bad),
            "--device-id",
            "pi-a",
            "--memory-mb",
            "400",
            "--model",
            str(cluster.model_dir),
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert proc.returncode != 0
    assert "BusAuthError" in proc.stderr or "refused" in proc.stderr.lower(), proc.stderr[-2000:]
    assert roles(cluster)  # the impostor did not disturb the plan


def test_device_cannot_spy_on_a_peer_inbox_or_forge_a_plan(
    cluster: LocalCluster, local_ids: tuple[list[int], list[int]]
) -> None:
    by_role = roles(cluster)
    spy, victim = by_role["prefill"][0], by_role["decoder"][0]

    async def scenario() -> tuple[list[Envelope], list[Envelope], list[Envelope], int, dict]:
        async with (
            login(cluster, spy, client_id=f"spy-{spy}") as dev,
            login(cluster, "monitor") as mon,
        ):
            await subscribe_or_refused(dev, t.DEVICE_INBOX, device_id=victim)
            await subscribe_or_refused(dev, t.DEVICE_INBOX)  # wildcard: only its own
            await subscribe_or_refused(dev, t.RESPONSE)
            await subscribe_or_refused(dev, t.REQUEST)
            await mon.subscribe(t.PLAN)
            plan_before = (await mon.recv(timeout=5)).msg
            assert isinstance(plan_before, m.PlanMsg)
            await mon.subscribe(t.DEVICE_STATE, device_id=victim)
            forged = dataclasses.replace(plan_before.plan, version=999)
            await dev.publish(t.PLAN, m.PlanMsg(plan=forged, plan_version=999))
            await dev.publish(
                t.DEVICE_STATE,
                m.DeviceState(device_id=victim, status=m.DeviceStatus.ERROR),
                device_id=victim,
            )
            answer = await ask(cluster)  # real traffic through the victim's inbox
            seen_by_spy = await drain(dev)
            seen_by_monitor = await drain(mon)
        async with login(cluster, "monitor") as mon:  # a fresh subscriber: retained plan
            await mon.subscribe(t.PLAN)
            retained = [e for e in await drain(mon) if isinstance(e.msg, m.PlanMsg)]
        return seen_by_spy, seen_by_monitor, retained, plan_before.plan.version, answer

    seen_by_spy, seen_by_monitor, retained, version, answer = asyncio.run(scenario())
    # the spy received only its own inbox (it is on the prefill path), never the victim's
    assert seen_by_spy, "the spy device should still see its own inbox traffic"
    assert {e.ids.get("device_id") for e in seen_by_spy} == {spy}
    assert {e.topic for e in seen_by_spy} == {t.DEVICE_INBOX}
    # the monitor saw no forged plan, and only the victim's own (ready) states
    assert not [e for e in seen_by_monitor if e.topic is t.PLAN]
    states = [e.msg for e in seen_by_monitor if isinstance(e.msg, m.DeviceState)]
    assert states and {s.status for s in states} == {"ready"}, states
    assert [e.msg.plan.version for e in retained] == [version]  # type: ignore[attr-defined]
    assert answer["new_ids"] == local_ids[1]  # the cluster kept serving correctly
    assert roles(cluster)["decoder"][0] == victim


def test_monitor_reads_telemetry_but_no_requests_or_responses(cluster: LocalCluster) -> None:
    async def scenario() -> tuple[list[Envelope], list[Envelope], dict]:
        async with (
            login(cluster, "monitor") as mon,
            login(cluster, "monitor", client_id="monitor-events") as events,
        ):
            await subscribe_or_refused(mon, t.REQUEST)
            await subscribe_or_refused(mon, t.RESPONSE)
            await subscribe_or_refused(mon, t.ORCHESTRATOR_INBOX)
            await subscribe_or_refused(mon, t.DEVICE_INBOX)
            await events.subscribe(t.REQUEST_EVENTS)
            await events.subscribe(t.DEVICE_TELEMETRY)
            answer = await ask(cluster, "Tell me a secret word.")
            return await drain(mon), await drain(events, quiet=2.5, most=3.0), answer

    leaked, allowed, answer = asyncio.run(scenario())
    assert not leaked, [e.topic_str for e in leaked]
    kinds = [e.msg.event for e in allowed if isinstance(e.msg, m.RequestEvent)]
    assert kinds[0] == "queued" and kinds[-1] == "done", kinds
    assert {e.msg.device_id for e in allowed if isinstance(e.msg, m.DeviceTelemetry)}
    blob = json.dumps(
        [dataclasses.asdict(e.msg.data) for e in allowed if isinstance(e.msg, m.RequestEvent)],
        default=str,
    )
    assert "secret" not in blob and answer["text"] not in blob
    # and the monitor CLI works with exactly these rights
    assert cluster.broker_url is not None and cluster.secrets_dir is not None
    snap = subprocess.run(
        [
            *E2LLM,
            "monitor",
            "--json",
            "--once",
            "--broker",
            cluster.broker_url,
            "--cluster",
            CLUSTER,
            "--username",
            "monitor",
            "--password-file",
            str(password_file(cluster.secrets_dir, "monitor")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert snap.returncode == 0, snap.stderr
    assert "warning" not in snap.stderr
    last = json.loads(snap.stdout.splitlines()[-1])
    assert len(last["devices"]) == 4 and last["cluster_summary"]["completed"] >= 1
