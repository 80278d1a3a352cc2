"""The kernel's tools, as the testbed uses them: cgroup v1 directories, network
namespaces, veth pairs, tc tbf, and starting a process inside a device.

Everything here needs root. `require()` says in one line what is missing. Nothing here
remembers what it made: `state.State` does, before anything is made.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from e2llm_edge.ops.testbed.inventory import TestbedError

CONTROLLERS = ("cpu", "memory")
"""cgroup v1 controllers every emulated device gets a directory in."""


def require() -> dict[str, Path]:
    """Root, `ip`, `tc` and cgroup v1 cpu and memory; returns each controller's mount."""
    if os.geteuid() != 0:
        raise TestbedError(
            "e2llm testbed needs root (network namespaces, veth pairs, tc and cgroups): "
            "run it with sudo"
        )
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise TestbedError(
                f"e2llm testbed needs `{tool}` (Debian/Ubuntu: apt-get install iproute2)"
            )
    mounts = cgroup_v1_mounts()
    missing = [c for c in CONTROLLERS if c not in mounts]
    if missing:
        raise TestbedError(
            f"e2llm testbed needs the cgroup v1 {' and '.join(missing)} controller(s) mounted "
            f"(found {sorted(mounts) or 'none'}; a cgroup v2-only system is not supported)"
        )
    return mounts


def cgroup_v1_mounts() -> dict[str, Path]:
    """controller -> mount point of its cgroup v1 hierarchy (from /proc/self/mountinfo)."""
    out: dict[str, Path] = {}
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        pre, _, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if len(tail) < 3 or tail[0] != "cgroup":
            continue
        for opt in tail[2].split(","):
            if opt in CONTROLLERS and opt not in out:
                out[opt] = Path(fields[4])
    return out


def own_cgroup(controller: str) -> str:
    """This process's cgroup in `controller`'s hierarchy ('/' at the root)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return path
    return "/"


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 30.0) -> str:
    """Run a command; on failure raise TestbedError naming it and quoting its stderr."""
    try:
        p = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise TestbedError(f"`{' '.join(cmd)}` did not finish in {timeout:g} s") from exc
    if check and p.returncode != 0:
        err = (p.stderr or p.stdout).strip().splitlines()
        raise TestbedError(f"`{' '.join(cmd)}` failed: {err[-1] if err else p.returncode}")
    return p.stdout


# ------------------------------------------------------------------------- cgroups


def cg_write(d: Path, name: str, value: str | int) -> None:
    try:
        (d / name).write_text(str(value))
    except OSError as exc:
        raise TestbedError(f"cannot write {value} to {d / name}: {exc.strerror}") from exc


def cg_read(d: Path, name: str) -> str:
    try:
        return (d / name).read_text().strip()
    except OSError:
        return ""


def cg_pids(d: Path) -> list[int]:
    """Processes in cgroup `d` and every cgroup below it."""
    out: list[int] = []
    if not d.is_dir():
        return out
    for sub in sorted(d.rglob("cgroup.procs")):
        with contextlib.suppress(OSError, ValueError):
            out += [int(x) for x in sub.read_text().split()]
    return out


def find_dirs(root: Path, name: str) -> list[Path]:
    """Directories called `name` anywhere below `root` (not looking inside them)."""
    out = []
    for dirpath, dirnames, _ in os.walk(root):
        if name in dirnames:
            out.append(Path(dirpath) / name)
            dirnames.remove(name)
    return out


def cg_kill_and_remove(d: Path, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process in `d` (and below), wait until it is empty, remove it.

    Membership is the proof that a process is ours: nothing outside is touched. Returns
    the pids killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while d.is_dir():
        pids = cg_pids(d)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
        if not pids:
            # deepest first: a cgroup directory is removable only once it has no children
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(FileNotFoundError):
                    sub.rmdir()
            with contextlib.suppress(FileNotFoundError, OSError):
                d.rmdir()
            if not d.is_dir():
                break
        if time.monotonic() > deadline:
            raise TestbedError(f"{d}: processes {cg_pids(d)} would not die, or it will not go")
        time.sleep(0.05)
    return killed


# ------------------------------------------------------------------------- network


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def netns_list(prefix: str) -> list[str]:
    try:
        return sorted(p.name for p in Path("/run/netns").iterdir() if p.name.startswith(prefix))
    except FileNotFoundError:
        return []


def netns_add(name: str) -> None:
    if not netns_exists(name):
        run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


def netns_delete(name: str) -> None:
    """Remove a namespace (its veth ends and their qdiscs go with it)."""
    if netns_exists(name):
        run(["ip", "netns", "delete", name])


def netns_pids(name: str) -> list[int]:
    """Processes whose network namespace is `name` (`ip netns pids`)."""
    if not netns_exists(name):
        return []
    return [int(x) for x in run(["ip", "netns", "pids", name], check=False).split()]


@dataclass(frozen=True)
class VethLink:
    """A veth pair between the fog namespace and one device namespace."""

    fog_ns: str
    fog_if: str
    fog_ip: str
    dev_ns: str
    dev_if: str
    dev_ip: str
    prefix: int = 24


def veth_add(v: VethLink) -> None:
    """Create the pair directly inside the two namespaces (nothing in the host's)."""
    exists = run(["ip", "-n", v.fog_ns, "link", "show", v.fog_if], check=False)
    if not exists:
        run(
            [
                "ip", "-n", v.fog_ns, "link", "add", v.fog_if, "type", "veth",
                "peer", "name", v.dev_if, "netns", v.dev_ns,
            ]
        )  # fmt: skip
    for ns, iface, ip in ((v.fog_ns, v.fog_if, v.fog_ip), (v.dev_ns, v.dev_if, v.dev_ip)):
        run(["ip", "-n", ns, "addr", "replace", f"{ip}/{v.prefix}", "dev", iface])
        run(["ip", "-n", ns, "link", "set", iface, "up"])


def tbf_burst_bytes(mbps: float) -> int:
    """Bucket depth: 2 ms of the rate, at least 32 KiB (a few GSO segments), so timing over
    a transfer of a second is within a percent of the rate."""
    return max(32 * 1024, int(mbps * 1e6 / 8 * 0.002))


FRAME_OVERHEAD = 1514 / 1448
"""tbf counts whole Ethernet frames; a full TCP segment carries 1448 bytes of payload in a
1514-byte frame (headers with timestamps), so the rate is set this much higher for the
payload to flow at the link's usable bandwidth (what the planner means by it)."""


def tbf_set(ns: str, iface: str, mbps: float, queue_ms: float = 50.0) -> None:
    """Shape `iface`'s egress to `mbps` of payload (tc tbf); `queue_ms` bounds its queue."""
    run(
        [
            "tc", "-n", ns, "qdisc", "replace", "dev", iface, "root", "tbf",
            "rate", f"{mbps * 1000 * FRAME_OVERHEAD:.0f}kbit",
            "burst", str(tbf_burst_bytes(mbps)),
            "latency", f"{queue_ms:g}ms",
        ]
    )  # fmt: skip


def tbf_show(ns: str, iface: str) -> str:
    """`tc qdisc show` of that interface ('' if the namespace is gone)."""
    if not netns_exists(ns):
        return ""
    return run(["tc", "-n", ns, "qdisc", "show", "dev", iface], check=False).strip()


# ------------------------------------------------------------------------- processes


def launch(
    argv: Sequence[str],
    *,
    netns: str,
    cgroups: Iterable[Path],
    log: Path,
    env: Mapping[str, str] | None = None,
    stdout: int | IO[bytes] | None = None,
) -> subprocess.Popen[bytes]:
    """Start `argv` inside cgroups `cgroups` and network namespace `netns`.

    The child joins the cgroups first and only then enters the namespace: `ip netns
    exec` remounts /sys, after which the host's cgroup files are out of reach. Its own
    session, so a Ctrl-C at the runner's terminal reaches the runner, which tears down.
    """
    procs = [str(c / "cgroup.procs") for c in cgroups]
    script = (
        'n=$1; shift; i=0; while [ "$i" -lt "$n" ]; do '
        'echo $$ > "$1" || exit 97; shift; i=$((i+1)); done; exec "$@"'
    )
    cmd = ["sh", "-c", script, "sh", str(len(procs)), *procs, "ip", "netns", "exec", netns]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [*cmd, *argv],
            stdout=out if stdout is None else stdout,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )


def stop(p: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`."""
    if p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(timeout)


def pid_alive(pid: int, start_ticks: int | None = None) -> bool:
    """The process exists (and, given its start time, is the one we started)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return False
    return start_ticks is None or int(fields[19]) == start_ticks


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time the processes `pids` have run so far (gone ones: 0)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def start_ticks(pid: int) -> int | None:
    """When the process started (clock ticks since boot): tells a reused pid apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
