"""What binding the decoder at dispatch costs: E2LLM as the runtime routes today against
E2LLM as the simulator's tables route.

The runtime orchestrator and the simulator share one router (`planner/routing.py`). They
differ in one step: the runtime binds a request's decoder when it dispatches the prompt
(``bind="dispatch"``: its devices hand the KV over as each prefill stage ends), the
tables of bench/planner_compare.py bind it when the first token is out (``bind="ready"``:
the prefill devices would have to hold the KV until told where it goes). Same plan, same
seeded stream, every routing policy, each binding at its strongest; both pools, both
paper workloads, the given loads.

Run: .venv/bin/python bench/planner_binding.py [--pools paper,edge13] [--requests 1000]
     [--intervals 0.5,1] [--out runs/binding.md]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from planner import make_plan
from planner.metrics import SLO
from planner.pools import pool
from planner.routing import BINDINGS, POLICIES
from planner.sim.cluster import SimResult, simulate
from planner.workload import Workload


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pools", default="paper,edge13")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--intervals", default="0.5,1")
    parser.add_argument("--workloads", default="576/588,2284/1004")
    parser.add_argument("--max-concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args()
    intervals = [float(x) for x in args.intervals.split(",") if x]
    workloads = [tuple(float(v) for v in w.split("/")) for w in args.workloads.split(",")]
    lines = [
        f"# Decoder bound at dispatch (runtime) vs after prefill (simulated tables): E2LLM, "
        f"{args.requests} requests per cell, seed {args.seed} ({load()} at start)",
        "",
        "| pool | workload | interval s | binding (routing) | wait mean s | wait p99 | "
        "TTFT mean s | TTFT p99 | TBT mean ms | e2e mean s | req/s | done | "
        "dispatch vs ready wait |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    started = time.perf_counter()
    for name in [p for p in args.pools.split(",") if p]:
        inv, model, floor = pool(name)
        slo = SLO(ttft_s=10.0, tbt_s=1.0 / floor)
        for wi, (prompt, output) in enumerate(workloads):
            for ii, iv in enumerate(intervals):
                w = Workload(prompt, output, 1.0 / iv)
                plan = make_plan(
                    inv,
                    model,
                    w,
                    seed=args.seed,
                    min_tokens_per_s=floor,
                    max_concurrency=args.max_concurrency,
                )
                reqs = w.sample_requests(args.requests, np.random.default_rng([args.seed, wi, ii]))
                best: dict[str, tuple[str, SimResult]] = {}
                for bind in BINDINGS:
                    for policy in POLICIES:
                        res = simulate(
                            plan,
                            inv,
                            model,
                            w,
                            reqs,
                            routing=policy,
                            max_concurrency=args.max_concurrency,
                            slo=slo,
                            bind=bind,
                        )
                        key = (-res.summary.n_completed, res.summary.waiting.mean)
                        old = best.get(bind)
                        if old is None or key < (
                            -old[1].summary.n_completed,
                            old[1].summary.waiting.mean,
                        ):
                            best[bind] = (policy, res)
                ready = best["ready"][1].summary.waiting.mean
                for bind in BINDINGS:
                    policy, res = best[bind]
                    s = res.summary
                    ratio = f"{s.waiting.mean / ready:.2f}x" if bind == "dispatch" and ready else ""
                    lines.append(
                        f"| {name} | {prompt:g}/{output:g} | {iv:g} | {bind} ({policy}) | "
                        f"{s.waiting.mean:.3g} | {s.waiting.p99:.3g} | {s.ttft.mean:.3g} | "
                        f"{s.ttft.p99:.3g} | {1000 * s.tbt.mean:.3g} | {s.e2e.mean:.3g} | "
                        f"{s.throughput_rps:.3f} | {s.n_completed}/{len(reqs)} | {ratio} |"
                    )
    lines += ["", f"{time.perf_counter() - started:.0f} s; {load()} at the end"]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
