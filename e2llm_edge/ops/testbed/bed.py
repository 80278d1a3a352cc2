"""A pool of unequal emulated devices on this machine, serving with the real runtime.

Layout of testbed `name` (n devices, device i = 1..n):

- namespace `e2tb-<name>-fog`: Mosquitto on 127.0.0.1:1883, the orchestrator, the load
  driver and one relay per device listening on 10.77.<i>.1:1883 (the broker is reachable
  from a device only through its relay);
- namespace `e2tb-<name>-<id>` per device, joined to the fog namespace by a veth pair
  (`eth0` = 10.77.<i>.2 here, `v<i>` = 10.77.<i>.1 there), `tc tbf` at both ends for the
  link's rate; the relay adds the link's one-way delay each way;
- cgroup `e2tb-<name>/<id>` under this process's own cgroup in the cpu and memory
  hierarchies: `cpu.cfs_quota_us` for the CPU share, `memory.limit_in_bytes` for the RAM;
  `e2tb-<name>/fog` (no limits) holds the fog node's processes, so every process the
  testbed starts is in one of its cgroups, which is how `down` finds them.

Every process is the CLI a user runs (`e2llm profile`, `e2llm agent`, `e2llm orchestrator`),
started inside its cgroups and namespace. Inside these closed namespaces the broker speaks
plain MQTT without passwords: only the relays can reach it, and the runs compare planning
methods, which TLS would cost alike.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2llm_edge.ops.broker import MosquittoConfig, find_mosquitto, render_config
from e2llm_edge.ops.testbed import system
from e2llm_edge.ops.testbed.inventory import TestbedError, TestbedInventory
from e2llm_edge.ops.testbed.state import (
    ProcRecord,
    State,
    cgroup_dirname,
    check_name,
    known_names,
    ns_prefix,
    state_root,
)
from planner import Workload

FOG = "fog"
BROKER_PORT = 1883
CLUSTER = "testbed"
"""The runtime's cluster name (topic prefix) inside every testbed."""
PROBE_PORT = 5201


def subnet(i: int) -> tuple[str, str]:
    """(fog side, device side) addresses of device i's veth pair."""
    return f"10.77.{i}.1", f"10.77.{i}.2"


def cli(*args: str) -> list[str]:
    """The `e2llm` command line of this installation."""
    return [sys.executable, "-m", "e2llm_edge.cli", *args]


@dataclass(frozen=True)
class Check:
    """One enforcement check and what it measured."""

    device: str
    what: str
    expected: float
    measured: float
    ok: bool
    detail: str = ""


class Testbed:
    """`Testbed.create(name, inventory, model_dir)` then `up()`; `down(name)` always."""

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, state: State, mounts: dict[str, Path], logs: Path | None = None) -> None:
        self.state = state
        self.mounts = mounts
        self.inventory = TestbedInventory.from_dict(state.inventory, source=f"testbed {state.name}")
        self.model_dir = Path(state.model_dir)
        self.logs = logs or state.dir / "logs"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    # ------------------------------------------------------------------ creation

    @classmethod
    def create(
        cls, name: str, inventory: TestbedInventory, model_dir: Path, logs: Path | None = None
    ) -> Testbed:
        """Check the machine and claim the name; nothing is made yet but the state file."""
        mounts = system.require()
        inventory.check_fits()
        check_name(name)
        leftovers = system.netns_list(ns_prefix(name))
        if State.load(name) is not None or leftovers:
            raise TestbedError(
                f"testbed {name!r} is already up or was not cleaned "
                f"(e2llm testbed down --name {name})"
            )
        state = State(name, inventory=inventory.to_dict(), model_dir=str(model_dir))
        state.save()
        return cls(state, mounts, logs)

    @classmethod
    def attach(cls, name: str) -> Testbed:
        """The testbed `name` that is up (another process made it)."""
        mounts = system.require()
        state = State.load(name)
        if state is None:
            raise TestbedError(f"no testbed {name!r} is up (known: {known_names() or 'none'})")
        return cls(state, mounts)

    @property
    def name(self) -> str:
        return self.state.name

    def ns(self, where: str) -> str:
        return ns_prefix(self.name) + where

    def cgroups(self, where: str | None = None) -> list[Path]:
        """The testbed's cgroup directories (or `where`'s) in each controller."""
        out = []
        for ctrl in system.CONTROLLERS:
            own = system.own_cgroup(ctrl).lstrip("/")
            base = self.mounts[ctrl] / own / cgroup_dirname(self.name)
            out.append(base if where is None else base / where)
        return out

    def cgroup(self, controller: str, where: str) -> Path:
        return self.cgroups(where)[system.CONTROLLERS.index(controller)]

    def device_cache(self, device_id: str) -> Path:
        """E2LLM_CACHE of that device: its own profile cache, as on a real device."""
        return self.state.dir / "devices" / device_id / "cache"

    # ------------------------------------------------------------------ up

    def up(self, step: Callable[[str], None] = lambda s: None) -> dict[str, dict[str, Any]]:
        """Namespaces, links, cgroups, broker and relays; then every device profiles itself
        under its limits. Returns the profiles."""
        step("namespaces, links and cgroups")
        self.build()
        step("broker and relays")
        self.start_broker()
        self.start_relays()
        step("devices profiling themselves under their limits")
        return self.profile_devices()

    def build(self) -> None:
        st, inv = self.state, self.inventory
        fog_ns = self.ns(FOG)
        st.namespaces = [fog_ns] + [self.ns(d.id) for d in inv.devices]
        st.cgroups = [str(p) for p in self.cgroups()]
        st.fog = {"ns": fog_ns, "broker": f"127.0.0.1:{BROKER_PORT}"}
        for i, d in enumerate(inv.devices, start=1):
            fog_ip, dev_ip = subnet(i)
            st.devices[d.id] = {
                "index": i,
                "ns": self.ns(d.id),
                "fog_if": f"v{i}",
                "fog_ip": fog_ip,
                "dev_if": "eth0",
                "dev_ip": dev_ip,
                "relay": f"{fog_ip}:{BROKER_PORT}",
            }
        st.save()  # before anything exists: a runner killed from here on leaves a record
        for ns in st.namespaces:
            system.netns_add(ns)
        for d in inv.devices:
            e = st.devices[d.id]
            system.veth_add(
                system.VethLink(fog_ns, e["fog_if"], e["fog_ip"], e["ns"], e["dev_if"], e["dev_ip"])
            )
            system.tbf_set(fog_ns, e["fog_if"], d.link.bandwidth_mbps)
            system.tbf_set(e["ns"], e["dev_if"], d.link.bandwidth_mbps)
        self._make_cgroups()

    def _make_cgroups(self) -> None:
        inv = self.inventory
        cpu_parent = self.cgroups()[0]
        for parent in self.cgroups():
            parent.mkdir(exist_ok=True)
        # the testbed competes for the machine as its cores' worth of processes would
        system.cg_write(
            cpu_parent, "cpu.shares", 1024 * max(1, -(-int(inv.cpu_percent_total) // 100))
        )
        for where in [FOG, *(d.id for d in inv.devices)]:
            for d in self.cgroups(where):
                d.mkdir(exist_ok=True)
        for dev in inv.devices:
            cpu = self.cgroup("cpu", dev.id)
            period = inv.period_us(dev)
            system.cg_write(cpu, "cpu.cfs_period_us", period)
            system.cg_write(cpu, "cpu.cfs_quota_us", dev.quota_us(period))
            system.cg_write(cpu, "cpu.shares", max(2, round(1024 * dev.cpu_percent / 100)))
            mem = self.cgroup("memory", dev.id)
            limit = int(dev.memory_mb * 1e6)
            system.cg_write(mem, "memory.limit_in_bytes", limit)
            if (mem / "memory.memsw.limit_in_bytes").exists():
                system.cg_write(mem, "memory.memsw.limit_in_bytes", limit)
            with contextlib.suppress(TestbedError):
                system.cg_write(mem, "memory.swappiness", 0)

    # ------------------------------------------------------------------ processes

    def spawn(
        self,
        role: str,
        where: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        stdout: Any = None,
        record: bool = True,
    ) -> subprocess.Popen[bytes]:
        """Start `argv` on the fog node or a device (its cgroups and namespace)."""
        p = system.launch(
            argv,
            netns=self.ns(where),
            cgroups=self.cgroups(where),
            log=self.logs / f"{role}.log",
            env=env,
            stdout=stdout,
        )
        self.procs[role] = p
        if record:
            self.state.procs[role] = ProcRecord(p.pid, system.start_ticks(p.pid), where, argv)
            self.state.save()
        return p

    def stop_role(self, role: str) -> None:
        p = self.procs.pop(role, None)
        if p is not None:
            system.stop(p)
        self.state.procs.pop(role, None)
        self.state.save()

    def start_broker(self) -> None:
        d = self.state.dir / "broker"
        d.mkdir(parents=True, exist_ok=True)
        conf = d / "mosquitto.conf"
        conf.write_text(
            render_config(
                MosquittoConfig(host="127.0.0.1", port=BROKER_PORT), port=BROKER_PORT, workdir=d
            )
        )
        with contextlib.suppress(FileNotFoundError):
            (d / "mosquitto.log").unlink()
        self.spawn("broker", FOG, [find_mosquitto(), "-c", str(conf)])
        self._wait_port(FOG, "127.0.0.1", BROKER_PORT, "broker")

    def start_relays(self) -> None:
        for d in self.inventory.devices:
            e = self.state.devices[d.id]
            self.spawn(
                f"relay-{d.id}",
                FOG,
                cli(
                    "testbed", "relay", "--listen", e["relay"],
                    "--to", f"127.0.0.1:{BROKER_PORT}", "--delay-ms", f"{d.link.latency_ms:g}",
                ),
            )  # fmt: skip
        for d in self.inventory.devices:
            host, _, port = self.state.devices[d.id]["relay"].rpartition(":")
            self._wait_port(FOG, host, int(port), f"relay-{d.id}")

    def _wait_port(
        self, where: str, host: str, port: int, role: str, timeout: float = 20.0
    ) -> None:
        """Until something accepts on host:port inside `where`'s namespace."""
        deadline = time.monotonic() + timeout
        probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=0.5).close()"
        while True:
            p = self.procs.get(role)
            if p is not None and p.poll() is not None:
                raise TestbedError(f"{role} exited with code {p.returncode}: {self.log_tail(role)}")
            r = subprocess.run(
                ["ip", "netns", "exec", self.ns(where), sys.executable, "-c", probe],
                capture_output=True,
                timeout=10,
            )
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TestbedError(f"{role} not listening on {host}:{port} after {timeout:g} s")
            time.sleep(0.2)

    def log_tail(self, role: str, n: int = 8) -> str:
        try:
            lines = (self.logs / f"{role}.log").read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-n:])

    def variant_args(self) -> list[str]:
        return ["--graph", self.inventory.graph, "--precision", self.inventory.precision]

    def profile_devices(self, timeout: float = 600.0) -> dict[str, dict[str, Any]]:
        """`e2llm profile` on each device in turn, in its cgroups (its CPU share and memory)
        with its own cache, where its agent finds the profile when it starts.

        One at a time, as each real device profiles on hardware of its own: seven at once
        on this machine timed each other's contention (the 50% device's decode step came
        out 3.4x its full-speed figure instead of 2x, the 10% one only 2.7x slower than
        it)."""
        out_dir = self.state.dir / "profiles"
        out_dir.mkdir(parents=True, exist_ok=True)
        profiles: dict[str, dict[str, Any]] = {}
        for d in self.inventory.devices:
            target = out_dir / f"{d.id}.yaml"
            role = f"profile-{d.id}"
            with target.open("wb") as f:
                p = self.spawn(
                    role,
                    d.id,
                    cli(
                        "profile", "--model", str(self.model_dir), "--threads", "1",
                        *self.variant_args(),
                    ),
                    env={"E2LLM_CACHE": str(self.device_cache(d.id))},
                    stdout=f,
                    record=False,
                )  # fmt: skip
            try:
                rc = p.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                system.stop(p)
                raise TestbedError(f"device {d.id}: profiling took over {timeout:g} s") from exc
            if rc != 0:
                why = "killed: out of memory?" if rc == -9 else f"exit code {rc}"
                raise TestbedError(
                    f"device {d.id}: `e2llm profile` failed under its limits ({why}): "
                    f"{self.log_tail(role)}"
                )
            doc = yaml.safe_load(target.read_text()) or {}
            profiles[d.id] = doc.get("profile", {})
        return profiles

    # ------------------------------------------------------------------ the cluster

    def start_cluster(
        self,
        method: str,
        workload: Workload,
        seed: int = 0,
        min_tokens_per_s: float = 15.0,
    ) -> None:
        """The orchestrator (planning with `method` for `workload`) and every agent."""
        self.state.cluster = {
            "method": method,
            "workload": [
                workload.mean_prompt_tokens,
                workload.mean_output_tokens,
                workload.arrival_rate_rps,
            ],
            "seed": seed,
            "min_tokens_per_s": min_tokens_per_s,
        }
        self.state.save()
        self.spawn(
            "orchestrator",
            FOG,
            cli(
                "orchestrator", "--broker", f"mqtt://127.0.0.1:{BROKER_PORT}",
                "--cluster", CLUSTER, "--id", "orchestrator", "--model", str(self.model_dir),
                "--expect-devices", str(len(self.inventory.devices)), "--method", method,
                "--seed", str(seed), "--mean-prompt", f"{workload.mean_prompt_tokens:g}",
                "--mean-output", f"{workload.mean_output_tokens:g}",
                "--rate", f"{workload.arrival_rate_rps:g}",
                "--min-tokens-per-s", f"{min_tokens_per_s:g}",
            ),
        )  # fmt: skip
        for d in self.inventory.devices:
            e = self.state.devices[d.id]
            self.spawn(
                f"agent-{d.id}",
                d.id,
                cli(
                    "agent", "--broker", f"mqtt://{e['relay']}", "--cluster", CLUSTER,
                    "--device-id", d.id, "--memory-mb", f"{d.budget_mb:g}",
                    "--model", str(self.model_dir), "--threads", "1", *self.variant_args(),
                    "--bandwidth-mbps", f"{d.link.bandwidth_mbps:g}",
                    "--latency-ms", f"{d.link.latency_ms:g}",
                ),
                env={"E2LLM_CACHE": str(self.device_cache(d.id))},
            )  # fmt: skip

    def wait_serving(self, timeout: float = 600.0) -> float:
        """Seconds until the orchestrator serves a plan (`e2llm health` on the fog node)."""
        t0 = time.monotonic()
        health = cli(
            "health", "--broker", f"mqtt://127.0.0.1:{BROKER_PORT}", "--cluster", CLUSTER,
            "--orchestrator", "--serving", "--timeout", "5",
        )  # fmt: skip
        while True:
            r = subprocess.run(
                ["ip", "netns", "exec", self.ns(FOG), *health], capture_output=True, timeout=30
            )
            if r.returncode == 0:
                return time.monotonic() - t0
            said = r.stderr.decode(errors="replace").strip()
            if "not serving (" in said and "(no serving plan)" not in said:
                # the orchestrator planned with every device and found no plan: final
                why = said.split("not serving (", 1)[1].removesuffix(")")
                raise TestbedError(f"the cluster cannot serve: {why}")
            dead = self.dead_processes()
            if dead:
                raise TestbedError(f"the cluster lost a process before serving: {dead[0]}")
            if time.monotonic() - t0 > timeout:
                raise TestbedError(
                    f"not serving after {timeout:g} s: {self.log_tail('orchestrator', 3)}"
                )
            time.sleep(1.0)

    def stop_cluster(self) -> None:
        """Agents and orchestrator stop, and the broker restarts empty: the next cluster
        inherits no retained plan, state or session."""
        self.stop_role("orchestrator")  # first: it would re-plan around each agent stopping
        for d in self.inventory.devices:
            self.stop_role(f"agent-{d.id}")
        self.stop_role("broker")
        self.state.cluster = {}
        self.state.save()
        self.start_broker()

    def dead_processes(self, expected: tuple[str, ...] = ()) -> list[str]:
        """Roles of long-lived processes that exited (with their log's last lines), but
        for the `expected` ones that exited cleanly (a load driver that finished)."""
        out = []
        for role, p in self.procs.items():
            if role in expected and p.poll() == 0:
                continue
            if role in self.state.procs and p.poll() is not None:
                out.append(f"{role} exited with code {p.returncode}: {self.log_tail(role, 4)}")
        return out

    def reset_peaks(self) -> None:
        """Zero each device's memory high-water mark and note its throttling so far."""
        for d in self.inventory.devices:
            with contextlib.suppress(TestbedError):
                system.cg_write(self.cgroup("memory", d.id), "memory.max_usage_in_bytes", 0)

    def device_usage(self) -> dict[str, dict[str, float]]:
        """Per device: memory peak and limit, OOM kills, CPU periods throttled (and for how
        long), CPU seconds its processes have run."""
        out = {}
        for d in self.inventory.devices:
            mem, cpu = self.cgroup("memory", d.id), self.cgroup("cpu", d.id)
            stat = dict(
                line.split() for line in system.cg_read(cpu, "cpu.stat").splitlines() if line
            )
            oom = dict(
                line.split()
                for line in system.cg_read(mem, "memory.oom_control").splitlines()
                if line
            )
            out[d.id] = {
                "memory_peak_mb": int(system.cg_read(mem, "memory.max_usage_in_bytes") or 0) / 1e6,
                "memory_limit_mb": int(system.cg_read(mem, "memory.limit_in_bytes") or 0) / 1e6,
                "oom_kills": int(oom.get("oom_kill", 0)),
                "cpu_periods": int(stat.get("nr_periods", 0)),
                "cpu_throttled": int(stat.get("nr_throttled", 0)),
                "cpu_throttled_s": int(stat.get("throttled_time", 0)) / 1e9,
                "cpu_s": system.cpu_seconds(system.cg_pids(cpu)),
            }
        return out

    # ------------------------------------------------------------------ checks

    def check(self, *, transfer_s: float = 1.0, oom: bool = False) -> list[Check]:
        """Prove each limit: the cgroup files, a busy loop's CPU time, optionally an OOM
        kill at the memory limit (only when no agent runs), a timed transfer each way
        through every shaped link, and the delay every relay adds."""
        out: list[Check] = []
        for d in self.inventory.devices:
            out += self.check_cgroup(d.id)
            out.append(self.check_cpu(d.id))
            if oom:
                out.append(self.check_oom(d.id))
            out.append(self.check_rate(d.id, "up", transfer_s))
            out.append(self.check_rate(d.id, "down", transfer_s))
            out.append(self.check_latency(d.id))
        return out

    def check_cgroup(self, dev_id: str) -> list[Check]:
        d = self.inventory.device(dev_id)
        cpu, mem = self.cgroup("cpu", dev_id), self.cgroup("memory", dev_id)
        quota = int(system.cg_read(cpu, "cpu.cfs_quota_us") or -1)
        period = int(system.cg_read(cpu, "cpu.cfs_period_us") or -1)
        limit = int(system.cg_read(mem, "memory.limit_in_bytes") or -1)
        want_limit = int(d.memory_mb * 1e6)
        page = 4096  # the kernel rounds a limit down to whole pages
        return [
            Check(
                dev_id,
                "cpu quota (% of a core)",
                d.cpu_percent,
                100 * quota / period,
                abs(100 * quota / period - d.cpu_percent) < 0.5,
                f"{cpu}: cfs_quota_us {quota} / cfs_period_us {period}",
            ),
            Check(
                dev_id,
                "memory limit (MB)",
                d.memory_mb,
                limit / 1e6,
                want_limit - page < limit <= want_limit,
                f"{mem}: memory.limit_in_bytes {limit}",
            ),
        ]

    def check_cpu(self, dev_id: str, seconds: float = 1.0) -> Check:
        """A busy loop on the device: CPU time it gets over `seconds` of wall time."""
        d = self.inventory.device(dev_id)
        cpu = self.cgroup("cpu", dev_id)
        before = int(
            dict(x.split() for x in system.cg_read(cpu, "cpu.stat").splitlines())["nr_throttled"]
        )
        code = (
            "import time,json;t=time.perf_counter();c=time.process_time()\n"
            f"while time.perf_counter()-t<{seconds}: pass\n"
            "print(json.dumps({'cpu': time.process_time()-c, 'wall': time.perf_counter()-t}))"
        )
        r = self._run_in(dev_id, [sys.executable, "-c", code], "check-cpu")
        after = int(
            dict(x.split() for x in system.cg_read(cpu, "cpu.stat").splitlines())["nr_throttled"]
        )
        share = 100 * r["cpu"] / r["wall"]
        # a busy machine may give less than the share, never more
        return Check(
            dev_id,
            "busy loop CPU (% of a core)",
            d.cpu_percent,
            share,
            share <= d.cpu_percent * 1.15 + 1 and after > before,
            f"throttled in {after - before} periods",
        )

    def check_oom(self, dev_id: str) -> Check:
        """Allocate past the limit on the device: the kernel must kill the allocator."""
        d = self.inventory.device(dev_id)
        mem = self.cgroup("memory", dev_id)
        before = _oom_kills(mem)
        n = int(d.memory_mb * 1e6 * 1.2)
        p = system.launch(
            [sys.executable, "-c", f"b = bytearray({n}); print('survived')"],
            netns=self.ns(dev_id),
            cgroups=self.cgroups(dev_id),
            log=self.logs / "check-oom.log",
        )
        rc = p.wait(60)
        kills = _oom_kills(mem) - before
        return Check(
            dev_id,
            "allocation past the memory limit killed",
            1,
            kills,
            rc == -9 and kills >= 1,
            f"{n / 1e6:.0f} MB asked; exit code {rc}",
        )

    def check_rate(self, dev_id: str, direction: str, seconds: float) -> Check:
        """A timed bulk transfer through the device's shaped link (one way)."""
        d = self.inventory.device(dev_id)
        e = self.state.devices[dev_id]
        nbytes = int(min(64e6, max(2e6, d.link.bandwidth_mbps * 1e6 / 8 * seconds)))
        if direction == "up":
            rx_where, rx_ip, tx_where = FOG, e["fog_ip"], dev_id
        else:
            rx_where, rx_ip, tx_where = dev_id, e["dev_ip"], FOG
        mod = [sys.executable, "-m", "e2llm_edge.ops.testbed.probe"]
        sink = system.launch(
            [*mod, "sink", "--listen", f"{rx_ip}:{PROBE_PORT}"],
            netns=self.ns(rx_where),
            cgroups=self.cgroups(rx_where),
            log=self.logs / "check-rate.log",
            stdout=subprocess.PIPE,
        )
        try:
            assert sink.stdout is not None
            ready = sink.stdout.readline()
            if not ready:
                raise TestbedError(
                    f"device {dev_id}: probe sink did not start ({self.log_tail('check-rate')})"
                )
            self._run_in(
                tx_where,
                [*mod, "source", "--to", f"{rx_ip}:{PROBE_PORT}", "--bytes", str(nbytes)],
                "check-rate",
            )
            out, _ = sink.communicate(timeout=60)
        finally:
            system.stop(sink)
        got = json.loads(out.decode().strip().splitlines()[-1])
        want = d.link.bandwidth_mbps
        return Check(
            dev_id,
            f"{direction}link rate (Mbit/s)",
            want,
            got["mbps"],
            abs(got["mbps"] - want) <= 0.2 * want,
            f"{got['bytes'] / 1e6:.1f} MB in {got['seconds']:.2f} s",
        )

    def check_latency(self, dev_id: str) -> Check:
        """MQTT round trips from the device through its relay, against the same from the
        fog node straight to the broker: the difference is twice the link's delay (plus
        the small message's time on the wire)."""
        d = self.inventory.device(dev_id)
        e = self.state.devices[dev_id]
        mod = [sys.executable, "-m", "e2llm_edge.ops.testbed.probe", "rtt"]
        via = self._run_in(dev_id, [*mod, "--broker", e["relay"]], "check-latency")
        direct = self._run_in(FOG, [*mod, "--broker", f"127.0.0.1:{BROKER_PORT}"], "check-latency")
        added = (via["median_ms"] - direct["median_ms"]) / 2
        want = d.link.latency_ms
        return Check(
            dev_id,
            "relay one-way delay (ms)",
            want,
            added,
            abs(added - want) <= max(0.15 * want, 0.5),
            f"round trip {via['median_ms']:.2f} ms via relay, {direct['median_ms']:.2f} ms direct",
        )

    def _run_in(
        self, where: str, argv: list[str], log: str, timeout: float = 120.0
    ) -> dict[str, Any]:
        p = system.launch(
            argv,
            netns=self.ns(where),
            cgroups=self.cgroups(where),
            log=self.logs / f"{log}.log",
            stdout=subprocess.PIPE,
        )
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            system.stop(p)
            raise TestbedError(f"{where}: `{' '.join(argv[-4:])}` took over {timeout:g} s") from exc
        if p.returncode != 0:
            raise TestbedError(f"{where}: `{' '.join(argv[-4:])}` failed: {self.log_tail(log)}")
        result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        return result

    def down(self) -> list[str]:
        """`down(name)`, then reap this process's children (all dead by now)."""
        done = down(self.name)
        for p in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(5)
        self.procs.clear()
        return done

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        st = self.state
        procs = {
            role: {"pid": r.pid, "where": r.where, "alive": system.pid_alive(r.pid, r.start)}
            for role, r in st.procs.items()
        }
        devices = {}
        usage = self.device_usage()
        for d in self.inventory.devices:
            e = st.devices.get(d.id, {})
            devices[d.id] = {
                "namespace": e.get("ns"),
                "namespace_exists": system.netns_exists(e.get("ns", "")),
                "address": e.get("dev_ip"),
                "relay": e.get("relay"),
                "cpu_percent": d.cpu_percent,
                "memory_mb": d.memory_mb,
                "budget_mb": d.budget_mb,
                "link": {"bandwidth_mbps": d.link.bandwidth_mbps, "latency_ms": d.link.latency_ms},
                "tbf_device_side": system.tbf_show(e.get("ns", ""), e.get("dev_if", "")),
                "tbf_fog_side": system.tbf_show(st.fog.get("ns", ""), e.get("fog_if", "")),
                **usage.get(d.id, {}),
            }
        return {
            "name": st.name,
            "state_dir": str(st.dir),
            "fog": {**st.fog, "namespace_exists": system.netns_exists(st.fog.get("ns", ""))},
            "cluster": st.cluster,
            "processes": procs,
            "devices": devices,
        }


def _oom_kills(mem: Path) -> int:
    doc = dict(x.split() for x in system.cg_read(mem, "memory.oom_control").splitlines() if x)
    return int(doc.get("oom_kill", 0))


def down(name: str) -> list[str]:
    """Remove everything testbed `name` made, whatever state it was left in; idempotent.

    Processes first (every process in its cgroups, then any left in its namespaces), then
    the cgroups, the namespaces (their veths and qdiscs go with them), the state directory.
    Returns what was removed, one line each."""
    check_name(name)
    done: list[str] = []
    state = State.load(name)
    mounts = system.cgroup_v1_mounts()
    cg_dirs = {Path(p) for p in (state.cgroups if state else [])}
    for mount in mounts.values():  # also a parent the state file never got to name
        cg_dirs |= set(system.find_dirs(mount, cgroup_dirname(name)))
    namespaces = set(state.namespaces if state else []) | set(system.netns_list(ns_prefix(name)))
    for d in sorted(cg_dirs):
        if d.is_dir():
            killed = system.cg_kill_and_remove(d)
            done.append(
                f"cgroup {d} removed" + (f" (killed {len(killed)} processes)" if killed else "")
            )
    for ns in sorted(namespaces):
        for pid in system.netns_pids(ns):  # anything that got in without our cgroups
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                done.append(f"killed pid {pid} in namespace {ns}")
        system.netns_delete(ns)
        done.append(f"namespace {ns} deleted")
    d = state_root() / name
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"state {d} removed")
    return done
