"""Replica options and the role/concurrency search.

Each candidate replica (an ordered device group) gets its best PREFILL split, its best
DECODER split and concurrency (highest token throughput among concurrencies 1..C whose
per-request speed meets the floor), and, for the single-replica case, its best MIXED
configuration. The role search then picks which replicas prefill so that the system
bottleneck B = max(1 / prefill capacity, 1 / decode capacity) (seconds per request) is
least: that minimises the excess of each phase's processing time over the arrival
interval, and below saturation keeps the most headroom.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from planner.costs import CostModel
from planner.dp import Split, SplitSolver

EXACT_ROLE_SEARCH_MAX = 12
"""Up to this many replicas the role search enumerates every assignment."""


@dataclass(frozen=True)
class ReplicaOption:
    """What one ordered device group can do in each role."""

    devices: tuple[int, ...]
    """Inventory indices in pipeline order."""
    prefill: Split | None
    """Best prefill split (None: cannot hold a prompt)."""
    prefill_rps: float
    """Prompts per second it prefills (pipelined), 0 if it cannot."""
    decode: Split | None
    """Best decoder split at `concurrency` (None: cannot meet memory or speed floor)."""
    concurrency: int
    """Chosen decoder concurrency."""
    decode_tps: float
    """Tokens per second it generates as a decoder, 0 if it cannot."""
    decode_rps: float
    """Requests per second it completes as a decoder."""
    mixed: Split | None
    """Best split as a mixed replica."""
    mixed_concurrency: int
    """Concurrency as a mixed replica."""
    mixed_rps: float
    """Requests per second as a mixed replica (prefill and decode share it)."""

    @property
    def feasible(self) -> bool:
        """It can serve in some role."""
        return self.prefill is not None or self.decode is not None or self.mixed is not None


def evaluate_group(
    solver: SplitSolver, devices: tuple[int, ...], *, min_tokens_per_s: float, with_mixed: bool
) -> ReplicaOption:
    """Every role's best configuration for one ordered device group."""
    cm = solver.cm
    out_tokens = cm.workload.mean_output_tokens
    decode_tokens = max(out_tokens - 1.0, 1e-6)  # the first token comes from the prefill
    prefill = solver.prefill(devices)
    prefill_rps = 1.0 / prefill.bottleneck_s if prefill is not None else 0.0
    decode, conc, tps = _best_decoder(solver.decode(devices), min_tokens_per_s)
    mixed: Split | None = None
    mixed_conc, mixed_rps = 1, 0.0
    if with_mixed:
        mixed, mixed_conc, mixed_rps = best_mixed(
            cm, solver.decode(devices, mixed=True), min_tokens_per_s, decode_tokens
        )
    return ReplicaOption(
        devices,
        prefill,
        prefill_rps,
        decode,
        conc,
        tps,
        tps / decode_tokens,
        mixed,
        mixed_conc,
        mixed_rps,
    )


def _best_decoder(splits: Sequence[Split | None], floor: float) -> tuple[Split | None, int, float]:
    best: tuple[Split | None, int, float] = (None, 1, 0.0)
    for c, s in enumerate(splits, start=1):
        if s is None:
            continue
        cycle = s.cycle_s(c)
        if 1.0 / cycle >= floor and c / cycle > best[2]:
            best = (s, c, c / cycle)
    return best


def best_mixed(
    cm: CostModel, splits: Sequence[Split | None], floor: float, decode_tokens: float
) -> tuple[Split | None, int, float]:
    best: tuple[Split | None, int, float] = (None, 1, 0.0)
    for c, s in enumerate(splits, start=1):
        if s is None:
            continue
        cycle = s.cycle_s(c)
        if 1.0 / cycle < floor:
            continue
        prefill_s = sum(cm.stage_times(s.layout, decode=False, tokens=cm.prompt_tokens))
        rps = 1.0 / (prefill_s + decode_tokens * cycle / c)
        if rps > best[2]:
            best = (s, c, rps)
    return best


RoleRule = Literal["balanced", "fastest_prefill"]


@dataclass(frozen=True)
class Assignment:
    """Roles for a set of replica options and the predicted system figures."""

    roles: tuple[str, ...]
    """Role of each option, in the order given."""
    bottleneck_s: float
    """max(1/prefill capacity, 1/decode capacity), seconds per request (inf: cannot serve)."""
    prefill_rps: float
    """Prefill capacity, requests/s (mixed: total capacity)."""
    decode_rps: float
    """Decode capacity, requests/s (mixed: total capacity)."""


def assign_roles(options: Sequence[ReplicaOption], rule: RoleRule = "balanced") -> Assignment:
    """Choose roles minimising the bottleneck; one option alone is mixed.

    `balanced` searches all assignments (exactly up to EXACT_ROLE_SEARCH_MAX replicas,
    else threshold splits by comparative advantage plus single flips). `fastest_prefill`
    is Splitwise's rule: the replicas fastest at prefill prefill; only their number is
    chosen.
    """
    n = len(options)
    if n == 0:
        return Assignment((), float("inf"), 0.0, 0.0)
    if n == 1:
        rps = options[0].mixed_rps
        return Assignment(("mixed",), 1.0 / rps if rps > 0 else float("inf"), rps, rps)
    mu_p = np.array([o.prefill_rps for o in options])
    mu_d = np.array([o.decode_rps for o in options])
    if rule == "fastest_prefill":
        forced = [i for i in range(n) if mu_d[i] <= 0]
        order = sorted((i for i in range(n) if mu_d[i] > 0), key=lambda i: (-mu_p[i], i))
        candidates = [_mask(forced + order[:s], n) for s in range(len(order))]
        candidates = [m for m in candidates if any(m)] or [_mask([], n)]
        return _best_of(np.array(candidates), mu_p, mu_d)
    if n <= EXACT_ROLE_SEARCH_MAX:
        codes = np.arange(1, 2**n - 1)
        masks = ((codes[:, None] >> np.arange(n)[None, :]) & 1).astype(bool)
        return _best_of(masks, mu_p, mu_d)
    ratio = mu_p / np.maximum(mu_d, 1e-300)
    order = sorted(range(n), key=lambda i: (-ratio[i], i))
    best = _best_of(np.array([_mask(order[:s], n) for s in range(1, n)]), mu_p, mu_d)
    improved = True
    while improved:
        improved = False
        current = np.array([r == "prefill" for r in best.roles])
        flips = []
        for i in range(n):
            m = current.copy()
            m[i] = not m[i]
            if 0 < m.sum() < n:
                flips.append(m)
        cand = _best_of(np.array(flips), mu_p, mu_d)
        if cand.bottleneck_s < best.bottleneck_s:
            best, improved = cand, True
    return best


def _mask(prefill: Sequence[int], n: int) -> list[bool]:
    m = [False] * n
    for i in prefill:
        m[i] = True
    return m


def _best_of(masks: np.ndarray, mu_p: np.ndarray, mu_d: np.ndarray) -> Assignment:
    """The mask (True = prefill) with the least bottleneck; first wins ties.

    A replica may only take a role it can play (positive capacity in it).
    """
    p = masks @ mu_p
    d = (~masks) @ mu_d
    valid = ((masks & (mu_p > 0)[None, :]) | (~masks & (mu_d > 0)[None, :])).all(axis=1)
    with np.errstate(divide="ignore"):
        b = np.where(valid, np.maximum(1.0 / p, 1.0 / d), np.inf)
    j = int(np.argmin(b))
    roles = tuple("prefill" if x else "decoder" for x in masks[j])
    return Assignment(roles, float(b[j]), float(p[j]), float(d[j]))
