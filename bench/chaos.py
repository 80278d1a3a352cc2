"""Chaos run: serve a stream of requests while agents are SIGKILLed and restarted and the
broker restarts once; every request must end with the local path's answer or an explicit
error, never in silence.

A cluster of real processes (Mosquitto, orchestrator, agents with memory budgets such that
each replica needs two devices) serves `--requests` greedy requests, `--concurrency` at a
time. Meanwhile a chaos task repeatedly kills a random device of the current plan (at most
one down at a time, so a plan stays feasible), restarts it a few seconds later, and
restarts the broker once half way, then SIGKILLs the serving orchestrator (`--standby`: a
standby takes over; otherwise it is started again). Printed: completed (identical to
`e2llm_edge.device.local.LocalModel` greedy, ids compared), wrong, explicit errors by code,
silent; the recovery time of each kill (device killed -> a new plan without it serving)
and of each return (agent restarted -> a plan with it serving); and how long client
streams stalled. Bounded: every request has a timeout and the whole run a deadline.

    .venv/bin/python bench/chaos.py [--requests 120] [--concurrency 3] [--agents 6] [--standby]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from e2llm_edge.client import Client, GenerationError  # noqa: E402
from e2llm_edge.errors import BusTimeout, E2LLMError  # noqa: E402
from e2llm_edge.ops.localcluster import LocalCluster  # noqa: E402
from e2llm_edge.wire import messages as m  # noqa: E402
from e2llm_edge.wire import topics as t  # noqa: E402
from e2llm_edge.wire.bus import Bus  # noqa: E402
from planner.plan import Plan  # noqa: E402

PROMPTS = [
    "Give me one fact about the number {n}.",
    "Name a colour and a fruit that share it ({n}).",
    "Write one sentence about a cat called Tom number {n}.",
    "What is {n} plus {n}? Answer briefly.",
    "List two uses of a paperclip, idea {n}.",
    "Say hello in a friendly way to guest {n}.",
]


def prompt(i: int, unique: int) -> str:
    k = i % unique
    return PROMPTS[k % len(PROMPTS)].format(n=k)


def inventory(n: int, memory_mb: float) -> dict[str, Any]:
    return {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": f"c{i}", "memory_mb": memory_mb, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
            for i in range(n)
        ],
    }


def cluster(
    model_dir: Path,
    n_agents: int = 6,
    memory_mb: float = 140,
    *,
    stall_s: float = 10.0,
    agent_request_timeout: float = 30.0,
    verbose: bool = True,
    plan: Path | None = None,
    **kw: Any,
) -> LocalCluster:
    """A cluster with its own Mosquitto (the chaos restarts it); `plan` pins the layout
    used while all of its devices are up (`e2llm orchestrator --plan`)."""
    pin = ["--plan", str(plan)] if plan is not None else []
    return LocalCluster(
        model_dir,
        inventory(n_agents, memory_mb),
        cluster="chaos",
        orchestrator_args=["--request-timeout", str(stall_s), *pin],
        agent_args=["--request-timeout", str(agent_request_timeout)],
        verbose=verbose,
        **kw,
    )


@dataclass
class Outcome:
    index: int
    status: str = "pending"
    """ok (identical to local), wrong, error (explicit error event), silent."""
    prompt_ids: list[int] = field(default_factory=list)
    new_ids: list[int] = field(default_factory=list)
    error_code: str | None = None
    error: str | None = None
    restarts: int = 0
    max_gap_s: float = 0.0
    """Longest silence between two events of the stream."""


@dataclass
class ChaosResult:
    outcomes: list[Outcome]
    kills: list[dict[str, Any]] = field(default_factory=list)
    broker_restarts: list[dict[str, Any]] = field(default_factory=list)
    orchestrator_kills: list[dict[str, Any]] = field(default_factory=list)
    wall_s: float = 0.0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {"ok": 0, "wrong": 0, "error": 0, "silent": 0}
        for o in self.outcomes:
            out[o.status] = out.get(o.status, 0) + 1
        return out

    def recovery_s(self) -> list[float]:
        return [k["recovery_s"] for k in self.kills if k.get("recovery_s") is not None]

    def return_s(self) -> list[float]:
        return [k["return_s"] for k in self.kills if k.get("return_s") is not None]


class PlanWatch:
    """Follows the plan and the orchestrator's serving flag (the immediate summaries)."""

    def __init__(self, c: LocalCluster) -> None:
        self.c = c
        self.plan: Plan | None = None
        self.version = 0
        self.epoch = 0
        self.serving = False
        self.changed = asyncio.Event()
        self.last: m.ClusterSummary | None = None

    def devices(self) -> set[str]:
        return {s.device_id for r in self.plan.replicas for s in r.stages} if self.plan else set()

    async def run(self) -> None:
        async with Bus(self.c.bus_config()) as bus:
            await bus.subscribe(t.PLAN)
            await bus.subscribe(t.CLUSTER_TELEMETRY)
            async for env in bus:
                if isinstance(env.msg, m.PlanMsg):
                    self.plan = env.msg.plan
                elif isinstance(env.msg, m.ClusterTelemetry):
                    d = env.msg.summary
                    self.last = d
                    self.version, self.serving, self.epoch = d.plan_version, d.serving, d.epoch
                self.changed.set()

    async def new_plan(self, after: int, device: str, member: bool, timeout: float) -> float | None:
        """Seconds until a plan newer than `after`, with (or without) `device`, serves."""
        return await self.until(
            lambda: (
                self.serving
                and self.version > after
                and (device in self.devices()) == member
                and self.plan is not None
                and self.plan.version == self.version
            ),
            timeout,
        )

    async def until(self, pred: Any, timeout: float) -> float | None:
        """Seconds until pred() holds (None after timeout)."""
        t0 = time.monotonic()
        while not pred():
            left = timeout - (time.monotonic() - t0)
            if left <= 0:
                return None
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.5))
        return time.monotonic() - t0


async def one_request(
    client: Client,
    out: Outcome,
    text: str,
    max_new_tokens: int,
    timeout: float,
) -> None:
    """Stream one request and check the stream itself: indices 0, 1, 2 ... exactly once,
    and the streamed ids equal the final event's."""
    last = time.monotonic()
    try:
        async for ev in client.generate(text, max_new_tokens=max_new_tokens, timeout=timeout):
            now = time.monotonic()
            out.max_gap_s = max(out.max_gap_s, now - last)
            last = now
            if ev.event == "token":
                if ev.index != len(out.new_ids):
                    out.status, out.error = (
                        "wrong",
                        f"token index {ev.index} after {len(out.new_ids)} tokens",
                    )
                    return
                out.new_ids.extend(ev.token_ids)
            else:
                assert ev.stats is not None
                out.prompt_ids = list(ev.stats.prompt_ids)
                out.restarts = ev.stats.restarts
                if ev.token_ids != out.new_ids:
                    out.status, out.error = "wrong", "stream differs from the final event"
                    return
                out.status = "done"
    except GenerationError as exc:
        out.status, out.error_code, out.error = "error", exc.code, str(exc)
    except BusTimeout as exc:
        out.status, out.error = "silent", str(exc)


async def chaos_task(
    c: LocalCluster,
    watch: PlanWatch,
    res: ChaosResult,
    stop: asyncio.Event,
    rng: random.Random,
    *,
    kills: int,
    every_s: float,
    down_s: float,
    broker_after_kill: int,
    orchestrator_kills: int = 0,
    recovery_timeout: float = 60.0,
) -> None:
    """Kill a random plan device, wait for the new plan, restart it, wait for it to be
    folded in; the broker restarts once after `broker_after_kill` kills (0: before the
    first kill, so that a short stream of requests surely sees it); then the serving
    orchestrator is SIGKILLed `orchestrator_kills` times (the standby takes over if the
    cluster has one, else it is started again)."""

    async def restart_broker() -> None:
        if c.broker is None or await _sleep_or_stop(stop, every_s / 2):
            return
        tb = time.monotonic()
        watch.serving = False  # only a summary sent after the restart counts
        await asyncio.to_thread(c.broker.restart, down_for=1.0)
        back = await watch.until(lambda: watch.serving, recovery_timeout)
        res.broker_restarts.append(
            {
                "at_s": round(tb - res.wall_s, 1),
                "serving_again_s": None if back is None else round(time.monotonic() - tb, 2),
            }
        )

    await watch.until(lambda: watch.serving and bool(watch.plan), 60)
    if broker_after_kill == 0:
        await restart_broker()
    for k in range(kills):
        if await _sleep_or_stop(stop, every_s):
            return
        devs = sorted(watch.devices() & {d for d, p in c.agents.items() if p.alive})
        if not devs:
            continue
        victim = rng.choice(devs)
        v0 = watch.version
        t0 = time.monotonic()
        c.agents[victim].kill()
        entry: dict[str, Any] = {
            "device": victim,
            "plan_version": v0,
            "at_s": round(t0 - res.wall_s, 1),
        }
        res.kills.append(entry)
        entry["recovery_s"] = await watch.new_plan(v0, victim, False, recovery_timeout)
        if await _sleep_or_stop(stop, down_s):
            c.restart_agent(victim)
            return
        v1 = watch.version
        c.restart_agent(victim)
        entry["return_s"] = await watch.new_plan(v1, victim, True, recovery_timeout)
        if k + 1 == broker_after_kill:
            await restart_broker()
    for _ in range(orchestrator_kills):
        if await _sleep_or_stop(stop, every_s):
            return
        await kill_orchestrator(c, watch, res, recovery_timeout)


async def kill_orchestrator(
    c: LocalCluster, watch: PlanWatch, res: ChaosResult, recovery_timeout: float
) -> None:
    """SIGKILL the orchestrator serving now; time until one of a newer lease epoch serves.
    With a standby it takes over; without, the killed one is started again. Either way the
    killed process is back (as the standby) afterwards."""
    last = watch.last
    serving = last.orchestrator_id if last is not None else "orch-a"
    e0 = watch.epoch
    t0 = time.monotonic()
    c.orchestrator_proc(serving).kill()
    entry: dict[str, Any] = {
        "orchestrator": serving,
        "standby": c.standby,
        "epoch": e0,
        "at_s": round(t0 - res.wall_s, 1),
    }
    res.orchestrator_kills.append(entry)
    if not c.standby:
        c.restart_orchestrator(serving, standby=False)
    back = await watch.until(lambda: watch.serving and watch.epoch > e0, recovery_timeout)
    entry["serving_again_s"] = None if back is None else round(time.monotonic() - t0, 2)
    if c.standby:
        c.restart_orchestrator(serving, standby=True)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> bool:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def run_chaos(
    c: LocalCluster,
    *,
    requests: int,
    concurrency: int,
    max_new_tokens: int,
    kills: int,
    every_s: float,
    down_s: float,
    broker_after_kill: int = 1,
    orchestrator_kills: int = 0,
    unique_prompts: int = 12,
    seed: int = 0,
    request_timeout: float = 90.0,
    interval_s: float = 0.5,
    deadline_s: float = 900.0,
) -> ChaosResult:
    """Requests arrive every `interval_s` (at most `concurrency` in flight); the chaos
    task kills and restarts agents meanwhile and the broker once."""
    rng = random.Random(seed)
    res = ChaosResult([Outcome(i) for i in range(requests)])
    res.wall_s = time.monotonic()
    watch = PlanWatch(c)
    stop = asyncio.Event()
    sem = asyncio.Semaphore(concurrency)

    async def worker(client: Client, o: Outcome) -> None:
        await asyncio.sleep(o.index * interval_s)  # a stream of arrivals, not one burst
        async with sem:
            await one_request(
                client, o, prompt(o.index, unique_prompts), max_new_tokens, request_timeout
            )

    async with asyncio.timeout(deadline_s), asyncio.TaskGroup() as tg:
        watcher = tg.create_task(watch.run())
        chaos = tg.create_task(
            chaos_task(
                c,
                watch,
                res,
                stop,
                rng,
                kills=kills,
                every_s=every_s,
                down_s=down_s,
                broker_after_kill=broker_after_kill,
                orchestrator_kills=orchestrator_kills,
            )
        )
        await watch.until(lambda: watch.serving, 120)
        async with Client(c.bus_config()) as client, asyncio.TaskGroup() as reqs:
            for o in res.outcomes:
                reqs.create_task(worker(client, o))
        stop.set()
        await chaos
        watcher.cancel()
    res.wall_s = time.monotonic() - res.wall_s
    return res


def check_against_local(res: ChaosResult, model_dir: Path, max_new_tokens: int) -> None:
    """Mark each completed request ok or wrong against the local path's greedy ids."""
    from e2llm_edge.device.local import LocalModel

    local = LocalModel(model_dir)
    cache: dict[tuple[int, ...], list[int]] = {}
    for o in res.outcomes:
        if o.status != "done":
            continue
        key = tuple(o.prompt_ids)
        if key not in cache:
            cache[key] = list(local.generate(o.prompt_ids, max_new_tokens))
        o.status = "ok" if o.new_ids == cache[key] else "wrong"
        if o.status == "wrong":
            o.error = f"got {o.new_ids}, local {cache[key]}"


def report(res: ChaosResult, orchestrator: m.ClusterSummary | None = None) -> str:
    n = len(res.outcomes)
    cnt = res.counts()
    codes: dict[str, int] = {}
    for o in res.outcomes:
        if o.status == "error":
            codes[o.error_code or "?"] = codes.get(o.error_code or "?", 0) + 1
    lines = [
        f"requests: {n} in {res.wall_s:.0f} s; completed identical to local: "
        f"{cnt['ok']} ({100 * cnt['ok'] / max(n, 1):.0f}%); wrong: {cnt['wrong']}; "
        f"explicit errors: {cnt['error']} {codes or ''}; silent: {cnt['silent']}"
    ]
    restarted = [o.restarts for o in res.outcomes if o.status == "ok"]
    if restarted:
        lines.append(
            f"requests that restarted at least once and still matched: "
            f"{sum(1 for r in restarted if r)}; restarts total {sum(restarted)}"
        )
    gaps = sorted(o.max_gap_s for o in res.outcomes if o.status == "ok")
    if gaps:
        lines.append(
            f"longest silence inside a stream: median {statistics.median(gaps):.2f} s, "
            f"max {gaps[-1]:.2f} s"
        )
    for k in res.kills:
        lines.append(
            f"kill {k['device']} at {k['at_s']} s (plan v{k['plan_version']}): "
            f"new plan serving after {_fmt(k.get('recovery_s'))}; back in a plan "
            f"{_fmt(k.get('return_s'))} after restart"
        )
    rec = res.recovery_s()
    if rec:
        lines.append(
            f"recovery (device killed -> new plan serving): median "
            f"{statistics.median(rec):.2f} s, max {max(rec):.2f} s over {len(rec)} "
            f"kills (target < 5 s)"
        )
    for b in res.broker_restarts:
        lines.append(
            f"broker restart at {b['at_s']} s (down 1 s): serving again after "
            f"{_fmt(b['serving_again_s'])}"
        )
    for o in res.orchestrator_kills:
        how = "the standby took over" if o["standby"] else "restarted"
        lines.append(
            f"orchestrator {o['orchestrator']} (epoch {o['epoch']}) killed at {o['at_s']} s, "
            f"{how}: serving again after {_fmt(o.get('serving_again_s'))} (target "
            f"{'3 s' if o['standby'] else '5 s + process start'})"
        )
    if orchestrator:
        lines.append(
            f"orchestrator {orchestrator.orchestrator_id} (epoch {orchestrator.epoch}): "
            f"completed {orchestrator.completed}, failed {orchestrator.failed}, attempts "
            f"restarted {orchestrator.restarted}, plan v{orchestrator.plan_version}"
        )
    for o in res.outcomes:
        if o.status in ("wrong", "silent") or (o.status == "error" and len(codes) < 10):
            lines.append(f"  request {o.index}: {o.status}: {o.error_code or ''} {o.error}")
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f} s"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--concurrency", type=int, default=3)
    ap.add_argument("--agents", type=int, default=6)
    ap.add_argument(
        "--memory-mb",
        type=float,
        default=140,
        help="per agent (planner budget): 140 makes every contrib replica span two devices",
    )
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--kills", type=int, default=4)
    ap.add_argument("--every", type=float, default=12.0, help="seconds between kills")
    ap.add_argument("--down", type=float, default=6.0, help="seconds a killed agent stays down")
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between arrivals")
    ap.add_argument(
        "--orchestrator-kills",
        type=int,
        default=1,
        help="SIGKILL the serving orchestrator this many times, after the agent kills",
    )
    ap.add_argument(
        "--standby",
        action="store_true",
        help="run a standby orchestrator that takes over (else the killed one restarts)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=900.0, help="hard bound on the run")
    ap.add_argument(
        "--logs",
        type=Path,
        default=None,
        help="keep every process's log in this directory (default: discarded)",
    )
    args = ap.parse_args()
    from onnx_export.export import default_model_dir, export_model

    d = default_model_dir()
    export_model(None, d, ranges="0-15,15-30", progress=False)
    model_dir = export_model(
        None, d, ranges="0-15,15-30", progress=False, graph_name="contrib", precision="exact"
    ).directory
    print(
        f"{args.agents} agents x {args.memory_mb:.0f} MB, {args.requests} requests "
        f"({args.concurrency} at a time, {args.max_new_tokens} new tokens), {args.kills} "
        f"kills every {args.every:.0f} s (down {args.down:.0f} s), one broker restart, "
        f"{args.orchestrator_kills} orchestrator kill(s) "
        f"({'a standby takes over' if args.standby else 'restarted'})",
        flush=True,
    )
    if args.logs is not None:
        args.logs.mkdir(parents=True, exist_ok=True)
    with cluster(
        model_dir, args.agents, args.memory_mb, workdir=args.logs, standby=args.standby
    ) as c:
        c.wait_serving(timeout=180)
        res = asyncio.run(
            run_chaos(
                c,
                requests=args.requests,
                concurrency=args.concurrency,
                max_new_tokens=args.max_new_tokens,
                kills=args.kills,
                every_s=args.every,
                down_s=args.down,
                seed=args.seed,
                interval_s=args.interval,
                deadline_s=args.deadline,
                orchestrator_kills=args.orchestrator_kills,
            )
        )
        summary = asyncio.run(_orchestrator_summary(c))
    check_against_local(res, model_dir, args.max_new_tokens)
    print(report(res, summary))
    cnt = res.counts()
    return 0 if cnt["wrong"] == 0 and cnt["silent"] == 0 and cnt["error"] == 0 else 1


async def _orchestrator_summary(c: LocalCluster) -> m.ClusterSummary | None:
    with contextlib.suppress(E2LLMError, TimeoutError):
        async with Bus(c.bus_config()) as bus:
            await bus.subscribe(t.CLUSTER_TELEMETRY)
            env = await bus.recv(timeout=5)
            if isinstance(env.msg, m.ClusterTelemetry):
                return env.msg.summary
    return None


if __name__ == "__main__":
    raise SystemExit(main())
