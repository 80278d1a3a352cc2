"""Mosquitto as a child process, and the cluster's ACL and password tooling.

``start_mosquitto`` renders a config (loopback listener, TCP_NODELAY, packet limit that
fits the largest message, optional passwords + ACL, persistence) and waits until the
broker accepts connections; ``render_acl`` derives every rule from ``topics``.
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
from typing import Self

from e2llm_edge.errors import BrokerError
from e2llm_edge.wire import codec, topics

log = logging.getLogger(__name__)

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
    persistence: bool = False
    """Keep retained messages and persistent sessions across restarts."""
    max_packet_size: int = codec.MAX_MESSAGE_BYTES + PACKET_HEADROOM
    """Largest MQTT packet accepted; must exceed the largest encoded message."""
    tcp_nodelay: bool = True
    """``set_tcp_nodelay``: without it each hop waits for Nagle's algorithm (~40 ms)."""
    extra: tuple[str, ...] = ()
    """Further raw config lines."""


def render_config(cfg: MosquittoConfig, *, port: int, workdir: Path) -> str:
    """mosquitto.conf text for ``cfg`` listening on ``port``; logs go to ``workdir``."""
    auth = cfg.password_file is not None
    lines = [
        "# rendered by e2llm_edge.ops.broker.start_mosquitto",
        "per_listener_settings false",
        f"listener {port} {cfg.host}",
        f"allow_anonymous {'false' if auth else 'true'}",
        f"set_tcp_nodelay {'true' if cfg.tcp_nodelay else 'false'}",
        f"max_packet_size {cfg.max_packet_size}",
        f"log_dest file {workdir / 'mosquitto.log'}",
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
        return f"mqtt://{self.host}:{self.port}"

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


# --------------------------------------------------------------------------- ACL, passwords


def render_acl(
    devices: Iterable[str],
    orchestrator_user: str,
    monitor_user: str | None,
    cluster: str = topics.DEFAULT_CLUSTER,
    *,
    client_pattern: bool = True,
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


def init_secrets(
    out_dir: Path,
    devices: Sequence[str],
    *,
    cluster: str = topics.DEFAULT_CLUSTER,
    orchestrator_user: str = "orchestrator",
    monitor_user: str = "monitor",
    clients: Sequence[str] = ("client",),
) -> Credentials:
    """Generate passwords, write ``passwd``, ``acl`` and ``credentials.json`` (0600) into
    ``out_dir`` (``broker/secrets/`` is gitignored)."""
    roles = {
        "device": list(devices),
        "orchestrator": [orchestrator_user],
        "monitor": [monitor_user],
        "client": list(clients),
    }
    names = [u for group in roles.values() for u in group]
    if len(set(names)) != len(names):
        raise BrokerError(f"user names must be unique across roles: {names}")
    creds = Credentials(cluster, {u: secrets.token_urlsafe(24) for u in names}, roles)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_password_file(out_dir / "passwd", creds.users)
    (out_dir / "acl").write_text(render_acl(devices, orchestrator_user, monitor_user, cluster))
    creds.save(out_dir / "credentials.json")
    return creds
