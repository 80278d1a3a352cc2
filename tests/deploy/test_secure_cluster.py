"""A real cluster secured as documented: Mosquitto with TLS, client certificates and the
ACL that `e2llm broker init` generates, the orchestrator and 4 agents as processes, each
connected with its own identity.

Proves: the pipeline answers exactly as the local path does (Python client and the
`e2llm generate` CLI); plaintext clients and certificates from another CA are refused
(library and a real agent process, which prints one line); a device that spies on another
device's inbox or forges a plan gets nothing through while real traffic flows; the
monitor reads telemetry and request events but never requests or responses; a capture of
the broker's port holds no prompt or answer text; a revoked device is locked out while
the rest keep serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sniffer import LoopbackSniffer, can_sniff

from e2llm_edge.client import Client, collect
from e2llm_edge.device.local import LocalModel
from e2llm_edge.errors import BusTimeout, BusTLSError, SubscriptionRefused
from e2llm_edge.fog.textio import ChatTokenizer
from e2llm_edge.ops.broker import MosquittoBroker, free_port
from e2llm_edge.ops.broker_cli import identity_dir, init
from e2llm_edge.ops.demo import bundled_inventory
from e2llm_edge.ops.localcluster import LocalCluster, Proc, pinned_prefill_decoder
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig, Envelope, TLSConfig

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
        # both roles on screen: pinned (the role search may pick mixed replicas here)
        orchestrator_args=[
            "--plan",
            str(
                pinned_prefill_decoder(
                    tmp_path_factory.mktemp("plan") / "plan.yaml",
                    ("pi-a", "jetson"),
                    ("pi-b", "minipc"),
                    30,
                )
            ),
        ],
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
async def login(c: LocalCluster, user: str, **over: Any) -> AsyncIterator[Bus]:
    cfg = c.bus_config(user, connect_timeout=5, **over)
    async with Bus(cfg, publish_will_on_close=False) as bus:
        yield bus


async def refused(cfg: BusConfig) -> BusTLSError:
    with pytest.raises(BusTLSError) as info:
        async with Bus(cfg, publish_will_on_close=False):
            pass
    return info.value


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


def test_pipeline_answers_like_the_local_path_over_tls(
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
            "--identity",
            str(identity_dir(cluster.secrets_dir, "other-client")),
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


def test_plaintext_and_foreign_certificates_are_refused(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    assert cluster.broker_url is not None and cluster.broker_url.startswith("mqtts://")
    plain = cluster.broker_url.replace("mqtts://", "mqtt://")
    err = asyncio.run(refused(BusConfig.from_url(plain, cluster=CLUSTER, connect_timeout=3)))
    assert err.problem == "expects_tls"
    other = tmp_path / "other"  # another cluster's CA, with the same names
    devices = [d["id"] for d in yaml.safe_load(bundled_inventory().read_text())["devices"]]
    init(devices, other, cluster=CLUSTER, clients=["client"], force=False)
    stranger = identity_dir(other, "pi-a")
    assert cluster.secrets_dir is not None
    ours = cluster.secrets_dir / "ca.crt"
    tls = TLSConfig(str(ours), str(stranger / "client.crt"), str(stranger / "client.key"))
    cfg = BusConfig.from_url(cluster.broker_url, cluster=CLUSTER, tls=tls, connect_timeout=5)
    assert asyncio.run(refused(cfg)).problem == "client_unknown_ca"
    # a real agent process with that identity prints one line and gives up
    proc = subprocess.run(
        [*E2LLM, "agent", "--broker", cluster.broker_url, "--cluster", CLUSTER,
         "--identity", str(stranger), "--device-id", "pi-a", "--memory-mb", "400",
         "--model", str(cluster.model_dir), "--threads", "1"],
        capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[0].startswith("error: TLS with broker 127.0.0.1:"), lines
    # its own CA did not sign our broker: it stops at the broker's certificate
    assert "the broker's certificate is not signed by the CA in" in lines[0], lines
    assert lines[0].endswith("(unknown CA): is this identity from this cluster?"), lines
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
            "--identity",
            str(identity_dir(cluster.secrets_dir, "monitor")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert snap.returncode == 0, snap.stderr
    assert "warning" not in snap.stderr
    last = json.loads(snap.stdout.splitlines()[-1])
    assert len(last["devices"]) == 4 and last["cluster_summary"]["completed"] >= 1


def test_the_gateway_serves_over_tls_with_a_client_and_a_monitor_identity(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    """`e2llm gateway` as compose runs it: requests as `client`, /metrics as `monitor`."""
    pytest.importorskip("aiohttp")
    assert cluster.broker_url is not None and cluster.secrets_dir is not None
    port = free_port()
    gw = Proc(
        "gateway",
        [*E2LLM, "gateway", "--broker", cluster.broker_url, "--cluster", CLUSTER,
         "--identity", str(identity_dir(cluster.secrets_dir, "client")),
         "--monitor-identity", str(identity_dir(cluster.secrets_dir, "monitor")),
         "--model", str(cluster.model_dir), "--port", str(port)],
        tmp_path / "gateway.log",
    )  # fmt: skip
    gw.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert gw.alive, gw.tail()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, f"gateway not healthy:\n{gw.tail()}"
            time.sleep(0.2)
        body = {
            "model": cluster.model_dir.name,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": MAX_NEW,
            "temperature": 0,
        }
        req = urllib.request.Request(
            f"{url}/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=90) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
        assert answer == asyncio.run(ask(cluster))["text"]
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
            text = r.read().decode()
        assert "e2llm_device_status{" in text  # read from the monitor topics
    finally:
        gw.stop()


@pytest.mark.skipif(not can_sniff(), reason="capturing loopback needs root (AF_PACKET)")
def test_a_capture_of_the_broker_port_holds_no_prompt_or_answer_text(
    cluster: LocalCluster, mosquitto: MosquittoBroker
) -> None:
    prompt = "Repeat after me: the violet heron sleeps under quartz mountains."
    # the sniffer itself: through a plaintext broker the same prompt is there to read
    with LoopbackSniffer(mosquitto.port) as control:

        async def publish_plain() -> None:
            cfg = BusConfig.from_url(mosquitto.url, cluster="sniff")
            async with Bus(cfg) as bus:
                req = m.GenerateRequest(request_id="s", client_id="c", prompt=prompt)
                await bus.publish(t.REQUEST, req, client_id="c")

        asyncio.run(publish_plain())
    assert prompt.encode() in control.captured()

    assert cluster.broker is not None
    with LoopbackSniffer(cluster.broker.port) as tap:
        answer = asyncio.run(ask(cluster, prompt))
    seen = tap.captured()
    assert answer["new_ids"] and len(answer["text"]) >= 12, answer
    assert tap.packets > 20 and len(seen) > 50_000, (tap.packets, len(seen))  # KV, activations
    assert b"\x17\x03\x03" in seen  # TLS application data records
    for secret in (prompt, answer["text"], "violet heron", "quartz mountains"):
        assert secret.encode() not in seen, secret


def test_revoked_device_is_locked_out_while_the_rest_keep_serving(
    cluster: LocalCluster, local_ids: tuple[list[int], list[int]]
) -> None:
    """Last in this module: it changes the cluster. The stolen board is a decoder."""
    plan = cluster.wait_serving(timeout=10)
    stolen = roles(cluster)["decoder"][0]
    assert cluster.secrets_dir is not None and cluster.broker is not None
    proc = subprocess.run(
        [*E2LLM, "broker", "revoke", stolen, "--out", str(cluster.secrets_dir)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert f"{stolen!r} revoked" in proc.stdout
    cluster.broker.reload()  # a broker the CLI did not start: reloaded by its owner
    # its heartbeats no longer reach the orchestrator: a new plan without it
    new = cluster.wait_serving(timeout=120, min_version=plan.version + 1)
    assert stolen not in {s.device_id for r in new.replicas for s in r.stages}
    assert asyncio.run(ask(cluster))["new_ids"] == local_ids[1]  # the rest keep serving
    # the board cannot come back: restarted, its agent prints one line and exits
    agent = cluster.restart_agent(stolen)
    assert agent.proc is not None
    assert agent.proc.wait(60) == 2
    assert agent.tail(3).splitlines()[-1].endswith("it has been revoked"), agent.tail()
