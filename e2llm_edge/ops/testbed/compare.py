"""What the testbed compares and how it scores it, in one place: the methods (the planner's
method each one plans with, and how the simulator routes for it) and the metrics computed
alike from measured requests and from the simulator's.

Routing: the runtime and the simulator call the same router (`planner.routing.Router`);
the orchestrator runs it with the "time" policy and binds a request's decoder when it
dispatches the prompt, so the simulator is asked to do exactly that for every method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from planner.routing import Binding, Policy
from planner.sim.cluster import SimResult

STATS = ("mean", "p50", "p90", "p99")
METRICS = ("waiting", "ttft", "tbt", "e2e")
"""Per-request figures, each summarised by STATS (seconds)."""
FIDELITY = (("waiting", "mean"), ("ttft", "mean"), ("throughput_rps", None))
"""What the simulator must predict within FIDELITY_TOLERANCE of the measured value."""
FIDELITY_TOLERANCE = 0.25


@dataclass(frozen=True)
class Method:
    """One way of planning the cluster."""

    name: str
    """As given on the command line."""
    planner: str
    """The planner method the orchestrator plans with (`--method`)."""
    routing: Policy
    """How the router (at run time and in the simulator) picks replicas for this plan."""
    bind: Binding = "dispatch"
    """When the decoder is chosen: at dispatch, as the orchestrator does."""


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("e2llm", "e2llm", "time"),
        Method("splitwise", "splitwise", "time"),
        Method("pipeline", "pipeline", "time"),
        Method("memprop", "memprop", "time"),
    )
}


def stats(xs: Sequence[float]) -> dict[str, float]:
    """mean, p50, p90, p99 (NaN when there is nothing to summarise)."""
    if not xs:
        return {k: float("nan") for k in STATS}
    a = np.asarray(xs, dtype=float)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


@dataclass(frozen=True)
class Measured:
    """One request as the runtime served it (seconds; None where it failed)."""

    index: int
    sent_s: float
    """When the driver sent it, from the first request's send."""
    done_s: float | None
    """When its last event reached the driver, same clock."""
    new_tokens: int
    waiting_s: float | None
    """The orchestrator's `RequestStats.waiting_s`: every moment it was not served."""
    ttft_s: float | None
    total_s: float | None
    error: str | None = None


def measured_metrics(rows: Sequence[Measured]) -> dict[str, Any]:
    """The measured figures, in the shape of `predicted_metrics`."""
    ok = [r for r in rows if r.error is None and r.done_s is not None]
    tbt = [
        (r.total_s - r.ttft_s) / (r.new_tokens - 1)
        for r in ok
        if r.new_tokens > 1 and r.total_s is not None and r.ttft_s is not None
    ]
    start = min((r.sent_s for r in rows), default=0.0)
    end = max((r.done_s for r in ok if r.done_s is not None), default=start)
    span = max(end - start, 1e-9)
    return {
        "completed": len(ok),
        "failed": len(rows) - len(ok),
        "waiting": stats([r.waiting_s for r in ok if r.waiting_s is not None]),
        "ttft": stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tbt": stats(tbt),
        "e2e": stats([r.total_s for r in ok if r.total_s is not None]),
        "throughput_rps": len(ok) / span,
        "throughput_tokens_per_s": sum(r.new_tokens for r in ok) / span,
        "makespan_s": span,
        "arrivals_s": max((r.sent_s for r in rows), default=start) - start,
    }


def predicted_metrics(sim: SimResult) -> dict[str, Any]:
    """The simulator's figures for the same plan, profiles and stream."""
    s = sim.summary
    return {
        "completed": sim.n_completed,
        "failed": sim.n_arrived - sim.n_completed,
        "waiting": dataclasses.asdict(s.waiting),
        "ttft": dataclasses.asdict(s.ttft),
        "tbt": dataclasses.asdict(s.tbt),
        "e2e": dataclasses.asdict(s.e2e),
        "throughput_rps": s.throughput_rps,
        "throughput_tokens_per_s": s.throughput_tokens_per_s,
        "makespan_s": s.makespan_s,
        "busy_s": {d: u * s.makespan_s for d, u in sim.utilisation.items()},
    }


def fidelity(measured: dict[str, Any], predicted: dict[str, Any]) -> dict[str, Any]:
    """Predicted against measured for each FIDELITY figure: (predicted - measured) /
    measured, and whether it is within the tolerance."""
    out: dict[str, Any] = {}
    for key, stat in FIDELITY:
        m = measured[key] if stat is None else measured[key][stat]
        p = predicted[key] if stat is None else predicted[key][stat]
        name = key if stat is None else f"{key}_{stat}"
        rel = (p - m) / m if m > 0 else float("nan")
        out[name] = {
            "measured": m,
            "predicted": p,
            "relative_error": rel,
            "within": bool(abs(rel) <= FIDELITY_TOLERANCE) if m > 0 else False,
        }
    return out


def sustained(measured: dict[str, Any], rate_rps: float, n: int) -> bool:
    """The cluster kept up with the offered load: every request served, at >= 90% of the
    offered rate over the arrivals plus one median request's time (the last arrival's own
    service: without it a short run never counts as sustained, whatever the load)."""
    if measured["completed"] != n or n < 2:
        return False
    arrivals = measured["arrivals_s"]
    offered = (n - 1) / arrivals if arrivals > 0 else rate_rps
    return bool(n / (arrivals + measured["e2e"]["p50"]) >= 0.9 * min(offered, rate_rps))
