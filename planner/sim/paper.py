"""The comparison: every method, each at its strongest routing, on the same request stream.

Every method plans for the same workload and serves the same request stream (drawn once
per workload and load from a seeded generator). Each method is simulated with every
routing policy of `planner.routing` (``time``, ``tokens``, ``count``: Splitwise's own
JSQ is ``count``, splitwise-sim's is ``tokens``) and reported at its best one (least mean
waiting time); every variant's row is kept too. Metrics are `planner.metrics`' standard
ones: waiting (all time not served), TTFT, TBT, end to end, throughput, goodput.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from planner.drift import DriftConfig, DriftPlanner
from planner.errors import PlanInfeasible
from planner.inventory import Inventory, load_inventory
from planner.make import make_plan
from planner.methods import METHODS
from planner.metrics import SLO
from planner.model import ModelSpec, load_model_description
from planner.plan import Plan
from planner.pools import data_path
from planner.routing import POLICIES, Policy
from planner.sim.cluster import SimResult, simulate
from planner.switch import SwitchCost
from planner.workload import (
    PhasedWorkload,
    Request,
    Workload,
    load_azure_trace,
    trace_path,
    workload_of,
)

PAPER_WORKLOADS: tuple[tuple[int, int], ...] = ((576, 588), (2284, 1004))
PAPER_INTERVALS: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0)


def paper_inventory() -> Inventory:
    """The paper's 7-device testbed (roofline figures)."""
    return load_inventory(data_path("paper_testbed.yaml"))


def paper_model() -> ModelSpec:
    """The paper's 24-layer ~20B model."""
    return load_model_description(data_path("paper_model_20b.yaml"))


@dataclass(frozen=True)
class Row:
    """One (workload, load, method, routing) cell."""

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
    routing: str = ""
    """Routing policy of this row."""
    best: bool = True
    """This is the method's strongest routing in this cell."""
    predicted: dict[str, float] = field(default_factory=dict)
    """The plan's predicted capacity and the bound."""

    @property
    def label(self) -> str:
        """Method and routing, as printed."""
        return f"{self.method} ({self.routing})" if self.routing else self.method


def run_stream(
    inventory: Inventory,
    model: ModelSpec,
    workload: Workload,
    requests: Sequence[Request],
    label: str,
    interval_s: float,
    methods: Sequence[str],
    seed: int,
    *,
    min_tokens_per_s: float = 15.0,
    max_concurrency: int = 16,
    policies: Sequence[Policy] = POLICIES,
    slo: SLO | None = None,
) -> list[Row]:
    """Plan with every method for `workload`, serve the same `requests` with every
    routing policy, mark each method's strongest."""
    rows: list[Row] = []
    for method in methods:
        try:
            plan = make_plan(
                inventory,
                model,
                workload,
                method=method,
                seed=seed,
                min_tokens_per_s=min_tokens_per_s,
                max_concurrency=max_concurrency,
            )
        except PlanInfeasible as e:
            rows.append(Row(label, interval_s, method, None, str(e)))
            continue
        variants = [
            Row(
                label,
                interval_s,
                method,
                simulate(
                    plan,
                    inventory,
                    model,
                    workload,
                    requests,
                    routing=policy,
                    max_concurrency=max_concurrency,
                    slo=slo,
                ),
                routing=policy,
                predicted=_predicted(plan),
            )
            for policy in policies
        ]
        best = min(variants, key=_strength)
        rows += [
            Row(v.workload, v.interval_s, v.method, v.result, "", v.routing, v is best, v.predicted)
            for v in variants
        ]
    return rows


def _predicted(plan: Plan) -> dict[str, float]:
    return {
        k: plan.figure(k, 0.0)
        for k in ("capacity_rps", "capacity_bound_rps")
        if k in plan.predicted
    }


def _strength(row: Row) -> tuple[float, float]:
    """Rank of a routing variant: most requests done, then least mean waiting."""
    assert row.result is not None
    s = row.result.summary
    return (-s.n_completed, s.waiting.mean)


def reproduce(
    inventory: Inventory,
    model: ModelSpec,
    *,
    workloads: Sequence[tuple[float, float]] = PAPER_WORKLOADS,
    intervals: Sequence[float] = PAPER_INTERVALS,
    n_requests: int = 1000,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    min_tokens_per_s: float = 15.0,
    max_concurrency: int = 16,
    policies: Sequence[Policy] = POLICIES,
    slo: SLO | None = None,
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
                min_tokens_per_s=min_tokens_per_s,
                max_concurrency=max_concurrency,
                policies=policies,
                slo=slo,
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
    min_tokens_per_s: float = 15.0,
    max_concurrency: int = 16,
    policies: Sequence[Policy] = POLICIES,
    slo: SLO | None = None,
) -> list[Row]:
    """Replay the first `n_requests` of an Azure trace (a shipped one by name: conv,
    code; or a CSV path), time-scaled to each rate."""
    rows = []
    path = trace_path(str(trace))
    name = path.name.split(".")[0].replace("AzureLLMInferenceTrace_", "azure-")
    for rate in rates_rps:
        reqs = load_azure_trace(
            path, rate_rps=rate, limit=n_requests, max_context_tokens=max_context_tokens
        )
        w = workload_of(reqs)
        rows += run_stream(
            inventory,
            model,
            w,
            reqs,
            name,
            1.0 / rate,
            methods,
            seed,
            min_tokens_per_s=min_tokens_per_s,
            max_concurrency=max_concurrency,
            policies=policies,
            slo=slo,
        )
    return rows


def strongest(rows: Sequence[Row], workload: str, interval_s: float, method: str) -> Row | None:
    """A method's strongest row in one cell (None if it could not plan)."""
    for r in rows:
        if (
            r.workload == workload
            and r.interval_s == interval_s
            and r.method == method
            and r.best
            and r.result is not None
        ):
            return r
    return None


def reduction(
    rows: Sequence[Row],
    workload: str,
    interval_s: float,
    method: str = "e2llm",
    baseline: str = "splitwise",
) -> float:
    """Fraction by which `method`'s mean waiting time is below `baseline`'s, each at its
    strongest routing."""
    a = strongest(rows, workload, interval_s, method)
    b = strongest(rows, workload, interval_s, baseline)
    if a is None or b is None or a.result is None or b.result is None:
        return float("nan")
    bw = b.result.summary.waiting.mean
    return 1.0 - a.result.summary.waiting.mean / bw if bw > 0 else float("nan")


def all_infeasible(rows: Sequence[Row]) -> bool:
    """No method could plan in any cell."""
    return bool(rows) and all(r.result is None for r in rows)


def _iv(x: float) -> str:
    return f"{x:g}" if x > 0 else "-"


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def table(rows: Sequence[Row], baseline: str = "splitwise", variants: bool = True) -> str:
    """Markdown table of every metric, each method's strongest routing marked with *,
    and mean waiting against the baseline's strongest routing."""
    lines = [
        "| workload | interval s | method (routing) | wait mean s | wait p50 | wait p90 "
        "| wait p99 | TTFT mean s | TTFT p99 | TBT mean ms | TBT p99 | e2e mean s | e2e p99 "
        f"| req/s | tok/s | goodput req/s | done | pred. cap. / bound req/s | wait vs {baseline} |",
        "|" + "---|" * 19,
    ]
    for r in rows:
        if r.result is None:
            lines.append(
                f"| {r.workload} | {_iv(r.interval_s)} | {r.method} | infeasible: {r.note} |"
                + " |" * 15
            )
            continue
        if not variants and not r.best:
            continue
        s = r.result.summary
        base = strongest(rows, r.workload, r.interval_s, baseline)
        vs = ""
        if base is not None and base.result is not None and r.method != baseline:
            bw = base.result.summary.waiting.mean
            if bw > 0:
                vs = f"{s.waiting.mean / bw:.2f}x"
        cap = r.predicted.get("capacity_rps", float("nan"))
        bound = r.predicted.get("capacity_bound_rps", float("nan"))
        mark = "*" if r.best else ""
        lines.append(
            f"| {r.workload} | {_iv(r.interval_s)} | {r.label}{mark} | {_fmt(s.waiting.mean)} | "
            f"{_fmt(s.waiting.p50)} | {_fmt(s.waiting.p90)} | {_fmt(s.waiting.p99)} | "
            f"{_fmt(s.ttft.mean)} | {_fmt(s.ttft.p99)} | {_fmt(1000 * s.tbt.mean)} | "
            f"{_fmt(1000 * s.tbt.p99)} | {_fmt(s.e2e.mean)} | {_fmt(s.e2e.p99)} | "
            f"{s.throughput_rps:.3f} | {s.throughput_tokens_per_s:.0f} | "
            f"{s.goodput_rps:.3f} | {s.n_completed}/{s.n_arrived} | "
            f"{cap:.3f} / {bound:.3f} | {vs} |"
        )
    return "\n".join(lines)


def plot(rows: Sequence[Row], path: str | Path, title: str = "") -> Path:
    """PNG of mean waiting time vs arrival interval (each method at its strongest
    routing), one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.workload for r in rows))
    fig, axes = plt.subplots(1, len(labels), figsize=(5.5 * len(labels), 4.2), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for method in dict.fromkeys(r.method for r in rows):
            pts = sorted(
                (r.interval_s, r.result.summary.waiting.mean)
                for r in rows
                if r.workload == label and r.method == method and r.result and r.best
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


REPLAN = "e2llm+replan"
"""E2LLM planned for the first phase, re-planned online by `planner.drift.DriftPlanner`."""


def run_phases(
    inventory: Inventory,
    model: ModelSpec,
    phased: PhasedWorkload,
    *,
    methods: Sequence[str] = METHODS,
    seed: int = 0,
    min_tokens_per_s: float = 15.0,
    max_concurrency: int = 16,
    policies: Sequence[Policy] = POLICIES,
    slo: SLO | None = None,
    drift: DriftConfig | None = None,
    switch: SwitchCost | None = None,
) -> list[Row]:
    """A drifting stream served by every method statically and by E2LLM re-planning.

    A static method is planned once, for the first phase's mix (what is known at the
    start) and, to give it its strongest static plan, for the whole stream's mix (what
    only hindsight knows); each is served with every routing policy and the best of all
    is the method's row. `e2llm+replan` starts from E2LLM's plan for the first phase.
    """
    reqs = phased.sample_requests(np.random.default_rng(seed))
    label = " -> ".join(ph.name for ph in phased.phases)
    first, overall = phased.first, phased.overall()
    rows: list[Row] = []
    for method in methods:
        candidates: list[Row] = []
        notes = []
        for known, w in (("first phase", first), ("whole stream", overall)):
            try:
                plan = make_plan(
                    inventory,
                    model,
                    w,
                    method=method,
                    seed=seed,
                    min_tokens_per_s=min_tokens_per_s,
                    max_concurrency=max_concurrency,
                )
            except PlanInfeasible as e:
                notes.append(f"planned for the {known}: {e}")
                continue
            for policy in policies:
                res = simulate(
                    plan,
                    inventory,
                    model,
                    w,
                    reqs,
                    routing=policy,
                    max_concurrency=max_concurrency,
                    slo=slo,
                )
                candidates.append(
                    Row(label, 0.0, f"{method} [{known}]", res, "", policy, False, _predicted(plan))
                )
        if not candidates:
            rows.append(Row(label, 0.0, method, None, "; ".join(notes)))
            continue
        best = min(candidates, key=_strength)
        rows += [replace(c, best=c is best) for c in candidates]
    try:
        start = make_plan(
            inventory,
            model,
            first,
            seed=seed,
            min_tokens_per_s=min_tokens_per_s,
            max_concurrency=max_concurrency,
        )
    except PlanInfeasible as e:
        rows.append(Row(label, 0.0, REPLAN, None, str(e)))
        return rows
    runs = []
    for policy in policies:
        planner = DriftPlanner(
            inventory,
            model,
            designed_for=first,
            seed=seed,
            min_tokens_per_s=min_tokens_per_s,
            max_concurrency=max_concurrency,
            config=drift,
            switch=switch,
        )
        res = simulate(
            start,
            inventory,
            model,
            first,
            reqs,
            routing=policy,
            max_concurrency=max_concurrency,
            slo=slo,
            switch=switch,
            replanner=planner,
        )
        runs.append(Row(label, 0.0, REPLAN, res, "", policy, False, _predicted(start)))
    best = min(runs, key=_strength)
    rows += [replace(r, best=r is best) for r in runs]
    return rows


def best_static(rows: Sequence[Row]) -> Row | None:
    """The static *baseline* with the least mean waiting (at its strongest routing and
    plan); E2LLM's own static rows are an ablation, not a baseline."""
    static = [
        r
        for r in rows
        if r.best and r.result is not None and not r.method.startswith(("e2llm ", REPLAN))
    ]
    return min(static, key=_strength) if static else None
