"""Planner wall time for 7, 16, 32 and 64 devices (targets: 7 < 2 s, 64 < 60 s).

Inventories beyond 7 devices repeat the paper's testbed device kinds with seeded +-20%
variation of memory, compute and bandwidth; the model is the paper's 24-layer ~20B one.
Run: .venv/bin/python bench/planner_bench.py [--sizes 7,16,32,64] [--method e2llm]
"""

from __future__ import annotations

import argparse
import random
import time

from planner import Inventory, Workload, make_plan
from planner.sim.paper import paper_inventory, paper_model

TARGETS = {7: 2.0, 64: 60.0}


def scaled_inventory(n: int, seed: int = 0) -> Inventory:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="7,16,32,64")
    parser.add_argument("--method", default="e2llm")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = paper_model()
    print(f"model {model.name}, method {args.method}, workload 576/588 tokens")
    print(
        f"{'devices':>7} {'wall s':>8} {'target':>7} {'replicas':>8} {'P/D':>6} "
        f"{'bottleneck s':>12} {'phase':>8} {'capacity rps':>12}"
    )
    for n in (int(x) for x in args.sizes.split(",")):
        inv = scaled_inventory(n, args.seed)
        rate = 0.25 * n / 7
        wl = Workload(576, 588, rate)
        t0 = time.perf_counter()
        plan = make_plan(inv, model, wl, method=args.method, seed=args.seed)
        wall = time.perf_counter() - t0
        n_p = len(plan.by_role("prefill"))
        n_d = len(plan.by_role("decoder"))
        target = TARGETS.get(n)
        verdict = "" if target is None else ("ok" if wall < target else "SLOW")
        print(
            f"{n:>7} {wall:>8.2f} {(f'<{target:g}s ' + verdict) if target else '':>7} "
            f"{len(plan.replicas):>8} {f'{n_p}/{n_d}':>6} "
            f"{plan.predicted['bottleneck_s']:>12.4f} {plan.predicted['bottleneck_phase']:>8} "
            f"{plan.predicted['capacity_rps']:>12.3f}"
        )


if __name__ == "__main__":
    main()
