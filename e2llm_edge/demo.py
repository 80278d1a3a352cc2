"""`e2llm demo`: a whole cluster on one machine, in one command.

A broker (the embedded one unless `--mosquitto` or `--broker`), the orchestrator (in this
process), and one agent process per device of the bundled inventory; then a prompt is
answered and the plan, time to first token, tokens/s and waiting time are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from e2llm_edge.bus import BusConfig
from e2llm_edge.client import Client, GenerationError, collect
from e2llm_edge.orchestrator import Orchestrator, OrchestratorConfig, describe_plan
from e2llm_edge.profile import load_or_measure_profile
from onnx_export.manifest import Manifest
from planner import Workload


def bundled_inventory() -> Path:
    return Path(str(resources.files("e2llm_edge") / "examples" / "demo-devices.yaml"))


@dataclass
class AgentProc:
    device_id: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def spawn_agent(device_id: str, memory_mb: float, broker_url: str, cluster: str,
                model_dir: Path, logdir: Path, threads: int = 1,
                link: dict[str, float] | None = None, extra: list[str] | None = None,
                ) -> AgentProc:
    """Start `e2llm agent` as its own process (as on a real device)."""
    log = logdir / f"agent-{device_id}.log"
    cmd = [sys.executable, "-m", "e2llm_edge.cli", "-v", "agent", "--broker", broker_url,
           "--cluster", cluster, "--device-id", device_id, "--memory-mb", str(memory_mb),
           "--model", str(model_dir), "--threads", str(threads)]
    if link:
        cmd += ["--bandwidth-mbps", str(link["bandwidth_mbps"]),
                "--latency-ms", str(link["latency_ms"])]
    cmd += extra or []
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    return AgentProc(device_id, proc, log)


def stop_agents(agents: list[AgentProc], timeout: float = 5.0) -> None:
    for a in agents:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for a in agents:
        try:
            a.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            a.proc.kill()
            a.proc.wait()


@contextlib.contextmanager
def broker_for(args: argparse.Namespace, workdir: Path) -> Iterator[str]:
    """The broker URL to use; starts (and stops) one unless --broker was given."""
    if args.broker:
        yield args.broker
        return
    if args.mosquitto:
        from e2llm_edge.broker import start_mosquitto

        (workdir / "mosquitto").mkdir()
        with start_mosquitto(workdir=workdir / "mosquitto") as b:
            yield b.url
        return
    from e2llm_edge.embedded_broker import start_embedded

    with start_embedded(workdir / "embedded") as url:
        yield url


def run_demo(args: argparse.Namespace, model_dir: Path) -> int:
    inv_path = Path(args.inventory) if args.inventory else bundled_inventory()
    inventory = yaml.safe_load(inv_path.read_text())
    manifest = Manifest.load(model_dir)
    print(f"model: {manifest.name} ({model_dir})")
    print("profiling this machine once (cached for the agents)...")
    load_or_measure_profile(manifest, threads=1)
    with tempfile.TemporaryDirectory(prefix="e2llm-demo-") as tmp, \
            broker_for(args, Path(tmp)) as url:
        print(f"broker: {url}")
        agents = [spawn_agent(d["id"], d["memory_mb"], url, args.cluster, model_dir, Path(tmp),
                              link=d.get("link")) for d in inventory["devices"]]
        try:
            return asyncio.run(_serve(args, url, model_dir, inv_path, agents))
        finally:
            stop_agents(agents)


async def _serve(args: argparse.Namespace, url: str, model_dir: Path, inv_path: Path,
                 agents: list[AgentProc]) -> int:
    bus = BusConfig.from_url(url, cluster=args.cluster, client_id="orchestrator")
    orch = Orchestrator(OrchestratorConfig(
        bus=bus, model_dir=model_dir, inventory_path=inv_path, method=args.method,
        workload=Workload(256, max(1, args.max_new_tokens), 0.5)))
    task = asyncio.create_task(orch.run())  # owned: cancelled below
    try:
        if not await _wait_ready(orch, agents, task, timeout=120):
            return 1
        assert orch.plan is not None
        print(f"plan v{orch.plan.version} ({orch.plan.method}): {len(orch.plan.replicas)} "
              f"replicas over {len(agents)} devices")
        for line in describe_plan(orch.plan).split("; "):
            print("  " + line)
        async with Client(BusConfig.from_url(url, cluster=args.cluster)) as client:
            print(f"\nprompt: {args.prompt}\n")
            results = await asyncio.gather(*[
                _one(client, args, echo=(i == 0)) for i in range(args.requests)],
                return_exceptions=True)
        ok = [r for r in results if isinstance(r, dict)]
        for r in results:
            if not isinstance(r, dict):
                print(f"request failed: {r}", file=sys.stderr)
        if ok:
            _report(ok)
        return 0 if len(ok) == len(results) else 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _wait_ready(orch: Orchestrator, agents: list[AgentProc], task: asyncio.Task[None],
                      timeout: float) -> bool:  # noqa: ASYNC109 (polls several things)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if orch.serving:
            return True
        if task.done():
            task.result()
        dead = [a for a in agents if a.proc.poll() is not None]
        if dead:
            for a in dead:
                print(f"agent {a.device_id} exited ({a.proc.returncode}):\n{a.tail()}",
                      file=sys.stderr)
            return False
        if orch.plan_error:
            print(f"error: {orch.plan_error}", file=sys.stderr)
            return False
        await asyncio.sleep(0.1)
    print(f"error: the cluster was not serving after {timeout:.0f} s; agent logs:",
          file=sys.stderr)
    for a in agents:
        print(f"--- {a.device_id}\n{a.tail()}", file=sys.stderr)
    return False


async def _one(client: Client, args: argparse.Namespace, echo: bool) -> dict[str, Any]:
    if not echo:
        return await collect(client, args.prompt, max_new_tokens=args.max_new_tokens)
    new_ids: list[int] = []
    text: list[str] = []
    try:
        async for ev in client.generate(args.prompt, max_new_tokens=args.max_new_tokens):
            if ev.event == "token":
                new_ids.extend(ev.token_ids)
                text.append(ev.text)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            else:
                print("\n")
                return {"new_ids": new_ids, "text": "".join(text), "stats": ev.stats}
    except GenerationError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        raise
    raise GenerationError("incomplete", "stream ended without a done event")


def _report(results: list[dict[str, Any]]) -> None:
    def mean(key: str) -> float:
        vals = [float(r["stats"][key]) for r in results]
        return sum(vals) / len(vals)

    n = len(results)
    print(f"requests: {n} completed")
    print(f"waiting time (queue, mean): {mean('queue_wait_s') * 1e3:.0f} ms")
    print(f"time to first token (mean): {mean('ttft_s') * 1e3:.0f} ms")
    print(f"decode speed (mean per request): {mean('decode_tokens_per_s'):.1f} tokens/s")
    total = sum(int(r["stats"]["new_tokens"]) for r in results)
    span = max(float(r["stats"]["total_s"]) for r in results)
    print(f"throughput: {total / span:.1f} tokens/s over {span:.1f} s")

