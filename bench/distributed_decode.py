"""Distributed decode vs the local path, measured side by side in one run.

Prints: local decode tokens/s; distributed decode tokens/s through Mosquitto with 2 and 4
pipeline stages (one replica, the planner's `pipeline` method, agents as processes); the
per-hop overhead derived from the two; and the KV handoff time and bytes for a 512-token
prompt on a PREFILL -> DECODER pair of replicas. Rounds alternate local / 2 stages /
4 stages so that the machine's noise hits all three alike; medians are reported.

    .venv/bin/python bench/distributed_decode.py [--rounds 3] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from e2llm_edge.client import Client, collect  # noqa: E402
from e2llm_edge.device.profile import load_or_measure_profile  # noqa: E402
from e2llm_edge.fog.textio import ChatTokenizer  # noqa: E402
from e2llm_edge.ops.localcluster import LocalCluster  # noqa: E402
from onnx_export.export import default_model_dir, export_model  # noqa: E402
from onnx_export.manifest import Manifest  # noqa: E402
from planner import Plan  # noqa: E402

PROMPT = "Write a short story about a robot who learns to paint."


def inventory(n: int, memory_mb: float) -> dict[str, Any]:
    return {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {
                "id": f"dev{i}",
                "memory_mb": memory_mb,
                "hardware": {"tflops": 0.1, "mem_bw_gbps": 10},
            }
            for i in range(n)
        ],
    }


async def remote_decode(cluster: LocalCluster, prompt_ids: list[int], n: int) -> float:
    async with Client(cluster.bus_config()) as c:
        r = await collect(c, prompt_ids=prompt_ids, max_new_tokens=n, timeout=120)
    return float(r["stats"]["decode_tokens_per_s"])


def local_decode(model_dir: Path, threads: int, n: int, variant: list[str]) -> float:
    """`e2llm generate --json` in its own process (its own thread settings)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "e2llm_edge.cli",
            "generate",
            PROMPT,
            "--model",
            str(model_dir),
            "--threads",
            str(threads),
            "--max-new-tokens",
            str(n),
            "--json",
            *variant,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    return float(json.loads(out.stdout)["stats"]["decode_tokens_per_s"])


async def kv_handoff(cluster: LocalCluster, plan: Plan, prompt_ids: list[int]) -> dict[str, float]:
    p_devs = [s.device_id for r in plan.replicas if r.role == "prefill" for s in r.stages]
    d_devs = [s.device_id for r in plan.replicas if r.role == "decoder" for s in r.stages]
    before = await cluster.telemetry(p_devs, timeout=15)  # counters add up over requests
    async with Client(cluster.bus_config()) as c:
        await collect(c, prompt_ids=prompt_ids, max_new_tokens=4, timeout=120)
    tel = await cluster.telemetry(p_devs + d_devs, timeout=15)
    return {
        "bytes": sum(tel[d].kv_bytes_out - before[d].kv_bytes_out for d in p_devs),
        "send_s": max(tel[d].last_kv_send_s for d in p_devs),
        "handoff_s": max(tel[d].last_kv_handoff_s for d in d_devs),
        "wait_s": max(tel[d].last_kv_wait_s for d in d_devs),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--threads",
        type=int,
        default=2,
        help="onnxruntime threads per agent (pools sleep between runs, so idle "
        "agents leave the cores to the stage running)",
    )
    ap.add_argument("--graph", default="standard", choices=["standard", "contrib"])
    ap.add_argument("--precision", default=None, help="fp32 (standard), exact/int8 (contrib)")
    ap.add_argument(
        "--plaintext",
        action="store_true",
        help="anonymous plain TCP (default: TLS with a certificate per process, as deployed; "
        "bench/tls_cost.py measures the difference)",
    )
    args = ap.parse_args()
    precision = args.precision or ("fp32" if args.graph == "standard" else "exact")
    variant = ["--graph", args.graph, "--precision", precision]
    model_dir = export_model(
        None,
        default_model_dir(),
        ranges="0-15,15-30",
        progress=False,
        graph_name=args.graph,
        precision=precision,
    ).directory
    manifest = Manifest.load(model_dir)
    tok = ChatTokenizer(manifest)
    ids = tok.encode_prompt(PROMPT)
    load_or_measure_profile(manifest, threads=args.threads, variant=(args.graph, precision))
    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores; "
        f"{'plaintext' if args.plaintext else 'TLS with client certificates'}; "
        "local path with 1 and 2 threads; "
        f"agents {args.threads} thread(s) each; prompt {len(ids)} "
        f"tokens, up to {args.new_tokens} new tokens, {args.rounds} rounds; graph "
        f"{args.graph}/{precision}"
    )
    pipe = ["--method", "pipeline"]
    with (
        LocalCluster(
            model_dir,
            inventory(2, 4000),
            cluster="bench2",
            threads=args.threads,
            orchestrator_args=pipe,
            agent_args=variant,
            verbose=False,
            tls=not args.plaintext,
        ) as c2,
        LocalCluster(
            model_dir,
            inventory(4, 4000),
            cluster="bench4",
            threads=args.threads,
            orchestrator_args=pipe,
            agent_args=variant,
            verbose=False,
            tls=not args.plaintext,
        ) as c4,
    ):
        p2 = c2.wait_serving(timeout=180)
        p4 = c4.wait_serving(timeout=180)
        assert [len(r.stages) for r in p2.replicas] == [2], p2
        assert [len(r.stages) for r in p4.replicas] == [4], p4
        runs: dict[str, list[float]] = {
            "local 1t": [],
            "local 2t": [],
            "2 stages": [],
            "4 stages": [],
        }
        for _ in range(args.rounds):
            runs["local 1t"].append(local_decode(model_dir, 1, args.new_tokens, variant))
            runs["local 2t"].append(local_decode(model_dir, 2, args.new_tokens, variant))
            runs["2 stages"].append(asyncio.run(remote_decode(c2, ids, args.new_tokens)))
            runs["4 stages"].append(asyncio.run(remote_decode(c4, ids, args.new_tokens)))
    med = {k: statistics.median(v) for k, v in runs.items()}
    best_local = max(med["local 1t"], med["local 2t"])
    print("\ndecode tokens/s (median of rounds; all rounds in brackets)")
    for k, v in runs.items():
        print(
            f"  {k:9s} {med[k]:6.1f}  {[round(x, 1) for x in v]}  "
            f"ratio to the best local {med[k] / best_local:.2f}x"
        )
    # the local run with the agents' thread count: what the pipeline adds to the same compute
    t_local = 1 / med["local 1t" if args.threads == 1 else "local 2t"]
    for k, stages in (("2 stages", 2), ("4 stages", 4)):
        extra = 1 / med[k] - t_local
        print(
            f"  per-hop overhead ({k}): {extra / stages * 1e3:.2f} ms "
            f"({stages} hops per token: the step's way round the pipeline)"
        )

    long_ids = (tok.encode_prompt("Summarise: " + "edge devices share the work. " * 120, raw=True))[
        :512
    ]
    inv = {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": f"kv{i}", "memory_mb": 420, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
            for i in range(4)
        ],
    }
    with LocalCluster(
        model_dir,
        inv,
        cluster="benchkv",
        threads=args.threads,
        agent_args=variant,
        verbose=False,
        tls=not args.plaintext,
    ) as ck:
        pk = ck.wait_serving(timeout=180)
        roles = sorted(r.role for r in pk.replicas)
        if roles != ["decoder", "prefill"]:
            print(f"KV handoff: plan has roles {roles}, no PREFILL->DECODER pair")
            return 1
        kvs = [asyncio.run(kv_handoff(ck, pk, long_ids)) for _ in range(args.rounds)]
    kv = {k: statistics.median(x[k] for x in kvs) for k in kvs[0]}
    print(
        f"\nKV handoff for a {len(long_ids)}-token prompt (PREFILL -> DECODER, chunked "
        f"~1 MB; median of {len(kvs)}): {kv['bytes'] / 1e6:.1f} MB, sender publish time "
        f"{kv['send_s'] * 1e3:.0f} ms, first send to decoder holding all of it "
        f"{kv['handoff_s'] * 1e3:.0f} ms ({kv['bytes'] / 1e6 / max(kv['handoff_s'], 1e-9):.0f}"
        f" MB/s; all: {[round(x['handoff_s'] * 1e3) for x in kvs]} ms); the decoder's "
        f"first step waited for it {kv['wait_s'] * 1e3:.0f} ms "
        f"({[round(x['wait_s'] * 1e3) for x in kvs]} ms): the handoff's cost to the request"
    )
    target = med["4 stages"] / best_local
    print(
        f"\ntarget: 4 stages >= 0.8x local: {'met' if target >= 0.8 else 'NOT met'} ({target:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
