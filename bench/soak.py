"""Soak run: requests without pause for minutes, printing the resident memory of the
orchestrator and every agent over time; memory must stay flat.

Some requests are abandoned on purpose (the client stops reading after a few tokens, so
the cluster cancels them) to exercise freeing of KV caches. Printed: one line per sample
(elapsed, requests done, RSS in MB per process) and, per process, the growth from the
first sample after warm-up to the last.

    .venv/bin/python bench/soak.py [--minutes 5] [--agents 4] [--sample 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from e2llm_edge.client import Client, GenerationError, collect  # noqa: E402
from e2llm_edge.errors import BusTimeout  # noqa: E402
from e2llm_edge.ops.localcluster import LocalCluster  # noqa: E402

PROMPTS = [
    "Tell me about the sea in one sentence.",
    "What is a prime number?",
    "Write a haiku about autumn.",
    "Name three tools a gardener uses.",
    "Explain what a battery does, briefly.",
]


@dataclass
class SoakResult:
    samples: list[tuple[float, int, dict[str, int]]] = field(default_factory=list)
    """(elapsed s, requests done, {process: RSS bytes})."""
    done: int = 0
    abandoned: int = 0
    errors: int = 0

    def growth_mb(self, warmup: int = 1) -> dict[str, float]:
        """Per process: last sample minus the first sample after `warmup`, in MB."""
        if len(self.samples) <= warmup:
            return {}
        first, last = self.samples[warmup][2], self.samples[-1][2]
        return {k: (last[k] - first[k]) / 2**20 for k in first if k in last}

    def table(self) -> str:
        if not self.samples:
            return "no samples"
        names = sorted(self.samples[0][2])
        lines = ["   t (s)  done  " + "  ".join(f"{n:>12s}" for n in names) + "   (RSS MB)"]
        for ts, done, rss in self.samples:
            lines.append(
                f"  {ts:6.0f} {done:5d}  "
                + "  ".join(f"{rss.get(n, 0) / 2**20:12.1f}" for n in names)
            )
        return "\n".join(lines)


async def soak(
    c: LocalCluster,
    seconds: float,
    sample_s: float,
    *,
    concurrency: int = 3,
    max_new_tokens: int = 16,
    abandon_every: int = 5,
    on_sample: Any = None,
) -> SoakResult:
    res = SoakResult()
    t0 = time.monotonic()
    stop = time.monotonic() + seconds

    async def one(client: Client, i: int) -> None:
        text = PROMPTS[i % len(PROMPTS)]
        try:
            if abandon_every and i % abandon_every == abandon_every - 1:
                async for ev in client.generate(text, max_new_tokens=max_new_tokens):
                    if ev.index >= 2:
                        break  # walk away: the client cancels, the devices free the state
                res.abandoned += 1
            else:
                await collect(client, text, max_new_tokens=max_new_tokens, timeout=60)
                res.done += 1
        except (GenerationError, BusTimeout):
            res.errors += 1

    async def load(client: Client, k: int) -> None:
        i = k
        while time.monotonic() < stop:
            await one(client, i)
            i += concurrency

    async def sampler() -> None:
        while True:
            res.samples.append((time.monotonic() - t0, res.done + res.abandoned, c.rss()))
            if on_sample is not None:
                on_sample(res)
            await asyncio.sleep(sample_s)

    async with Client(c.bus_config()) as client:
        s = asyncio.create_task(sampler())  # owned: cancelled below
        try:
            await asyncio.gather(*[load(client, k) for k in range(concurrency)])
        finally:
            s.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await s
    res.samples.append((time.monotonic() - t0, res.done + res.abandoned, c.rss()))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--memory-mb", type=float, default=420)
    ap.add_argument("--sample", type=float, default=10.0, help="seconds between samples")
    ap.add_argument("--concurrency", type=int, default=3)
    args = ap.parse_args()
    from onnx_export.export import default_model_dir, export_model

    d = default_model_dir()
    export_model(None, d, ranges="0-15,15-30", progress=False)
    model_dir = export_model(
        None, d, ranges="0-15,15-30", progress=False, graph_name="contrib", precision="exact"
    ).directory
    inv = {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {
                "id": f"k{i}",
                "memory_mb": args.memory_mb,
                "hardware": {"tflops": 0.1, "mem_bw_gbps": 10},
            }
            for i in range(args.agents)
        ],
    }
    printed = 0

    def show(res: SoakResult) -> None:
        nonlocal printed
        lines = res.table().splitlines()
        for line in lines[printed if printed else 0 :]:
            print(line, flush=True)
        printed = len(lines)

    with LocalCluster(
        model_dir, inv, cluster="soak", verbose=False, agent_args=["--request-timeout", "20"]
    ) as c:
        c.wait_serving(timeout=180)
        res = asyncio.run(
            soak(c, args.minutes * 60, args.sample, concurrency=args.concurrency, on_sample=show)
        )
    show(res)
    print(
        f"\n{res.done} completed, {res.abandoned} abandoned by the client, {res.errors} "
        f"errors in {res.samples[-1][0]:.0f} s"
    )
    growth = res.growth_mb()
    print(
        "RSS growth after warm-up (MB): "
        + ", ".join(f"{k} {v:+.1f}" for k, v in sorted(growth.items()))
    )
    return 0 if res.errors == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
