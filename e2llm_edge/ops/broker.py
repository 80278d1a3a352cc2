"""Mosquitto as a child process, and the cluster's ACL, identities and password tooling.

``start_mosquitto`` renders a config (loopback listener, TCP_NODELAY, packet limit that
fits the largest message, TLS with client certificates or passwords, ACL, persistence)
and waits until the broker accepts connections; ``render_acl`` derives every rule from
``topics``; ``Roster`` records who belongs to a cluster (``cluster.json``).
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from e2llm_edge.errors import BrokerError
from e2llm_edge.wire import codec, topics

log = logging.getLogger(__name__)

PID_FILE = "mosquitto.pid"
"""Written into the broker's work directory; ``e2llm broker revoke`` signals that pid."""
PACKET_HEADROOM = 64 * 1024
"""Room for the MQTT fixed header, topic and properties above the largest message."""

INSTALL_HINT = (
    "install Mosquitto (Debian/Ubuntu: `apt-get install mosquitto`; macOS: `brew install "
    "mosquitto`) or point E2LLM_MOSQUITTO at the binary"
)


def find_mosquitto() -> str:
    """Path of the mosquitto binary (``$E2LLM_MOSQUITTO``, ``$PATH``, ``/usr/sbin``)."""
    env = os.environ.get("E2LLM_MOSQUITTO")
    candidates = [env] if env else []
    which = shutil.which("mosquitto")
    if which:
        candidates.append(which)
    candidates += [
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/opt/homebrew/sbin/mosquitto",
    ]
    for c in candidates:
        if c and os.access(c, os.X_OK):
            return c
    raise BrokerError(f"mosquitto binary not found: {INSTALL_HINT}")


def find_mosquitto_passwd() -> str:
    found = shutil.which("mosquitto_passwd") or next(
        (
            p
            for p in ("/usr/bin/mosquitto_passwd", "/usr/local/bin/mosquitto_passwd")
            if os.access(p, os.X_OK)
        ),
        None,
    )
    if found is None:
        raise BrokerError(f"mosquitto_passwd not found: {INSTALL_HINT}")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (another process may still take it before us)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class BrokerTLS:
    """The broker's TLS: its certificate, the CA every client certificate must come from,
    and the CRL of revoked ones (re-read on SIGHUP, see ``MosquittoBroker.reload``)."""

    cafile: Path
    """CA certificate (``ca.crt``)."""
    certfile: Path
    """The broker's certificate (``broker.crt``)."""
    keyfile: Path
    """Its private key (``broker.key``)."""
    crlfile: Path
    """Certificate revocation list (``crl.pem``)."""

    @classmethod
    def from_dir(cls, secrets: Path) -> BrokerTLS:
        """The files ``e2llm broker init`` writes into ``secrets``."""
        d = secrets.resolve()
        return cls(d / "ca.crt", d / "broker.crt", d / "broker.key", d / "crl.pem")

    def lines(self) -> list[str]:
        """Listener settings: a client must show a certificate from our CA, not revoked,
        and its common name becomes its user name, which the ACL is written for."""
        return [
            f"cafile {self.cafile}",
            f"certfile {self.certfile}",
            f"keyfile {self.keyfile}",
            f"crlfile {self.crlfile}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
        ]


@dataclass(frozen=True)
class MosquittoConfig:
    """What goes into the rendered mosquitto.conf."""

    host: str = "127.0.0.1"
    """Listener address; loopback unless devices connect from other machines."""
    port: int = 0
    """Listener port; 0 picks a free one."""
    password_file: Path | None = None
    """Mosquitto password file; set it (with ``acl_file``) to require authentication."""
    acl_file: Path | None = None
    """ACL file, see ``render_acl``."""
    tls: BrokerTLS | None = None
    """Listen with TLS and require client certificates (identity = common name)."""
    persistence: bool = False
    """Keep retained messages and persistent sessions across restarts."""
    max_packet_size: int = codec.MAX_MESSAGE_BYTES + PACKET_HEADROOM
    """Largest MQTT packet accepted; must exceed the largest encoded message."""
    tcp_nodelay: bool = True
    """``set_tcp_nodelay``: without it each hop waits for Nagle's algorithm (~40 ms)."""
    extra: tuple[str, ...] = ()
    """Further raw config lines."""


def render_config(cfg: MosquittoConfig, *, port: int, workdir: Path) -> str:
    """mosquitto.conf text for ``cfg`` listening on ``port``; logs and pid go to ``workdir``."""
    auth = cfg.password_file is not None or cfg.tls is not None
    lines = [
        "# rendered by e2llm_edge.ops.broker.start_mosquitto",
        "per_listener_settings false",
        f"listener {port} {cfg.host}",
        *(cfg.tls.lines() if cfg.tls is not None else []),
        f"allow_anonymous {'false' if auth else 'true'}",
        f"set_tcp_nodelay {'true' if cfg.tcp_nodelay else 'false'}",
        f"max_packet_size {cfg.max_packet_size}",
        f"log_dest file {workdir / 'mosquitto.log'}",
        f"pid_file {workdir / PID_FILE}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if os.geteuid() == 0:
        # Mosquitto run as root drops to user "mosquitto", which cannot read our files.
        lines.append(f"user {getpass.getuser()}")
    if cfg.password_file is not None:
        lines.append(f"password_file {cfg.password_file}")
    if cfg.acl_file is not None:
        lines.append(f"acl_file {cfg.acl_file}")
    if cfg.persistence:
        lines += ["persistence true", f"persistence_location {workdir}/", "autosave_interval 5"]
    else:
        lines.append("persistence false")
    lines += list(cfg.extra)
    return "\n".join(lines) + "\n"


class MosquittoBroker:
    """A Mosquitto child process; sync and async context manager; ``restart`` for chaos."""

    def __init__(
        self,
        config: MosquittoConfig | None = None,
        *,
        workdir: Path | None = None,
        ready_timeout: float = 5.0,
    ) -> None:
        self.config = config or MosquittoConfig()
        self.binary = find_mosquitto()
        self._own_workdir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="e2llm-mosquitto-"))
        self.ready_timeout = ready_timeout
        self.port = self.config.port or free_port(self.config.host)
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return self.config.host

    @property
    def url(self) -> str:
        scheme = "mqtts" if self.config.tls is not None else "mqtt"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def start(self) -> None:
        """Start and wait until the listener accepts TCP connections."""
        if self._proc is not None and self._proc.poll() is None:
            return
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(render_config(self.config, port=self.port, workdir=self.workdir))
        stderr = open(self.workdir / "mosquitto.stderr", "ab")  # noqa: SIM115 - child owns it
        try:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=stderr
            )
        finally:
            stderr.close()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(
                    f"mosquitto exited with code {self._proc.returncode} (port {self.port})",
                    log_tail=self._diagnostics(),
                )
            with (
                contextlib.suppress(OSError),
                socket.create_connection((self.host, self.port), timeout=0.2),
            ):
                log.info("mosquitto pid %d listening on %s", self._proc.pid, self.url)
                return
            time.sleep(0.02)
        self.stop()
        raise BrokerError(
            f"mosquitto not accepting connections on {self.url} after {self.ready_timeout} s",
            log_tail=self._diagnostics(),
        )

    def _diagnostics(self) -> str:
        err = ""
        with contextlib.suppress(OSError):
            err = (self.workdir / "mosquitto.stderr").read_text(errors="replace")
        return (err + "\n" + self.log_tail()).strip()

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (Mosquitto saves persistence), then SIGKILL if it lingers."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def reload(self, timeout: float = 5.0) -> None:
        """SIGHUP: Mosquitto re-reads its ACL, CRL and certificates and re-applies the ACL
        to the clients connected. Returns once done: the reload runs between two turns of
        its event loop, so a connection it logs as accepted after "Reloading config." was
        accepted by the reloaded broker."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise BrokerError(f"mosquitto on port {self.port} is not running: nothing to reload")
        start = self.log_path.stat().st_size if self.log_path.exists() else 0
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + timeout
        self._await_log("Reloading config.", start, deadline)
        with socket.create_connection((self.host, self.port), timeout=timeout) as probe:
            here = probe.getsockname()
            self._await_log(f"New connection from {here[0]}:{here[1]} ", start, deadline)

    def _await_log(self, needle: str, offset: int, deadline: float) -> None:
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), self.log_path.open("rb") as f:
                f.seek(offset)
                if needle.encode() in f.read():
                    return
            time.sleep(0.01)
        raise BrokerError(
            f"mosquitto on port {self.port}: no {needle!r} in its log", log_tail=self.log_tail()
        )

    def kill(self) -> None:
        """SIGKILL: the broker vanishes without saving (fault injection)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart(self, *, down_for: float = 0.0, hard: bool = False) -> None:
        """Stop (or kill), optionally stay down ``down_for`` seconds, start on the same port."""
        self.kill() if hard else self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.close)


def start_mosquitto(
    config: MosquittoConfig | None = None,
    *,
    port: int = 0,
    workdir: Path | None = None,
    ready_timeout: float = 5.0,
) -> MosquittoBroker:
    """A Mosquitto broker, not yet started: use ``with``/``async with`` (or ``start()``).

    ``port`` overrides ``config.port``; 0 picks a free port.
    """
    cfg = config or MosquittoConfig()
    if port:
        cfg = replace(cfg, port=port)
    return MosquittoBroker(cfg, workdir=workdir, ready_timeout=ready_timeout)


# --------------------------------------------------------------------------- ACL, identities


def render_acl(
    devices: Iterable[str],
    orchestrator_user: str,
    monitor_user: str | None,
    cluster: str = topics.DEFAULT_CLUSTER,
    *,
    client_pattern: bool = True,
    revoked: Iterable[str] = (),
) -> str:
    """Mosquitto ACL for one cluster, every rule built from ``topics``.

    - device ``d``: reads only its own inbox, the plan and orchestrator state; writes its
      own state, profile and telemetry, ``orchestrator/inbox/d``, and any device inbox
      (write, never read): activations and KV handoff go device -> device.
    - orchestrator (every instance, serving or standby): the only writer of the plan and
      of the lease; writes inboxes, responses, events and cluster telemetry; reads states,
      profiles, its inbox, requests and telemetry.
    - monitor: reads state, profiles, plan, telemetry and request events; nothing that
      carries prompts or answers.
    - clients (a ``pattern`` with ``%u``, so it applies to every user): write
      ``request/<own username>``, read ``response/<own username>/+`` and the
      orchestrator's state only.
    - revoked identities: denied everything, so a connection opened before the
      revocation (the CRL only stops new handshakes) is useless from the next reload.
    """
    c = {"cluster": cluster}
    t = topics
    out = [
        f"# e2llm ACL for cluster {topics.check_id(cluster, 'cluster')}; generated by "
        "e2llm_edge.ops.broker.render_acl",
        "",
    ]
    for d in devices:
        topics.check_id(d, "device id")
        out += [
            f"user {d}",
            f"topic read {t.DEVICE_INBOX.format(device_id=d, **c)}",
            f"topic read {t.PLAN.format(**c)}",
            f"topic read {t.ORCHESTRATOR_STATE.format(**c)}",
            f"topic write {t.DEVICE_STATE.format(device_id=d, **c)}",
            f"topic write {t.DEVICE_PROFILE.format(device_id=d, **c)}",
            f"topic write {t.DEVICE_TELEMETRY.format(device_id=d, **c)}",
            f"topic write {t.ORCHESTRATOR_INBOX.format(device_id=d, **c)}",
            f"topic write {t.DEVICE_INBOX.filter(**c)}",
            "",
        ]
    topics.check_id(orchestrator_user, "orchestrator user")
    out += [f"user {orchestrator_user}"]
    out += [
        f"topic read {x.filter(**c)}"
        for x in (
            t.DEVICE_STATE,
            t.DEVICE_PROFILE,
            t.ORCHESTRATOR_INBOX,
            t.REQUEST,
            t.DEVICE_TELEMETRY,
        )
    ]
    out += [
        f"topic readwrite {x.filter(**c)}"
        for x in (t.PLAN, t.ORCHESTRATOR_STATE, t.ORCHESTRATOR_LEASE)
    ]
    out += [
        f"topic write {x.filter(**c)}"
        for x in (t.DEVICE_INBOX, t.RESPONSE, t.REQUEST_EVENTS, t.CLUSTER_TELEMETRY)
    ]
    out.append("")
    if monitor_user is not None:
        topics.check_id(monitor_user, "monitor user")
        out += [f"user {monitor_user}"]
        out += [
            f"topic read {x.filter(**c)}"
            for x in (
                t.DEVICE_STATE,
                t.DEVICE_PROFILE,
                t.PLAN,
                t.ORCHESTRATOR_STATE,
                t.DEVICE_TELEMETRY,
                t.CLUSTER_TELEMETRY,
                t.REQUEST_EVENTS,
            )
        ]
        out.append("")
    for r in revoked:
        out += [f"user {topics.check_id(r, 'revoked user')}", "topic deny #", ""]
    if client_pattern:
        out += [
            "# clients: only their own requests and responses, and whether an orchestrator",
            "# serves (a client re-sends unfinished requests when a standby takes over)",
            f"pattern write {t.REQUEST.filter(client_id='%u', **c)}",
            f"pattern read {t.RESPONSE.filter(client_id='%u', **c)}",
            f"pattern read {t.ORCHESTRATOR_STATE.format(**c)}",
            "",
        ]
    return "\n".join(out)


ROLES = ("device", "orchestrator", "monitor", "client")
AUTH_TLS, AUTH_PASSWORD = "tls", "password"


@dataclass
class Roster:
    """Who belongs to a cluster (``cluster.json`` in its secrets directory): identity
    names by role, how they prove it, and the revoked names the ACL still shuts out."""

    cluster: str
    roles: dict[str, list[str]]
    auth: str = AUTH_TLS
    """``tls``: client certificates (the default); ``password``: the plaintext lab mode."""
    hosts: list[str] = field(default_factory=list)
    """Names and addresses in the broker's certificate."""
    revoked: list[str] = field(default_factory=list)

    FILE = "cluster.json"

    def __post_init__(self) -> None:
        names = self.names()
        if len(set(names)) != len(names):
            raise BrokerError(f"identity names must be unique across roles: {names}")
        for role in ("orchestrator", "monitor"):
            if len(self.roles.get(role, [])) != 1:
                raise BrokerError(f"exactly one {role} identity, got {self.roles.get(role)}")
        for n in names:
            self._check_name(n)

    @staticmethod
    def _check_name(name: str) -> str:
        if name == "broker":  # the CA's register files the broker's certificate under it
            raise BrokerError("'broker' is reserved for the broker's own certificate")
        return topics.check_id(name, "identity name")

    def names(self) -> list[str]:
        return [n for role in ROLES for n in self.roles.get(role, [])]

    def role_of(self, name: str) -> str | None:
        return next((r for r in ROLES if name in self.roles.get(r, [])), None)

    def add(self, name: str, role: str) -> None:
        """Admit ``name`` (again, if it was revoked: a new board under the old id)."""
        if role not in ("device", "client"):
            raise BrokerError(f"role must be device or client, got {role!r}")
        if self.role_of(name) is not None:
            raise BrokerError(f"{name!r} is already a {self.role_of(name)} of this cluster")
        self.roles.setdefault(role, []).append(self._check_name(name))
        if name in self.revoked:
            self.revoked.remove(name)

    def revoke(self, name: str) -> str:
        """Move ``name`` out of its role into ``revoked``; returns the role it had."""
        role = self.role_of(name)
        if role is None:
            raise BrokerError(f"{name!r} is not an identity of cluster {self.cluster!r}")
        if role in ("orchestrator", "monitor"):
            raise BrokerError(
                f"{name!r} is the cluster's {role}: renew it (`e2llm broker renew {name}`) "
                "instead, or re-key the cluster (`e2llm broker init --force`)"
            )
        self.roles[role].remove(name)
        self.revoked.append(name)
        return role

    def acl(self) -> str:
        return render_acl(
            self.roles.get("device", []),
            self.roles["orchestrator"][0],
            self.roles["monitor"][0],
            self.cluster,
            revoked=self.revoked,
        )

    def save(self, directory: Path) -> None:
        data = {
            "cluster": self.cluster,
            "auth": self.auth,
            "roles": self.roles,
            "hosts": self.hosts,
            "revoked": self.revoked,
        }
        write_private(directory / self.FILE, (json.dumps(data, indent=2) + "\n").encode())
        write_private(directory / "acl", self.acl().encode())

    @classmethod
    def load(cls, directory: Path) -> Roster:
        path = directory / cls.FILE
        try:
            data = json.loads(path.read_text())
            return cls(
                data["cluster"],
                data["roles"],
                data.get("auth", AUTH_TLS),
                data.get("hosts", []),
                data.get("revoked", []),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BrokerError(
                f"{path}: cannot read the cluster roster ({exc}); run `e2llm broker init`"
            ) from exc


def write_private(path: Path, data: bytes) -> Path:
    """Write ``data`` readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    path.chmod(0o600)
    return path


@dataclass
class Credentials:
    """Generated users and passwords of one cluster; keep the file out of version control."""

    cluster: str
    users: dict[str, str]
    roles: dict[str, list[str]] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {"cluster": self.cluster, "users": self.users, "roles": self.roles}, f, indent=2
            )

    @classmethod
    def load(cls, path: Path) -> Credentials:
        data = json.loads(path.read_text())
        return cls(data["cluster"], data["users"], data.get("roles", {}))


def write_password_file(path: Path, users: dict[str, str]) -> None:
    """Hash ``users`` into a Mosquitto password file with ``mosquitto_passwd -b``."""
    tool = find_mosquitto_passwd()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.touch(mode=0o600)
    for user, password in users.items():
        topics.check_id(user, "user name")
        proc = subprocess.run(
            [tool, "-b", str(path), user, password], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise BrokerError(
                f"mosquitto_passwd failed for user {user!r}: "
                f"{proc.stderr.strip() or proc.stdout.strip()}"
            )


def roster(
    devices: Sequence[str],
    *,
    cluster: str = topics.DEFAULT_CLUSTER,
    orchestrator_user: str = "orchestrator",
    monitor_user: str = "monitor",
    clients: Sequence[str] = ("client",),
    auth: str = AUTH_TLS,
    hosts: Sequence[str] = (),
) -> Roster:
    """The identities of a new cluster: each device, the orchestrator, the monitor, clients."""
    return Roster(
        cluster,
        {
            "device": list(devices),
            "orchestrator": [orchestrator_user],
            "monitor": [monitor_user],
            "client": list(clients),
        },
        auth,
        list(hosts),
    )


def init_secrets(
    out_dir: Path,
    devices: Sequence[str],
    *,
    cluster: str = topics.DEFAULT_CLUSTER,
    orchestrator_user: str = "orchestrator",
    monitor_user: str = "monitor",
    clients: Sequence[str] = ("client",),
) -> Credentials:
    """The plaintext lab mode: generate passwords, write ``passwd``, ``acl``,
    ``cluster.json`` and ``credentials.json`` (0600) into ``out_dir`` (gitignored)."""
    r = roster(
        devices,
        cluster=cluster,
        orchestrator_user=orchestrator_user,
        monitor_user=monitor_user,
        clients=clients,
        auth=AUTH_PASSWORD,
    )
    creds = Credentials(cluster, {u: secrets.token_urlsafe(24) for u in r.names()}, r.roles)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_password_file(out_dir / "passwd", creds.users)
    r.save(out_dir)
    creds.save(out_dir / "credentials.json")
    return creds


def cluster_ca() -> Any:
    """``pki.ClusterCA``, imported on use: only the fog node mints certificates, and the
    ``cryptography`` library it needs is not among a device's dependencies."""
    try:
        from e2llm_edge.ops.pki import ClusterCA
    except ImportError as exc:
        raise BrokerError(
            f"making certificates needs the cryptography package ({exc}): "
            "pip install 'e2llm-edge[fog]'"
        ) from exc
    return ClusterCA


def init_identities(out_dir: Path, r: Roster) -> None:
    """The default: a cluster CA, the broker's certificate for ``r.hosts``, one client
    certificate per identity (``identities/<name>/``), the CRL, ACL and ``cluster.json``."""
    ca = cluster_ca().create(out_dir, r.cluster)
    ca.issue_server(r.hosts)
    for role in ROLES:
        for name in r.roles.get(role, []):
            ca.issue_identity(name, role)
    r.save(out_dir)
