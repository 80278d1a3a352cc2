"""`e2llm demo`: a whole cluster on one machine, in one command.

A broker (the embedded one unless `--mosquitto` or `--broker`), the orchestrator and one
agent per device of the bundled inventory, each its own process (`LocalCluster`); then a
prompt is answered and the plan, waiting time, time to first token and tokens/s printed.
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
from e2llm_edge.ops.localcluster import LocalCluster
from onnx_export.manifest import Manifest
from planner import Plan


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


def run_demo(args: argparse.Namespace, model_dir: Path) -> int:
    inv_path = Path(args.inventory) if args.inventory else bundled_inventory()
    inventory = yaml.safe_load(inv_path.read_text())
    manifest = Manifest.load(model_dir)
    print(f"model: {manifest.name} ({model_dir})")
    print("profiling this machine once (cached for the agents)...")
    load_or_measure_profile(manifest, threads=1)
    kind = "mosquitto" if args.mosquitto else "embedded"
    with LocalCluster(
        model_dir,
        inventory,
        broker_url=args.broker,
        broker_kind=kind,
        cluster=args.cluster,
        orchestrator_args=["--method", args.method, "--mean-output", str(args.max_new_tokens)],
        verbose=True,
    ) as cluster:
        print(
            f"broker: {cluster.broker_url} ({'given' if args.broker else kind}); "
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


async def _ask(cluster: LocalCluster, args: argparse.Namespace) -> int:
    async with Client(cluster.bus_config()) as client:
        print(f"\nprompt: {args.prompt}\n")
        results = await asyncio.gather(
            *[_one(client, args, echo=(i == 0)) for i in range(args.requests)],
            return_exceptions=True,
        )
    ok = [r for r in results if isinstance(r, dict)]
    for r in results:
        if not isinstance(r, dict):
            print(f"request failed: {r}", file=sys.stderr)
    if ok:
        _report(ok)
    return 0 if len(ok) == len(results) else 1


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


def _report(results: list[dict[str, Any]]) -> None:
    def mean(key: str) -> float:
        return sum(float(r["stats"][key]) for r in results) / len(results)

    print(f"requests completed: {len(results)}")
    print(f"waiting time (mean, every moment not served): {mean('waiting_s') * 1e3:.0f} ms")
    print(f"time to first token (mean): {mean('ttft_s') * 1e3:.0f} ms")
    print(f"decode speed (mean per request): {mean('decode_tokens_per_s'):.1f} tokens/s")
    total = sum(int(r["stats"]["new_tokens"]) for r in results)
    span = max(float(r["stats"]["total_s"]) for r in results)
    print(f"throughput: {total / span:.1f} tokens/s ({total} tokens in {span:.2f} s)")
