"""Join-the-shortest-queue routing by estimated waiting time (the paper's run-time router).

A PREFILL replica's estimated wait is the prompt tokens it still has to process, this
prompt included, times its predicted seconds per prompt token; up to one prefill per
pipeline stage runs at once (a pipeline of k stages overlaps k prompts). A DECODER
replica takes a request while it runs fewer than its planned concurrency; among those,
the least loaded relative to its concurrency wins. Ties go to the lower replica id, so
routing is deterministic. Replicas in `exclude` (they lost a device) get nothing.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from planner import Plan, Replica, Workload


@dataclass
class ReplicaLoad:
    """What the orchestrator has sent to one replica and not yet seen finish."""

    replica_id: int
    role: str
    depth: int
    """Prefills allowed in flight at once (one per pipeline stage)."""
    concurrency: int
    s_per_prompt_token: float
    prefill_tokens: int = 0
    prefills: int = 0
    decoding: set[str] = field(default_factory=set)

    @classmethod
    def for_replica(cls, r: Replica, workload: Workload) -> ReplicaLoad:
        per_token = sum(s.predicted_prefill_s for s in r.stages) / workload.mean_prompt_tokens
        return cls(
            r.replica_id,
            r.role,
            depth=len(r.stages),
            concurrency=max(1, r.concurrency),
            s_per_prompt_token=max(per_token, 1e-9),
        )

    def wait_s(self, n_tokens: int) -> float:
        return (self.prefill_tokens + n_tokens) * self.s_per_prompt_token

    def start_prefill(self, n_tokens: int) -> None:
        self.prefill_tokens += n_tokens
        self.prefills += 1

    def finish_prefill(self, n_tokens: int) -> None:
        self.prefill_tokens = max(0, self.prefill_tokens - n_tokens)
        self.prefills = max(0, self.prefills - 1)

    def start_decode(self, rid: str) -> None:
        self.decoding.add(rid)

    def finish_decode(self, rid: str) -> None:
        self.decoding.discard(rid)


def choose_prefill(
    plan: Plan, loads: dict[int, ReplicaLoad], n_tokens: int, exclude: Collection[int] = ()
) -> int | None:
    """The PREFILL (or mixed) replica with the least estimated wait and room in its pipe."""
    best: tuple[float, int] | None = None
    for r in plan.replicas:
        if r.role not in ("prefill", "mixed") or r.replica_id in exclude:
            continue
        load = loads[r.replica_id]
        if load.prefills >= load.depth:
            continue
        if r.role == "mixed" and len(load.decoding) >= load.concurrency:
            continue
        key = (load.wait_s(n_tokens), r.replica_id)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]


def choose_decoder(
    plan: Plan, loads: dict[int, ReplicaLoad], prefill: int | None, exclude: Collection[int] = ()
) -> int | None:
    """A DECODER replica with a free slot (a mixed replica decodes what it prefilled)."""
    if prefill is None:
        return None
    if loads[prefill].role == "mixed":
        return prefill
    best: tuple[float, int] | None = None
    for r in plan.replicas:
        if r.role != "decoder" or r.replica_id in exclude:
            continue
        load = loads[r.replica_id]
        if len(load.decoding) >= load.concurrency:
            continue
        key = (len(load.decoding) / load.concurrency, r.replica_id)
        if best is None or key < best:
            best = key
    return None if best is None else best[1]
