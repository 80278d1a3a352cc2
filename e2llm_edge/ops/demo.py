"""`e2llm demo`: a whole cluster on one machine, in one command.

A broker, the orchestrator and one agent per device of the bundled inventory, each its
own process (`LocalCluster`); then a prompt is answered and the plan, waiting time, time
to first token and tokens/s printed. The broker is Mosquitto with TLS and a certificate
per process (a throwaway CA), as deployed; without Mosquitto (or with `--embedded`), the
embedded pure-Python broker, plaintext on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from e2llm_edge.client import Client, GenerationError, collect
from e2llm_edge.device.profile import load_or_measure_profile
from e2llm_edge.errors import BrokerError
from e2llm_edge.ops.broker import find_mosquitto
from e2llm_edge.ops.localcluster import LocalCluster
from e2llm_edge.params import GenerationParams, check_prompt
from e2llm_edge.wire.bus import Bus, BusConfig
from onnx_export.manifest import Manifest
from planner import Plan, load_inventory


def bundled_inventory() -> Path:
    return Path(str(resources.files("e2llm_edge") / "examples" / "demo-devices.yaml"))


def describe_plan(plan: Plan) -> list[str]:
    lines = []
    for r in plan.replicas:
        stages = ", ".join(
            f"{s.device_id} layers {s.layer_start}-{s.layer_end - 1}"
            f"{' +embed' if s.embed else ''}{' +head' if s.head else ''}"
            for s in r.stages
        )
        conc = f", concurrency {r.concurrency}" if r.role != "prefill" else ""
        lines.append(f"replica {r.replica_id} {r.role.upper()}{conc}: {stages}")
    return lines


def check_demo_args(args: argparse.Namespace) -> dict[str, Any]:
    """Refuse what would start a cluster for nothing; returns the inventory to start.

    The inventory is checked like the orchestrator's (every device needs only ``id`` and
    ``memory_mb``; agents measure their own costs), so a typo names file, device and field.
    """
    check_prompt(args.prompt)
    GenerationParams(max_new_tokens=args.max_new_tokens)
    inv_path = Path(args.inventory) if args.inventory else bundled_inventory()
    load_inventory(inv_path, require_costs=False)
    inventory: dict[str, Any] = yaml.safe_load(inv_path.read_text())
    if args.broker:  # a given broker must answer before anything is loaded or started
        asyncio.run(_reachable(BusConfig.from_url(args.broker, cluster=args.cluster)))
    return inventory


def run_demo(args: argparse.Namespace, model_dir: Path, inventory: dict[str, Any]) -> int:
    """Start the cluster of ``inventory`` (from ``check_demo_args``) and ask it."""
    manifest = Manifest.load(model_dir)
    print(f"model: {manifest.name} ({model_dir})")
    load_or_measure_profile(
        manifest,
        threads=1,
        on_measure=lambda: print("profiling this machine once (cached for the agents)..."),
    )
    kind = _broker_kind(args)
    with LocalCluster(
        model_dir,
        inventory,
        broker_url=args.broker,
        broker_kind=kind,
        tls=kind == "mosquitto",
        cluster=args.cluster,
        orchestrator_args=["--method", args.method, "--mean-output", str(args.max_new_tokens)],
        verbose=True,
    ) as cluster:
        how = {
            "mosquitto": "Mosquitto, TLS with a client certificate per process",
            "embedded": "embedded broker, plaintext on loopback",
        }[kind]
        print(
            f"broker: {cluster.broker_url} ({'given' if args.broker else how}); "
            f"{len(inventory['devices'])} agents starting..."
        )
        try:
            plan = cluster.wait_serving(timeout=180)
        except (TimeoutError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print(
            f"plan v{plan.version} ({plan.method}): {len(plan.replicas)} replicas over "
            f"{len(inventory['devices'])} devices"
        )
        for line in describe_plan(plan):
            print("  " + line)
        return asyncio.run(_ask(cluster, args))


async def _reachable(cfg: BusConfig) -> None:
    async with Bus(cfg, publish_will_on_close=False):
        pass


def _broker_kind(args: argparse.Namespace) -> str:
    """Mosquitto (TLS) when it is installed or asked for; else the embedded broker."""
    if args.embedded:
        return "embedded"
    try:
        find_mosquitto()
    except BrokerError:
        if args.mosquitto:
            raise
        print("Mosquitto not found: using the embedded broker (plaintext, no ACL)")
        return "embedded"
    return "mosquitto"


async def _ask(cluster: LocalCluster, args: argparse.Namespace) -> int:
    async with Client(cluster.bus_config("client")) as client:
        print(f"\nprompt: {args.prompt}")
        if args.requests > 1:
            print(
                f"({args.requests} copies sent at once; the first one's answer is shown, "
                f"the figures cover all {args.requests})"
            )
        print()
        results = await asyncio.gather(
            *[_one(client, args, echo=(i == 0)) for i in range(args.requests)],
            return_exceptions=True,
        )
    for i, r in enumerate(results, 1):
        if not isinstance(r, dict):
            print(f"request {i} failed: {r}", file=sys.stderr)
    _report(results)
    return 0 if all(isinstance(r, dict) for r in results) else 1


async def _one(client: Client, args: argparse.Namespace, echo: bool) -> dict[str, Any]:
    if not echo:
        return await collect(client, args.prompt, max_new_tokens=args.max_new_tokens)
    text: list[str] = []
    try:
        async for ev in client.generate(args.prompt, max_new_tokens=args.max_new_tokens):
            if ev.event == "token":
                text.append(ev.text)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            else:
                print("\n")
                assert ev.stats is not None
                stats = dataclasses.asdict(ev.stats)
                stats.pop("prompt_ids")
                return {"text": "".join(text), "stats": stats}
    except GenerationError as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        raise
    raise GenerationError("incomplete", "stream ended without a done event")


def _report(outcomes: list[dict[str, Any] | BaseException]) -> None:
    """Each request's figures (when there are several), then the means over those that
    completed."""
    results = [r for r in outcomes if isinstance(r, dict)]
    if len(outcomes) > 1:
        print("request  new tokens   waiting  first token  tokens/s")
        for i, r in enumerate(outcomes, 1):
            if not isinstance(r, dict):
                print(f"{i:>7}  failed")
                continue
            s = r["stats"]
            print(
                f"{i:>7}  {int(s['new_tokens']):>10}  {float(s['waiting_s']) * 1e3:>5.0f} ms"
                f"  {float(s['ttft_s']) * 1e3:>8.0f} ms  {float(s['decode_tokens_per_s']):>8.1f}"
            )

    print(f"requests completed: {len(results)} of {len(outcomes)}")
    if not results:
        return

    def mean(key: str) -> float:
        return sum(float(r["stats"][key]) for r in results) / len(results)

    print(f"waiting time (mean, every moment not served): {mean('waiting_s') * 1e3:.0f} ms")
    print(f"time to first token (mean): {mean('ttft_s') * 1e3:.0f} ms")
    print(f"decode speed (mean per request): {mean('decode_tokens_per_s'):.1f} tokens/s")
    total = sum(int(r["stats"]["new_tokens"]) for r in results)
    span = max(float(r["stats"]["total_s"]) for r in results)
    print(f"throughput: {total / span:.1f} tokens/s ({total} tokens in {span:.2f} s)")
