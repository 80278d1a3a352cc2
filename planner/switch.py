"""What a plan change costs and which kind it is: a role flip (no reload) or a re-layout.

A **flip** keeps every replica's devices and layer ranges and changes only roles
(PREFILL <-> DECODER) or decoder concurrency: no device loads anything; a flipping
replica finishes the work of its old role first (its prefills, or its running decodes),
then serves in the new one. A **re-layout** moves layers: dispatch pauses, requests in
flight may finish for up to `drain_timeout_s`, the rest restart under the new plan
(re-prefilled from prompt plus the tokens already streamed, as the runtime does), and
every device whose segments change loads its weights before serving resumes.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.model import ModelSpec
from planner.plan import Plan


@dataclass(frozen=True)
class SwitchCost:
    """Figures of a plan switch (the simulator charges them, the drift planner weighs them)."""

    drain_timeout_s: float = 10.0
    """A re-layout waits at most this long for requests in flight (the orchestrator's
    --drain-timeout)."""
    load_mb_per_s: float = 200.0
    """How fast a device reads weights from its storage (a mid-range SD card / eMMC is
    ~100-300 MB/s, NVMe far more: the slow end is assumed)."""
    fixed_s: float = 2.0
    """Publishing the plan, creating sessions, first-run warm-up."""


@dataclass(frozen=True)
class Keep:
    """Stay with the current plan."""

    reason: str = ""


@dataclass(frozen=True)
class Flip:
    """Same layouts, other roles or concurrency (no reload)."""

    plan: Plan
    reason: str = ""


@dataclass(frozen=True)
class Relayout:
    """A new grouping or layer split (drain, restart, reload)."""

    plan: Plan
    reason: str = ""


SwitchDecision = Keep | Flip | Relayout


def layout_key(plan: Plan) -> frozenset[tuple[str, int, int, bool, bool]]:
    """What each device holds: equal keys mean no device reloads."""
    return frozenset(
        (s.device_id, s.layer_start, s.layer_end, s.embed, s.head)
        for r in plan.replicas
        for s in r.stages
    )


def same_layout(a: Plan, b: Plan) -> bool:
    """The two plans group devices and split layers identically (replica by replica)."""

    def shape(p: Plan) -> dict[int, tuple[tuple[str, int, int, bool, bool], ...]]:
        return {
            r.replica_id: tuple(
                (s.device_id, s.layer_start, s.layer_end, s.embed, s.head) for s in r.stages
            )
            for r in p.replicas
        }

    return shape(a) == shape(b)


def reload_s(old: Plan, new: Plan, model: ModelSpec, cost: SwitchCost) -> float:
    """Seconds until every device of `new` holds its weights, coming from `old`: the
    slowest device that must load something, plus the fixed cost (0 when nothing moves)."""
    before = {s.device_id: s for r in old.replicas for s in r.stages}
    worst = 0.0
    for r in new.replicas:
        for s in r.stages:
            b = before.get(s.device_id)
            if b is not None and (b.layer_start, b.layer_end, b.embed, b.head) == (
                s.layer_start,
                s.layer_end,
                s.embed,
                s.head,
            ):
                continue
            nbytes = sum(model.layer_param_bytes[s.layer_start : s.layer_end])
            nbytes += model.edge_bytes(embed=s.embed, head=s.head)
            worst = max(worst, nbytes / (cost.load_mb_per_s * 1e6))
    return cost.fixed_s + worst if worst > 0 else 0.0
