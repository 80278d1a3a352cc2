"""A cluster on one machine: broker, orchestrator and agents as separate processes.

What the demo, the end-to-end tests, the benchmarks and the chaos script run: every
process is the real CLI entry point a user would start on a device or the fog node, and
every byte between them crosses the broker. Agents can be killed (SIGKILL, like a power
cut) and started again. By default the cluster is secured as a deployment is: a
throwaway CA, one certificate per process, TLS on every link and the ACL enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import yaml

from e2llm_edge.errors import E2LLMError
from e2llm_edge.ops import broker_cli
from e2llm_edge.ops.broker import AUTH_TLS, BrokerTLS, Credentials, MosquittoConfig, Roster
from e2llm_edge.sysinfo import rss_bytes
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig
from planner.plan import Plan


@dataclass
class Proc:
    """One child process and its log file."""

    name: str
    cmd: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.alive and self.proc is not None else None

    def rss_bytes(self) -> int:
        """Resident memory of the process now (0 if it is not running)."""
        pid = self.pid
        return 0 if pid is None else rss_bytes(pid)

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to say goodbye (its last-will fires)."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout: float = 5.0) -> None:
        if not self.alive:
            return
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


@dataclass
class LocalCluster:
    """`with LocalCluster(model_dir, inventory) as c: c.wait_serving(); ...`"""

    model_dir: Path
    inventory: dict[str, Any]
    broker_url: str | None = None
    broker_kind: str = "mosquitto"
    cluster: str = "local"
    threads: int = 1
    orchestrator_args: list[str] = field(default_factory=list)
    agent_args: list[str] = field(default_factory=list)
    workdir: Path | None = None
    verbose: bool = True
    secrets_dir: Path | None = None
    """Output of ``e2llm broker init`` (identities, or the lab mode's passwords): the
    broker requires them, and every process logs in as itself (``observer`` for
    ``bus_config``)."""
    tls: bool = True
    """With no ``secrets_dir`` when starting its own Mosquitto: make a throwaway CA and
    one identity per process, so every link is TLS with client certificates and the ACL
    applies, as in a deployment. False: anonymous plain TCP (baselines, embedded broker)."""
    observer: str = "monitor"
    standby: bool = False
    """Also run a standby orchestrator (``orch-b``) that takes over if ``orch-a`` dies."""
    agents: dict[str, Proc] = field(default_factory=dict)
    orchestrator: Proc | None = None
    standby_orchestrator: Proc | None = None
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    broker: Any = None
    credentials: Credentials | None = None
    roster: Roster | None = None

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _start(self) -> None:
        if self.workdir is None:
            self.workdir = Path(
                self._stack.enter_context(tempfile.TemporaryDirectory(prefix="e2llm-cluster-"))
            )
        own_mosquitto = self.broker_url is None and self.broker_kind == "mosquitto"
        if self.secrets_dir is None and self.tls and own_mosquitto:
            self.secrets_dir = self.workdir / "secrets"
            broker_cli.init(
                [d["id"] for d in self.inventory["devices"]],
                self.secrets_dir,
                cluster=self.cluster,
                clients=["client"],
                force=False,
                hosts=["127.0.0.1"],
            )
        if self.secrets_dir is not None:
            self.roster = Roster.load(self.secrets_dir)
            if self.roster.auth != AUTH_TLS:
                self.credentials = Credentials.load(self.secrets_dir / "credentials.json")
        if self.broker_url is None:
            if self.broker_kind == "embedded":
                from e2llm_edge.ops.embedded_broker import start_embedded

                self.broker_url = self._stack.enter_context(
                    start_embedded(self.workdir / "embedded")
                )
            else:
                from e2llm_edge.ops.broker import start_mosquitto

                (self.workdir / "mosquitto").mkdir(exist_ok=True)
                self.broker = self._stack.enter_context(
                    start_mosquitto(self._mosquitto_config(), workdir=self.workdir / "mosquitto")
                )
                self.broker_url = self.broker.url
        inv = self.workdir / "inventory.yaml"
        inv.write_text(yaml.safe_dump(self.inventory))
        self.orchestrator = self._orchestrator("orch-a", standby=False)
        self.orchestrator.start()
        if self.standby:
            self.standby_orchestrator = self._orchestrator("orch-b", standby=True)
            self.standby_orchestrator.start()
        for d in self.inventory["devices"]:
            self.add_agent(d)

    def _orchestrator(self, name: str, *, standby: bool) -> Proc:
        assert self.workdir is not None and self.broker_url is not None
        orch_user = self.roster.roles["orchestrator"][0] if self.roster else ""
        return Proc(
            name,
            [
                sys.executable,
                "-m",
                "e2llm_edge.cli",
                *(["-v"] if self.verbose else []),
                "orchestrator",
                "--broker",
                self.broker_url,
                "--cluster",
                self.cluster,
                *self.login_args(orch_user),
                "--id",
                name,
                *(["--standby"] if standby else []),
                "--model",
                str(self.model_dir),
                "--inventory",
                str(self.workdir / "inventory.yaml"),
                *self.orchestrator_args,
            ],
            self.workdir / f"{name}.log",
        )

    def orchestrator_proc(self, name: str) -> Proc:
        """The orchestrator process of that name (``orch-a``, or ``orch-b`` the standby)."""
        for p in (self.orchestrator, self.standby_orchestrator):
            if p is not None and p.name == name:
                return p
        raise KeyError(name)

    def restart_orchestrator(self, name: str, *, standby: bool) -> Proc:
        """Start a killed orchestrator again (as a standby, or to take the lease over)."""
        old = self.orchestrator_proc(name)
        old.kill()
        p = self._orchestrator(name, standby=standby)
        if old is self.orchestrator:
            self.orchestrator = p
        else:
            self.standby_orchestrator = p
        p.start()
        return p

    def add_agent(self, device: dict[str, Any], start: bool = True) -> Proc:
        """Start an agent; a device the cluster's CA does not know yet is admitted first
        (``e2llm broker add-device``, then the broker reloads its ACL)."""
        assert self.workdir is not None and self.broker_url is not None
        r = self.roster
        if r is not None and r.auth == AUTH_TLS and r.role_of(device["id"]) is None:
            assert self.secrets_dir is not None
            broker_cli.add_identity(self.secrets_dir, device["id"], "device")
            self.roster = Roster.load(self.secrets_dir)
            if self.broker is not None:
                self.broker.reload()
        cmd = [
            sys.executable,
            "-m",
            "e2llm_edge.cli",
            *(["-v"] if self.verbose else []),
            "agent",
            "--broker",
            self.broker_url,
            "--cluster",
            self.cluster,
            *self.login_args(device["id"]),
            "--device-id",
            device["id"],
            "--memory-mb",
            str(device["memory_mb"]),
            "--model",
            str(self.model_dir),
            "--threads",
            str(self.threads),
        ]
        link = device.get("link")
        if link:
            cmd += [
                "--bandwidth-mbps",
                str(link["bandwidth_mbps"]),
                "--latency-ms",
                str(link["latency_ms"]),
            ]
        p = Proc(device["id"], cmd + self.agent_args, self.workdir / f"agent-{device['id']}.log")
        self.agents[device["id"]] = p
        if start:
            p.start()
        return p

    def restart_agent(self, device_id: str) -> Proc:
        """Start a killed (or stopped) agent again, same id and settings, as after a reboot."""
        p = self.agents[device_id]
        p.kill()
        p.start()
        return p

    def rss(self) -> dict[str, int]:
        """Resident bytes of the orchestrator and of each running agent."""
        procs = [self.orchestrator, self.standby_orchestrator, *self.agents.values()]
        return {p.name: p.rss_bytes() for p in procs if p is not None and p.alive}

    def _mosquitto_config(self) -> MosquittoConfig:
        d = self.secrets_dir
        if d is None:
            return MosquittoConfig()
        if self.credentials is None:
            return MosquittoConfig(acl_file=d / "acl", tls=BrokerTLS.from_dir(d))
        return MosquittoConfig(password_file=d / "passwd", acl_file=d / "acl")

    def login_args(self, user: str) -> list[str]:
        """``--identity`` of ``user`` (``--username/--password-file`` in the lab mode;
        nothing without auth)."""
        d = self.secrets_dir
        if d is None:
            return []
        if self.credentials is None:
            return ["--identity", str(broker_cli.identity_dir(d, user))]
        return ["--username", user, "--password-file", str(broker_cli.password_file(d, user))]

    def close(self) -> None:
        for p in self.agents.values():
            p.stop()
        for orch in (self.orchestrator, self.standby_orchestrator):
            if orch is not None:
                orch.stop()
        self._stack.close()

    def bus_config(self, user: str | None = None, **over: Any) -> BusConfig:
        """How to reach the cluster; with auth, as ``user`` (default: the observer)."""
        assert self.broker_url is not None
        name = user or self.observer
        if self.credentials is not None:
            over = {"username": name, "password": self.credentials.users[name], **over}
        elif self.secrets_dir is not None:
            over["identity"] = broker_cli.identity_dir(self.secrets_dir, name)
        return BusConfig.from_url(self.broker_url, cluster=self.cluster, **over)

    def logs(self) -> str:
        procs = [self.orchestrator, self.standby_orchestrator, *self.agents.values()]
        return "\n".join(f"--- {p.name}\n{p.tail()}" for p in procs if p is not None)

    # ----------------------------------------------------------------- observing

    def wait_serving(self, timeout: float = 120.0, min_version: int = 1) -> Plan:
        """Block until the orchestrator reports a serving plan; returns the plan."""
        return asyncio.run(self.await_serving(timeout, min_version))

    async def await_serving(
        self,
        timeout: float = 120.0,
        min_version: int = 1,
        min_epoch: int = 0,
    ) -> Plan:
        """The plan, once an orchestrator of lease epoch >= `min_epoch` serves one of
        version >= `min_version`."""
        deadline = time.monotonic() + timeout
        plan: Plan | None = None
        async with Bus(self.bus_config()) as bus:
            await bus.subscribe(t.CLUSTER_TELEMETRY)
            await bus.subscribe(t.PLAN)
            while True:
                left = deadline - time.monotonic()
                dead = [
                    p
                    for p in [self.orchestrator, *self.agents.values()]
                    if p is not None
                    and p.proc is not None
                    and not p.alive
                    and p.proc.returncode not in (-9,)
                ]
                if dead and self.orchestrator in dead:
                    raise RuntimeError(f"orchestrator exited:\n{self.logs()}")
                if left <= 0:
                    raise TimeoutError(f"cluster not serving after {timeout:.0f} s:\n{self.logs()}")
                try:
                    env = await bus.recv(timeout=min(left, 1.0))
                except E2LLMError:
                    continue
                if isinstance(env.msg, m.PlanMsg):
                    plan = env.msg.plan
                elif isinstance(env.msg, m.ClusterTelemetry):
                    d = env.msg.summary
                    if (
                        d.serving
                        and d.epoch >= min_epoch
                        and d.plan_version >= min_version
                        and plan is not None
                        and plan.version == d.plan_version
                    ):
                        return plan

    async def telemetry(
        self,
        device_ids: list[str],
        timeout: float = 10.0,
    ) -> dict[str, m.DeviceCounters]:
        """The next telemetry message of each named device."""
        out: dict[str, m.DeviceCounters] = {}
        async with Bus(self.bus_config()) as bus:
            await bus.subscribe(t.DEVICE_TELEMETRY)
            deadline = time.monotonic() + timeout
            while set(out) != set(device_ids):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no telemetry from {set(device_ids) - set(out)}")
                env = await bus.recv(timeout=left)
                if isinstance(env.msg, m.DeviceTelemetry) and env.msg.device_id in device_ids:
                    out[env.msg.device_id] = env.msg.counters
        return out


def pinned_prefill_decoder(
    path: Path,
    prefill: tuple[str, str],
    decoder: tuple[str, str],
    n_layers: int,
    split: int | None = None,
    decoder_concurrency: int = 4,
) -> Path:
    """Write to `path` a plan of two 2-device replicas, PREFILL then DECODER, layers split at
    `split` (default: the middle), for `e2llm orchestrator --plan`; returns `path`. Tests and
    benchmarks that prove the KV handoff pin this pair: the planner's role search may prefer
    mixed replicas on a small pool, and its choice follows measured, noisy profiles."""
    cut = n_layers // 2 if split is None else split

    def stage(dev: str, a: int, b: int) -> dict[str, object]:
        return {
            "device_id": dev,
            "layer_start": a,
            "layer_end": b,
            "embed": a == 0,
            "head": b == n_layers,
            "predicted_prefill_s": 0.1,
            "predicted_decode_s": 0.01,
        }

    plan = {
        "version": 1,
        "method": "pinned",
        "n_layers": n_layers,
        "predicted": {},
        "replicas": [
            {
                "replica_id": i,
                "role": role,
                "concurrency": 1 if role == "prefill" else decoder_concurrency,
                "stages": [stage(a, 0, cut), stage(b, cut, n_layers)],
            }
            for i, (role, (a, b)) in enumerate((("prefill", prefill), ("decoder", decoder)))
        ],
    }
    path.write_text(yaml.safe_dump(plan))
    return path
