"""Reproduce the paper's comparison: mean waiting time vs arrival interval, per method.

Every method plans for the same workload and serves the same request stream (drawn once
per workload and interval from a seeded generator); Splitwise routes by its JSQ on
outstanding requests, the others by estimated time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from planner.errors import PlanInfeasible
from planner.inventory import Inventory, load_inventory
from planner.make import make_plan
from planner.methods import METHODS
from planner.model import ModelSpec, load_model_description
from planner.sim.cluster import Routing, SimResult, simulate
from planner.workload import Request, Workload, load_azure_trace, workload_of

PAPER_WORKLOADS: tuple[tuple[int, int], ...] = ((576, 588), (2284, 1004))
PAPER_INTERVALS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0)


def data_path(name: str) -> Path:
    """Path of a packaged data file (planner/data/<name>)."""
    return Path(str(resources.files("planner") / "data" / name))


def paper_inventory() -> Inventory:
    """The paper's 7-device testbed (roofline figures)."""
    return load_inventory(data_path("paper_testbed.yaml"))


def paper_model() -> ModelSpec:
    """The paper's 24-layer ~20B model."""
    return load_model_description(data_path("paper_model_20b.yaml"))


@dataclass(frozen=True)
class Row:
    """One (workload, load, method) cell of the comparison."""

    workload: str
    """Label, e.g. '576/588' or the trace name."""
    interval_s: float
    """Mean arrival interval."""
    method: str
    """Planning method."""
    result: SimResult | None
    """Simulation figures (None: the method could not plan)."""
    note: str = ""
    """Why there is no result."""


def routing_for(method: str) -> Routing:
    """Splitwise routes by its own JSQ; every other method by estimated time."""
    return "jsq_count" if method == "splitwise" else "jsq_time"


SPLITWISE_JSQ_TIME = "splitwise+jsq_time"
"""Ablation row: Splitwise's plan routed by E2LLM's estimated-time JSQ, to separate the
gain from planning (grouping and roles) from the gain from routing."""


def run_stream(
    inventory: Inventory,
    model: ModelSpec,
    workload: Workload,
    requests: Sequence[Request],
    label: str,
    interval_s: float,
    methods: Sequence[str],
    seed: int,
    ablation: bool = True,
) -> list[Row]:
    """Plan with every method for `workload` and serve the same `requests`."""
    rows = []
    for method in methods:
        try:
            plan = make_plan(inventory, model, workload, method=method, seed=seed)
        except PlanInfeasible as e:
            rows.append(Row(label, interval_s, method, None, str(e)))
            continue
        res = simulate(plan, inventory, model, workload, requests, routing=routing_for(method))
        rows.append(Row(label, interval_s, method, res))
        if ablation and method == "splitwise":
            res = simulate(plan, inventory, model, workload, requests, routing="jsq_time")
            rows.append(Row(label, interval_s, SPLITWISE_JSQ_TIME, res))
    return rows


def reproduce(
    inventory: Inventory,
    model: ModelSpec,
    *,
    workloads: Sequence[tuple[float, float]] = PAPER_WORKLOADS,
    intervals: Sequence[float] = PAPER_INTERVALS,
    n_requests: int = 1000,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    ablation: bool = True,
) -> list[Row]:
    """The paper's grid: each workload at each arrival interval, every method."""
    rows = []
    for wi, (prompt, output) in enumerate(workloads):
        for ii, interval in enumerate(intervals):
            w = Workload(prompt, output, 1.0 / interval)
            reqs = w.sample_requests(n_requests, np.random.default_rng([seed, wi, ii]))
            rows += run_stream(
                inventory,
                model,
                w,
                reqs,
                f"{prompt:g}/{output:g}",
                interval,
                methods,
                seed,
                ablation,
            )
    return rows


def reproduce_trace(
    inventory: Inventory,
    model: ModelSpec,
    trace: str | Path,
    *,
    rates_rps: Sequence[float],
    n_requests: int = 1000,
    max_context_tokens: int = 4096,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    ablation: bool = True,
) -> list[Row]:
    """Replay the first `n_requests` of an Azure trace, time-scaled to each rate."""
    rows = []
    name = Path(trace).stem.replace("AzureLLMInferenceTrace_", "azure-")
    for rate in rates_rps:
        reqs = load_azure_trace(
            trace, rate_rps=rate, limit=n_requests, max_context_tokens=max_context_tokens
        )
        w = workload_of(reqs)
        rows += run_stream(inventory, model, w, reqs, name, 1.0 / rate, methods, seed, ablation)
    return rows


def table(rows: Sequence[Row], baseline: str = "splitwise") -> str:
    """Markdown table of waiting time and more, with E2LLM's reduction vs the baseline."""
    base = {(r.workload, r.interval_s): r.result for r in rows if r.method == baseline}
    lines = [
        "| workload | interval s | method | wait mean s | wait p50 | wait p90 | wait p99 "
        "| TTFT mean s | TBT mean ms | tok/s | vs " + baseline + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.result is None:
            lines.append(
                f"| {r.workload} | {r.interval_s:g} | {r.method} | infeasible: "
                f"{r.note} | | | | | | | |"
            )
            continue
        s = r.result
        b = base.get((r.workload, r.interval_s))
        vs = ""
        if b is not None and r.method != baseline and b.waiting["mean"] > 0:
            vs = (
                f"{100 * (1 - s.waiting['mean'] / b.waiting['mean']):+.0f}% less"
                if s.waiting["mean"] <= b.waiting["mean"]
                else f"{100 * (s.waiting['mean'] / b.waiting['mean'] - 1):.0f}% more"
            )
        lines.append(
            f"| {r.workload} | {r.interval_s:g} | {r.method} | {s.waiting['mean']:.2f} | "
            f"{s.waiting['p50']:.2f} | {s.waiting['p90']:.2f} | {s.waiting['p99']:.2f} | "
            f"{s.ttft['mean']:.2f} | {1000 * s.tbt['mean']:.1f} | "
            f"{s.throughput_tokens_per_s:.0f} | {vs} |"
        )
    return "\n".join(lines)


def reduction(
    rows: Sequence[Row],
    workload: str,
    interval_s: float,
    method: str = "e2llm",
    baseline: str = "splitwise",
) -> float:
    """Fraction by which `method`'s mean waiting time is below `baseline`'s."""
    pick = {
        r.method: r.result for r in rows if r.workload == workload and r.interval_s == interval_s
    }
    a, b = pick.get(method), pick.get(baseline)
    if a is None or b is None or b.waiting["mean"] <= 0:
        return float("nan")
    return 1.0 - a.waiting["mean"] / b.waiting["mean"]


def plot(rows: Sequence[Row], path: str | Path, title: str = "") -> Path:
    """PNG of mean waiting time vs arrival interval, one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4.2), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for method in dict.fromkeys(r.method for r in rows):
            pts = sorted(
                (r.interval_s, r.result.waiting["mean"])
                for r in rows
                if r.workload == label and r.method == method and r.result
            )
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, [max(y, 1e-3) for y in ys], marker="o", label=method)
        ax.set_yscale("log")
        ax.set_xlabel("mean arrival interval (s)")
        ax.set_ylabel("mean waiting time (s, log)")
        ax.set_title(f"workload {label} (prompt/output tokens)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
