"""TLS with client certificates against a real Mosquitto, configured as `e2llm broker init`
makes it: who gets in, as whom, and the one line each refusal prints.

Refused: a plaintext client, no certificate, a certificate from another CA (either side),
an expired one, a broker certificate for another host, a key that is not the
certificate's, a revoked device (while the others keep working). Admitted identities are
held to the ACL. The command line tools (`broker init|revoke|add-device|renew`) drive a
broker started from the `mosquitto.local.conf` they write.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import getpass
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from e2llm_edge.errors import BusTimeout, BusTLSError, SubscriptionRefused
from e2llm_edge.ops import broker_cli
from e2llm_edge.ops.broker import (
    BrokerTLS,
    MosquittoBroker,
    MosquittoConfig,
    find_mosquitto,
    free_port,
)
from e2llm_edge.ops.pki import ClusterCA
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig, TLSConfig
from planner import Plan

from .factories import a_plan

pytestmark = [pytest.mark.mosquitto, pytest.mark.timeout(60)]
CLUSTER = "tlsc"
DEVICES = ["dev-a", "dev-b"]
QUIET = 0.4
E2LLM = [sys.executable, "-m", "e2llm_edge.cli"]


def _need_mosquitto() -> None:
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.skip("mosquitto not installed")


def make_secrets(out: Path) -> Path:
    broker_cli.init(DEVICES, out, cluster=CLUSTER, clients=["client"], force=False)
    return out


@contextlib.contextmanager
def tls_broker(secrets: Path, workdir: Path) -> Iterator[MosquittoBroker]:
    _need_mosquitto()
    cfg = MosquittoConfig(acl_file=secrets / "acl", tls=BrokerTLS.from_dir(secrets))
    with MosquittoBroker(cfg, workdir=workdir) as broker:
        yield broker


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_secrets(tmp_path_factory.mktemp("tls") / "secrets")


@pytest.fixture(scope="module")
def broker(secrets: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    with tls_broker(secrets, tmp_path_factory.mktemp("tls-broker")) as b:
        yield b


def ident(secrets: Path, name: str) -> Path:
    return broker_cli.identity_dir(secrets, name)


def config(broker: MosquittoBroker, tls: TLSConfig | None, **over: object) -> BusConfig:
    values: dict[str, object] = {
        "host": broker.host,
        "port": broker.port,
        "cluster": CLUSTER,
        "tls": tls,
        "connect_timeout": 3,
    }
    values.update(over)
    return BusConfig(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def login(broker: MosquittoBroker, secrets: Path, name: str) -> AsyncIterator[Bus]:
    cfg = config(broker, TLSConfig.from_identity(ident(secrets, name)), username=name)
    async with Bus(cfg, publish_will_on_close=False) as bus:
        yield bus


async def refused(cfg: BusConfig) -> BusTLSError:
    with pytest.raises(BusTLSError) as info:
        async with Bus(cfg, publish_will_on_close=False):
            pass
    return info.value


async def nothing_arrives(bus: Bus) -> None:
    with pytest.raises(BusTimeout):
        env = await bus.recv(timeout=QUIET)
        pytest.fail(f"unexpected delivery on {env.topic_str}")


async def plans_seen(bus: Bus) -> list[Plan]:
    """Plans delivered to ``bus`` (a retained one first, if any) until it falls quiet."""
    got = []
    with contextlib.suppress(BusTimeout):
        while True:
            env = await bus.recv(timeout=QUIET)
            assert isinstance(env.msg, m.PlanMsg)
            got.append(env.msg.plan)
    return got


def served_certificate(broker: MosquittoBroker, secrets: Path) -> bytes:
    """The certificate the broker shows in a handshake (DER)."""
    ctx = ssl.create_default_context(cafile=str(secrets / "ca.crt"))
    ctx.load_cert_chain(*(str(ident(secrets, "dev-b") / f) for f in ("client.crt", "client.key")))
    with (
        socket.create_connection((broker.host, broker.port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=broker.host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def step(rid: str = "r") -> m.DecodeStep:
    return m.DecodeStep(request_id=rid, attempt=0, token_id=1, position=0, step=0)


# --------------------------------------------------------------------------- identities


def test_init_writes_a_ca_identities_and_private_keys_0600(secrets: Path) -> None:
    assert (secrets.stat().st_mode & 0o777) == 0o700
    for key in [secrets / "ca.key", secrets / "broker.key"] + [
        ident(secrets, n) / "client.key" for n in [*DEVICES, "orchestrator", "monitor", "client"]
    ]:
        assert (key.stat().st_mode & 0o777) == 0o600, key
    ca = ClusterCA(secrets)
    assert {x.name for x in ca.issued} == {*DEVICES, "orchestrator", "monitor", "client", "broker"}
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(secrets / "ca.crt"), "-crl_check", "-CRLfile",
         str(secrets / "crl.pem"), str(ident(secrets, "dev-a") / "client.crt")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0 and ": OK" in out.stdout, out.stdout + out.stderr
    subject = subprocess.run(
        ["openssl", "x509", "-noout", "-subject", "-in",
         str(ident(secrets, "dev-a") / "client.crt")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert re.search(r"CN\s*=\s*dev-a", subject), subject
    text = (secrets / "mosquitto.local.conf").read_text().splitlines()
    for line in (
        "require_certificate true",
        "use_identity_as_username true",
        "listener 8883 0.0.0.0",
    ):
        assert line in text
    assert f"crlfile {secrets.resolve() / 'crl.pem'}" in text


async def test_identity_gets_in_as_its_certificate_name_and_the_acl_applies(
    broker: MosquittoBroker, secrets: Path
) -> None:
    async with (
        login(broker, secrets, "orchestrator") as orch,
        login(broker, secrets, "dev-a") as a,
        login(broker, secrets, "dev-b") as b,
        login(broker, secrets, "monitor") as mon,
    ):
        assert a.tcp_nodelay_active()
        with contextlib.suppress(SubscriptionRefused):  # refused, or accepted and filtered
            await a.subscribe(t.DEVICE_INBOX, device_id="dev-b")
        await b.subscribe(t.DEVICE_INBOX, device_id="dev-b")
        await orch.publish(t.DEVICE_INBOX, step(), device_id="dev-b")
        assert isinstance((await b.recv(timeout=3)).msg, m.DecodeStep)
        await nothing_arrives(a)  # dev-a's certificate cannot read dev-b's inbox
        await mon.subscribe(t.PLAN)
        await a.publish(t.PLAN, m.PlanMsg(plan=a_plan(99), plan_version=99))
        assert a_plan(99) not in await plans_seen(mon)  # nor write a plan
        await orch.publish(t.PLAN, m.PlanMsg(plan=a_plan(1), plan_version=1))
        env = await mon.recv(timeout=3)
        assert isinstance(env.msg, m.PlanMsg) and env.msg.plan == a_plan(1)


async def test_large_messages_cross_tls_intact(broker: MosquittoBroker, secrets: Path) -> None:
    """Near the 4 MiB message limit, in both directions (corked writes, capped reads)."""
    rng = np.random.default_rng(0)
    key = rng.standard_normal((1, 3, 2600, 64), dtype=np.float32)  # 2 x 2 MB
    chunk = m.KVChunk(
        request_id="r",
        attempt=0,
        layer=0,
        token_start=0,
        n_tokens_total=2600,
        key=key,
        value=key[..., ::-1].copy(),
        chunk=0,
        n_chunks=1,
    )
    async with login(broker, secrets, "dev-a") as a, login(broker, secrets, "dev-b") as b:
        await a.subscribe(t.DEVICE_INBOX, device_id="dev-a")
        await b.subscribe(t.DEVICE_INBOX, device_id="dev-b")
        for _ in range(3):
            await a.publish(t.DEVICE_INBOX, chunk, device_id="dev-b")
            got = (await b.recv(timeout=10)).msg
            assert isinstance(got, m.KVChunk)
            np.testing.assert_array_equal(got.key, key)
            np.testing.assert_array_equal(got.value, chunk.value)
            await b.publish(t.DEVICE_INBOX, got, device_id="dev-a")
            back = (await a.recv(timeout=10)).msg
            assert isinstance(back, m.KVChunk)
            np.testing.assert_array_equal(back.value, chunk.value)


async def test_a_claimed_user_name_does_not_override_the_certificate(
    broker: MosquittoBroker, secrets: Path
) -> None:
    """dev-a's certificate, claiming to be the orchestrator: the broker goes by the CN."""
    cfg = config(broker, TLSConfig.from_identity(ident(secrets, "dev-a")), username="orchestrator")
    async with (
        Bus(cfg, publish_will_on_close=False) as impostor,
        login(broker, secrets, "monitor") as mon,
    ):
        await mon.subscribe(t.PLAN)
        await impostor.publish(t.PLAN, m.PlanMsg(plan=a_plan(99), plan_version=99))
        assert a_plan(99) not in await plans_seen(mon)


# --------------------------------------------------------------------------- refusals


async def test_plaintext_client_is_refused(broker: MosquittoBroker) -> None:
    loop = asyncio.get_running_loop()
    start = loop.time()
    err = await refused(config(broker, None, connect_timeout=20))
    assert err.problem == "expects_tls" and "use mqtts://" in str(err)
    assert loop.time() - start < 10, "told when the broker closed the socket, not at timeout"
    # below the library: an MQTT CONNECT in the clear gets no CONNACK, only a closed socket
    connect = bytes.fromhex("101000044d5154540402000a0004706c61696e")
    with socket.create_connection((broker.host, broker.port), timeout=3) as s:
        s.sendall(connect)
        s.settimeout(3)
        try:
            got = s.recv(16)
        except ConnectionResetError:
            got = b""
    assert not got.startswith(b"\x20"), got  # 0x20 = CONNACK
    assert "wrong version number" in broker.log_tail(50)


async def test_client_without_certificate_is_refused(
    broker: MosquittoBroker, secrets: Path
) -> None:
    err = await refused(config(broker, TLSConfig(ca_certs=str(secrets / "ca.crt"))))
    assert err.problem == "no_client_certificate" and "--identity" in str(err)


async def test_certificate_from_another_ca_is_refused(
    broker: MosquittoBroker, secrets: Path, tmp_path: Path
) -> None:
    other = make_secrets(tmp_path / "other")
    stranger = ident(other, "dev-a")  # same name, another cluster's CA
    # trusting our CA, so the handshake reaches the broker's verdict on its certificate
    tls = TLSConfig(
        str(secrets / "ca.crt"), str(stranger / "client.crt"), str(stranger / "client.key")
    )
    err = await refused(config(broker, tls))
    assert err.problem == "client_unknown_ca" and "unknown CA" in str(err)
    # with its own CA, it does not trust our broker either
    err = await refused(config(broker, TLSConfig.from_identity(stranger)))
    assert err.problem == "unknown_ca" and str(stranger / "ca.crt") in str(err)


async def test_expired_certificate_is_refused(broker: MosquittoBroker, tmp_path: Path) -> None:
    secrets = broker.config.tls.cafile.parent  # type: ignore[union-attr]
    ca = ClusterCA(secrets)
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=3)
    old = ca.issue_identity("dev-old", "device", days=1, not_before=past)
    moved = tmp_path / "dev-old"
    shutil.move(old, moved)  # out of the module's secrets directory
    err = await refused(config(broker, TLSConfig.from_identity(moved)))
    assert err.problem == "client_expired" and "expired" in str(err)


async def test_key_that_is_not_the_certificates_is_refused(
    broker: MosquittoBroker, secrets: Path
) -> None:
    a, b = ident(secrets, "dev-a"), ident(secrets, "dev-b")
    tls = TLSConfig(str(a / "ca.crt"), str(a / "client.crt"), str(b / "client.key"))
    err = await refused(config(broker, tls))
    assert err.problem == "bad_identity" and "does not belong to certificate" in str(err)


async def test_broker_certificate_for_another_host_is_refused(tmp_path: Path) -> None:
    ca = ClusterCA.create(tmp_path / "s", CLUSTER)
    ca.issue_server(["fog.example"])  # not 127.0.0.1, which we connect to
    ca.issue_identity("dev-a", "device")
    (tmp_path / "s" / "acl").write_text("")
    (tmp_path / "w").mkdir()
    with tls_broker(tmp_path / "s", tmp_path / "w") as broker:
        err = await refused(
            config(broker, TLSConfig.from_identity(tmp_path / "s" / "identities" / "dev-a"))
        )
    assert err.problem == "host_mismatch" and "'127.0.0.1'" in str(err)


# --------------------------------------------------------------------------- revocation


async def test_revoked_device_is_locked_out_while_the_others_keep_working(
    tmp_path: Path,
) -> None:
    secrets = make_secrets(tmp_path / "secrets")
    (tmp_path / "w").mkdir()
    with tls_broker(secrets, tmp_path / "w") as broker:
        async with (
            login(broker, secrets, "orchestrator") as orch,
            login(broker, secrets, "dev-a") as stolen,
            login(broker, secrets, "dev-b") as b,
        ):
            await orch.subscribe(t.ORCHESTRATOR_INBOX)
            await stolen.subscribe(t.DEVICE_INBOX, device_id="dev-a")
            await b.subscribe(t.DEVICE_INBOX, device_id="dev-b")
            await orch.publish(t.DEVICE_INBOX, step("before"), device_id="dev-a")
            assert (await stolen.recv(timeout=3)).msg.request_id == "before"  # type: ignore[union-attr]

            serials = broker_cli.revoke_identity(secrets, "dev-a")
            await asyncio.to_thread(broker.reload)
            assert serials and "topic deny #" in (secrets / "acl").read_text()

            # its live connection (the CRL only stops handshakes) now reads and writes nothing
            await orch.publish(t.DEVICE_INBOX, step("after"), device_id="dev-a")
            await nothing_arrives(stolen)
            hb = m.Heartbeat(device_id="dev-a", ts=1.0)
            await stolen.publish(t.ORCHESTRATOR_INBOX, hb, device_id="dev-a")
            await nothing_arrives(orch)
            # nobody else was re-keyed: dev-b keeps working on its open connection...
            await orch.publish(t.DEVICE_INBOX, step("b"), device_id="dev-b")
            assert (await b.recv(timeout=3)).msg.request_id == "b"  # type: ignore[union-attr]
            await b.publish(
                t.ORCHESTRATOR_INBOX, m.Heartbeat(device_id="dev-b", ts=2.0), device_id="dev-b"
            )
            assert (await orch.recv(timeout=3)).ids == {"device_id": "dev-b"}
        # ...and on a new one, while the stolen board's certificate cannot connect again
        async with login(broker, secrets, "dev-b"):
            pass
        err = await refused(
            config(broker, TLSConfig.from_identity(ident(secrets, "dev-a")), username="dev-a")
        )
        assert err.problem == "client_revoked"

        # a replacement board gets a new certificate and joins without a restart
        broker_cli.add_identity(secrets, "dev-c", "device")
        await asyncio.to_thread(broker.reload)
        async with (
            login(broker, secrets, "orchestrator") as orch,
            login(broker, secrets, "dev-c") as c,
        ):
            await c.subscribe(t.DEVICE_INBOX, device_id="dev-c")
            await orch.publish(t.DEVICE_INBOX, step("c"), device_id="dev-c")
            assert (await c.recv(timeout=3)).msg.request_id == "c"  # type: ignore[union-attr]

        # rotating dev-b: its old files stop working, the new ones work
        old = tmp_path / "dev-b-old"
        shutil.copytree(ident(secrets, "dev-b"), old)
        broker_cli.renew_identity(secrets, "dev-b", [])
        await asyncio.to_thread(broker.reload)
        assert (await refused(config(broker, TLSConfig.from_identity(old)))).problem == (
            "client_revoked"
        )
        async with login(broker, secrets, "dev-b"):
            pass

        # rotating the broker's own certificate (another name): served after a reload
        before = served_certificate(broker, secrets)
        broker_cli.renew_identity(secrets, "broker", ["fog.example"])
        await asyncio.to_thread(broker.reload)
        after = served_certificate(broker, secrets)
        assert after != before
        assert after == ssl.PEM_cert_to_DER_cert((secrets / "broker.crt").read_text())
        async with login(broker, secrets, "dev-b"):
            pass


# --------------------------------------------------------------------------- the CLI


def test_cli_init_revoke_and_one_line_errors(tmp_path: Path) -> None:
    """As an operator runs it: init, Mosquitto from mosquitto.local.conf, revoke (which
    reloads that broker itself), and the one line a refused tool prints."""
    _need_mosquitto()
    inv = tmp_path / "devices.yaml"
    inv.write_text("devices:\n  - {id: pi-1, memory_mb: 300}\n  - {id: pi-2, memory_mb: 300}\n")
    out, port = tmp_path / "secrets", free_port()
    run = subprocess.run(
        [*E2LLM, "broker", "init", "--devices", str(inv), "--out", str(out), "--port", str(port)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert "TLS with client certificates" in run.stdout
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(out / "mosquitto.local.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
        url = f"mqtts://127.0.0.1:{port}"

        def health(*login: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*E2LLM, "health", "--broker", url, "--device-id", "pi-1", "--timeout", "1",
                 *login],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip

        ok = health("--identity", str(ident(out, "pi-1")))
        assert "no retained state" in ok.stderr, ok.stderr  # in, and nothing published yet
        revoke = subprocess.run(
            [*E2LLM, "broker", "revoke", "pi-1", "--out", str(out)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        assert f"Mosquitto (pid {proc.pid}) reloaded" in revoke.stdout, revoke.stdout
        for _ in range(100):  # SIGHUP is handled at the broker's next loop turn
            bad = health("--identity", str(ident(out, "pi-1")))
            if "revoked" in bad.stderr:
                break
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1, bad.stderr
        assert lines[0].startswith("error: TLS with broker 127.0.0.1:") and lines[0].endswith(
            "it has been revoked"
        )
        plain = subprocess.run(
            [*E2LLM, "health", "--broker", f"mqtt://127.0.0.1:{port}", "--device-id", "pi-2",
             "--timeout", "1"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert plain.returncode == 2 and plain.stderr.strip().splitlines() == [
            f"error: TLS with broker 127.0.0.1:{port}: the broker speaks TLS on this port: "
            f"use mqtts://127.0.0.1:{port} with --identity DIR"
        ]
        wrong = subprocess.run(
            [*E2LLM, "agent", "--broker", url, "--identity", str(ident(out, "pi-2")),
             "--device-id", "pi-1", "--memory-mb", "100"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert wrong.returncode == 2 and "is 'pi-2', not device 'pi-1'" in wrong.stderr
        for argv, why in (
            (["orchestrator", "--identity", str(ident(out, "pi-2"))],
             "is the device 'pi-2', not the orchestrator"),
            (["health", "--identity", str(ident(out, "monitor")), "--cluster", "lab",
              "--device-id", "pi-2"],
             "is for cluster 'default', not 'lab': pass --cluster default"),
        ):  # fmt: skip
            bad = subprocess.run(
                [*E2LLM, argv[0], "--broker", url, *argv[1:]],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert bad.returncode in (1, 2) and len(bad.stderr.strip().splitlines()) == 1
            assert bad.stderr.strip().endswith(why), bad.stderr
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def shipped_broker(secrets: Path, workdir: Path) -> Iterator[MosquittoBroker]:
    """Mosquitto on broker/mosquitto.conf (what compose runs), its container paths
    pointed at ``secrets`` and ``workdir``."""
    _need_mosquitto()
    text = (Path(__file__).resolve().parents[2] / "broker" / "mosquitto.conf").read_text()
    port = free_port()
    for old, new in (
        ("/mosquitto/config/secrets/", f"{secrets.resolve()}/"),
        ("listener 8883 0.0.0.0", f"listener {port} 127.0.0.1"),
        ("persistence_location /mosquitto/data/", f"persistence_location {workdir}/"),
        ("log_dest stdout", f"log_dest file {workdir / 'mosquitto.log'}"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    if os.geteuid() == 0:  # as root Mosquitto would drop to user "mosquitto"
        text += f"user {getpass.getuser()}\n"
    (workdir / "mosquitto.conf").write_text(text)
    proc = subprocess.Popen(
        [find_mosquitto(), "-c", str(workdir / "mosquitto.conf")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
        yield MosquittoBroker(MosquittoConfig(port=port), workdir=workdir)
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_shipped_config_serves_tls_with_client_certificates_only(
    secrets: Path, tmp_path: Path
) -> None:
    async def scenario(shipped: MosquittoBroker) -> None:
        async with login(shipped, secrets, "dev-a") as a:
            hello = m.DeviceState(device_id="dev-a", status=m.DeviceStatus.ONLINE)
            await a.publish(t.DEVICE_STATE, hello, device_id="dev-a")
        assert (await refused(config(shipped, None))).problem == "expects_tls"

    with shipped_broker(secrets, tmp_path) as shipped:
        asyncio.run(scenario(shipped))
