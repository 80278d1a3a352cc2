"""Planner quality and speed: seeds' spread, gap to the capacity bound, planner time.

1. Seeds: E2LLM's predicted capacity over --seeds seeds on each bundled pool (the paper's
   testbed and the 13-device edge pool) for both paper workloads at the highest load:
   min, max, spread (target: within 2%), the LP bound and the gap to it.
2. Sizes: planner time for 7 (the paper's testbed), 12, 64 and 256 devices (beyond 7:
   the testbed's device kinds repeated with seeded +-20% variation of memory, compute
   and bandwidth; the paper's model), against the targets 12 < 3 s, 64 < 20 s,
   256 < 60 s. Wall and CPU seconds are both printed with the machine's load average:
   on a shared machine the wall time depends on the other processes, the CPU time less.

Run: .venv/bin/python bench/planner_bench.py [--sizes 7,12,64,256] [--seeds 10]
     [--pools paper,edge13]
"""

from __future__ import annotations

import argparse
import os
import random
import time

from planner import Inventory, Workload, make_plan
from planner.pools import pool
from planner.sim.paper import paper_inventory, paper_model

TARGETS = {12: 3.0, 64: 20.0, 256: 60.0}


def scaled_inventory(n: int, seed: int = 0) -> Inventory:
    """The testbed's kinds repeated to n devices with seeded +-20% variation."""
    base = paper_inventory()
    if n == len(base):
        return base
    rng = random.Random(seed)
    devices = []
    for i in range(n):
        d = base.devices[i % len(base)]
        assert d.hardware is not None
        jitter = [rng.uniform(0.8, 1.2) for _ in range(3)]
        devices.append(
            {
                "id": f"{d.id}-{i}",
                "memory_mb": round(d.memory_mb * jitter[0]),
                "link": {"bandwidth_mbps": d.link.bandwidth_mbps, "latency_ms": d.link.latency_ms},
                "hardware": {
                    "tflops": d.hardware.tflops * jitter[1],
                    "mem_bw_gbps": d.hardware.mem_bw_gbps * jitter[2],
                    "efficiency": d.hardware.efficiency,
                },
            }
        )
    return Inventory.from_dict({"devices": devices}, source=f"bench-{n}")


def load() -> str:
    """The load average, for the record."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min), {five:.1f} (5 min) on {os.cpu_count()} CPUs"


def seeds_table(pools: list[str], seeds: int) -> None:
    print(f"## Seeds: E2LLM's predicted capacity over {seeds} seeds ({load()})")
    print()
    print(
        "| pool | workload | capacity min req/s | max | spread | bound req/s | gap | "
        "CPU s per plan |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in pools:
        inv, model, floor = pool(name)
        for prompt, output in ((576, 588), (2284, 1004)):
            wl = Workload(prompt, output, 2.0)
            caps = []
            bound = 0.0
            cpu = 0.0
            for s in range(seeds):
                t = time.process_time()
                plan = make_plan(inv, model, wl, seed=s, min_tokens_per_s=floor)
                cpu += time.process_time() - t
                caps.append(plan.predicted["capacity_rps"])
                bound = plan.predicted["capacity_bound_rps"]
            lo, hi = min(caps), max(caps)
            print(
                f"| {name} | {prompt}/{output} | {lo:.4f} | {hi:.4f} | "
                f"{100 * (hi - lo) / hi:.2f}% {'ok' if hi <= lo * 1.02 else 'OVER 2%'} | "
                f"{bound:.4f} | {100 * (1 - hi / bound):.0f}% | {cpu / seeds:.1f} |",
                flush=True,
            )
    print()


def sizes_table(sizes: list[int], seed: int) -> None:
    model = paper_model()
    print(f"## Planner time by pool size (paper model, 576/588 tokens; {load()})")
    print()
    print("| devices | wall s | CPU s | target | replicas | capacity req/s | bound req/s | gap |")
    print("|---|---|---|---|---|---|---|---|")
    for n in sizes:
        inv = scaled_inventory(n, seed)
        wl = Workload(576, 588, 0.25 * n / 7)
        t, c = time.perf_counter(), time.process_time()
        plan = make_plan(inv, model, wl, seed=seed)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        target = TARGETS.get(n)
        verdict = "" if target is None else f"< {target:g} s: {'ok' if wall < target else 'SLOW'}"
        cap, bound = plan.predicted["capacity_rps"], plan.predicted["capacity_bound_rps"]
        print(
            f"| {n} | {wall:.1f} | {cpu:.1f} | {verdict} | {len(plan.replicas)} | {cap:.3f} | "
            f"{bound:.3f} | {100 * (1 - cap / bound):.0f}% |",
            flush=True,
        )
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="7,12,64,256")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--pools", default="paper,edge13")
    parser.add_argument("--seed", type=int, default=0, help="seed of the size runs")
    args = parser.parse_args()
    if args.seeds > 0:
        seeds_table([p for p in args.pools.split(",") if p], args.seeds)
    if args.sizes:
        sizes_table([int(x) for x in args.sizes.split(",")], args.seed)


if __name__ == "__main__":
    main()
