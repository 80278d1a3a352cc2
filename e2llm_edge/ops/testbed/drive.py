"""The load driver (`e2llm testbed drive`): a client on the fog node that sends a recorded
stream of requests to a running testbed cluster, each at its arrival time whether or not
the earlier ones are done (open loop, as independent users arrive), and writes what came
back. It also records what the simulator needs to predict the same run: the plan the
orchestrator serves and the profiles and figures the devices announced.

Progress goes to stdout as JSON lines (`serving`, then one `done` per request), results to
`--out` as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

from e2llm_edge.client import Client, GenerationError
from e2llm_edge.errors import BusTimeout, E2LLMError
from e2llm_edge.fog.registry import Registry
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig
from planner.plan import Plan


def _say(**event: Any) -> None:
    print(json.dumps(event), flush=True)


async def wait_serving(
    cfg: BusConfig, n_devices: int, timeout: float
) -> tuple[Plan, dict[str, Any]]:
    """The plan once the orchestrator serves it, and the planner's inventory built from what
    the devices announced (their live profiles, budgets and links), as the orchestrator
    built it."""
    deadline = time.monotonic() + timeout
    plan: Plan | None = None
    registry = Registry()
    async with Bus(cfg) as bus:
        await bus.subscribe(t.PLAN)
        await bus.subscribe(t.CLUSTER_TELEMETRY)
        await bus.subscribe(t.DEVICE_PROFILE)
        serving = False
        while not (serving and plan is not None and len(registry.devices) >= n_devices):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(
                    f"not serving after {timeout:.0f} s (plan: {plan is not None}, "
                    f"profiles from {sorted(registry.devices)})"
                )
            try:
                env = await bus.recv(timeout=min(left, 1.0))
            except E2LLMError:
                continue
            msg = env.msg
            if isinstance(msg, m.PlanMsg):
                plan = msg.plan
            elif isinstance(msg, m.DeviceProfileMsg):
                registry.profile(msg.device_id, msg, time.monotonic())
            elif isinstance(msg, m.ClusterTelemetry):
                s = msg.summary
                serving = bool(s.serving and plan is not None and plan.version == s.plan_version)
    inventory, problems = registry.inventory(sorted(registry.devices))
    if problems:
        raise E2LLMError("; ".join(problems))
    return plan, inventory.to_dict()


async def one(
    client: Client, i: int, req: dict[str, Any], t0: float, timeout: float
) -> dict[str, Any]:
    await asyncio.sleep(max(0.0, t0 + req["arrival_s"] - time.monotonic()))
    sent = time.monotonic()
    out: dict[str, Any] = {"index": i, "sent_s": sent - t0, "late_s": sent - t0 - req["arrival_s"]}
    ids: list[int] = []
    try:
        async for ev in client.generate(
            prompt_ids=req["prompt_ids"],
            max_new_tokens=req["max_new_tokens"],
            timeout=timeout,
            request_id=f"r{i:05d}",
        ):
            if ev.event == "token":
                ids.extend(ev.token_ids)
                if "first_token_s" not in out:
                    out["first_token_s"] = time.monotonic() - t0
            elif ev.stats is not None:
                s = ev.stats
                out.update(
                    new_ids=list(ev.token_ids),
                    waiting_s=s.waiting_s,
                    ttft_s=s.ttft_s,
                    total_s=s.total_s,
                    queue_wait_s=s.queue_wait_s,
                    prefill_replica=s.prefill_replica,
                    decoder_replica=s.decoder_replica,
                    restarts=s.restarts,
                    retries=s.retries,
                )
    except GenerationError as exc:
        out["error"] = f"{exc.code}: {exc}"
    except BusTimeout as exc:
        out["error"] = f"silent: {exc}"
    out["done_s"] = time.monotonic() - t0
    _say(event="done", index=i, ok="error" not in out)
    return out


async def device_counters(cfg: BusConfig, n_devices: int, timeout: float = 8.0) -> dict[str, Any]:
    """Each device's running totals (prefills, decode steps and batches, KV bytes...): the
    next telemetry message of each, so the run's totals are in."""
    out: dict[str, Any] = {}
    deadline = time.monotonic() + timeout
    async with Bus(cfg) as bus:
        await bus.subscribe(t.DEVICE_TELEMETRY)
        while len(out) < n_devices and time.monotonic() < deadline:
            try:
                env = await bus.recv(timeout=max(0.01, deadline - time.monotonic()))
            except E2LLMError:
                break
            if isinstance(env.msg, m.DeviceTelemetry):
                out[env.msg.device_id] = dataclasses.asdict(env.msg.counters)
    return out


async def drive(
    cfg: BusConfig,
    stream: list[dict[str, Any]],
    n_devices: int,
    serving_timeout: float,
    request_timeout: float,
) -> dict[str, Any]:
    plan, inventory = await wait_serving(cfg, n_devices, serving_timeout)
    _say(event="serving", plan_version=plan.version, replicas=len(plan.replicas))
    async with Client(cfg, client_id="driver") as client:
        t0 = time.monotonic() + 0.5
        results = await asyncio.gather(
            *(one(client, i, r, t0, request_timeout) for i, r in enumerate(stream))
        )
    counters = await device_counters(cfg, n_devices)
    return {
        "plan": plan.to_dict(),
        "inventory": inventory,
        "requests": list(results),
        "counters": counters,
    }


def main(args: argparse.Namespace) -> int:
    stream = json.loads(Path(args.stream).read_text())
    cfg = BusConfig.from_url(args.broker, cluster=args.cluster)
    try:
        out = asyncio.run(
            drive(cfg, stream, args.devices, args.serving_timeout, args.request_timeout)
        )
    except (TimeoutError, E2LLMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(out))
    return 0
