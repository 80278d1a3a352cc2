"""Do a decoder's requests circulate in the micro-batches the planner counts on?

The planner models a K-stage decoder running C requests as min(K, C) micro-batches of
ceil(C / min(K, C)) each (`planner.plan.micro_batch`). This bench pins a plan with one
single-device PREFILL replica and one K-stage DECODER replica of concurrency C, sends C
requests at once, and prints per round: tokens/s over the whole burst, mean time between
tokens, and each decoder stage's mean batch (decode steps / decode passes, from the
agents' own counters) beside the micro-batch planned. Agents run one thread each; on a
2-core machine the K stages share two cores, so tokens/s here measures the agents'
overheads more than the pipeline's parallelism (on separate devices every stage has a
core of its own).

    .venv/bin/python bench/decode_batching.py [--stages 2,4] [--concurrency 8]
        [--new-tokens 48] [--rounds 3] [--plaintext]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from e2llm_edge.client import Client, collect  # noqa: E402
from e2llm_edge.ops.localcluster import LocalCluster  # noqa: E402
from onnx_export.export import default_model_dir, export_model  # noqa: E402
from onnx_export.manifest import Manifest  # noqa: E402
from planner.plan import micro_batch  # noqa: E402


def _stage(device: str, start: int, end: int, embed: bool, head: bool) -> dict[str, Any]:
    return {
        "device_id": device,
        "layer_start": start,
        "layer_end": end,
        "embed": embed,
        "head": head,
        "predicted_prefill_s": 0.1,
        "predicted_decode_s": 0.01,
    }


def pinned_plan(n_layers: int, stages: int, concurrency: int) -> dict[str, Any]:
    """One PREFILL device holding the whole model, and a DECODER of `stages` even stages."""
    cuts = [round(n_layers * i / stages) for i in range(stages + 1)]
    decoder = [
        _stage(f"d{i}", cuts[i], cuts[i + 1], i == 0, i == stages - 1) for i in range(stages)
    ]
    return {
        "version": 1,
        "method": "pinned",
        "n_layers": n_layers,
        "predicted": {},
        "replicas": [
            {
                "replica_id": 0,
                "role": "prefill",
                "concurrency": 1,
                "stages": [_stage("p0", 0, n_layers, True, True)],
            },
            {"replica_id": 1, "role": "decoder", "concurrency": concurrency, "stages": decoder},
        ],
    }


async def burst(
    cluster: LocalCluster, prompts: list[str], new_tokens: int, stages: int
) -> dict[str, Any]:
    devices = [f"d{i}" for i in range(stages)]
    before = await cluster.telemetry(devices, timeout=15)
    async with Client(cluster.bus_config()) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *[collect(client, p, max_new_tokens=new_tokens, timeout=300) for p in prompts]
        )
        wall = time.perf_counter() - t0
    after = await cluster.telemetry(devices, timeout=15)
    batch = {}
    for d in devices:
        steps = after[d].decode_steps - before[d].decode_steps
        passes = after[d].decode_batches - before[d].decode_batches
        batch[d] = steps / passes if passes else 0.0
    tokens = sum(len(r["new_ids"]) for r in results)
    tbt = statistics.mean(1 / r["stats"]["decode_tokens_per_s"] for r in results)
    return {"tokens_per_s": tokens / wall, "tbt_ms": tbt * 1e3, "batch": batch}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--stages", default="2,4", help="decoder stage counts to run")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plaintext", action="store_true", help="anonymous plain TCP")
    args = ap.parse_args()
    model_dir = export_model(
        None, default_model_dir(), progress=False, graph_name="contrib", precision="exact"
    ).directory
    n_layers = int(Manifest.load(model_dir).config["n_layers"])
    c = args.concurrency
    prompts = [f"Write a long story number {n} about a robot who paints." for n in range(c)]
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; {'plaintext' if args.plaintext else 'TLS'};"
        f" {c} requests at once, up to {args.new_tokens} new tokens each; contrib/exact graph;"
        f" one thread per agent; {args.rounds} rounds after a warm-up"
    )
    for k in (int(x) for x in args.stages.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            plan = Path(tmp) / "plan.yaml"
            plan.write_text(yaml.safe_dump(pinned_plan(n_layers, k, c)))
            devices = ["p0"] + [f"d{i}" for i in range(k)]
            inventory = {
                "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
                "devices": [
                    {"id": d, "memory_mb": 2000, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
                    for d in devices
                ],
            }
            with LocalCluster(
                model_dir,
                inventory,
                cluster=f"batching{k}",
                threads=1,
                orchestrator_args=["--plan", str(plan)],
                agent_args=["--graph", "contrib", "--precision", "exact"],
                verbose=False,
                tls=not args.plaintext,
            ) as cluster:
                cluster.wait_serving(timeout=180)
                asyncio.run(burst(cluster, prompts, args.new_tokens, k))  # warm-up
                rounds = [
                    asyncio.run(burst(cluster, prompts, args.new_tokens, k))
                    for _ in range(args.rounds)
                ]
        planned = micro_batch(c, k)
        print(f"\n{k} stages, concurrency {c}: planned micro-batches of {planned}")
        for i, r in enumerate(rounds):
            stages = " ".join(f"{d} {b:.2f}" for d, b in r["batch"].items())
            print(
                f"  round {i + 1}: {r['tokens_per_s']:.1f} tok/s, mean TBT {r['tbt_ms']:.1f} ms;"
                f" mean batch per stage: {stages}"
            )
        mean_batch = statistics.mean(b for r in rounds for b in r["batch"].values())
        print(
            f"  median {statistics.median(r['tokens_per_s'] for r in rounds):.1f} tok/s; "
            f"mean batch {mean_batch:.2f} of the planned {planned} "
            f"({mean_batch / planned:.0%}; requests joining and finishing at different "
            "times keep it below)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
