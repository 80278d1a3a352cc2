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

from planner.costs import CostModel, Layout, micro_batch
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
    prefill_rps = 0.0
    if prefill is not None:
        # its busiest link must also send every prompt's KV out
        link = cm.kv_link_s(prefill.layout, cm.prompt_tokens)
        prefill_rps = 1.0 / max(prefill.bottleneck_s, link)
    fast_enough = 1.0 / solver.fastest_token_s(devices) >= min_tokens_per_s
    decode, conc, tps = (
        _best_decoder(solver.decode(devices), min_tokens_per_s) if fast_enough else (None, 1, 0.0)
    )
    if decode is not None:
        # ... and a decoder's must receive them
        tps = min(tps, decode_tokens / cm.kv_link_s(decode.layout, cm.prompt_tokens))
    mixed: Split | None = None
    mixed_conc, mixed_rps = 1, 0.0
    if with_mixed and fast_enough:
        mixed, mixed_conc, mixed_rps = best_mixed(
            cm, solver.decode(devices, mixed=True), min_tokens_per_s, decode_tokens, solver
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


def evaluate_layout(
    cm: CostModel, layout: Layout, *, min_tokens_per_s: float, concurrencies: Sequence[int]
) -> ReplicaOption:
    """Every role's best configuration of a *fixed* layout (devices and layer split kept:
    a role flip or a new concurrency reloads nothing); a role whose memory or speed floor
    the layout cannot meet gets no split."""
    k = len(layout.devices)
    decode_tokens = max(cm.workload.mean_output_tokens - 1.0, 1e-6)

    def fits(kv_tokens: float, work: float) -> bool:
        mem = cm.stage_memory(layout, kv_tokens=kv_tokens, pass_tokens=work)
        return all(m <= cm.capacity[d] for m, d in zip(mem, layout.devices, strict=True))

    prefill: Split | None = None
    prefill_rps = 0.0
    if fits(cm.prefill_kv_tokens(k), cm.peak_prompt_tokens):
        times = cm.stage_times(layout, decode=False, tokens=cm.prompt_tokens, kv_out=True)
        prefill = Split(layout, tuple(times))
        link = cm.kv_link_s(layout, cm.prompt_tokens)
        prefill_rps = 1.0 / max(prefill.bottleneck_s, link)
    dec: list[Split | None] = [None] * max(concurrencies)
    mix: list[Split | None] = [None] * max(concurrencies)
    for c in concurrencies:
        b = micro_batch(c, k)
        split = Split(layout, tuple(cm.stage_times(layout, decode=True, tokens=b)))
        if fits(cm.decode_kv_tokens(c), b):
            dec[c - 1] = split
        if fits(cm.decode_kv_tokens(c), max(b, cm.peak_prompt_tokens)):
            mix[c - 1] = split
    decode, conc, tps = _best_decoder(dec, min_tokens_per_s)
    if decode is not None:
        tps = min(tps, decode_tokens / cm.kv_link_s(layout, cm.prompt_tokens))
    mixed, mixed_conc, mixed_rps = best_mixed(cm, mix, min_tokens_per_s, decode_tokens)
    return ReplicaOption(
        layout.devices,
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
    cm: CostModel,
    splits: Sequence[Split | None],
    floor: float,
    decode_tokens: float,
    solver: SplitSolver | None = None,
) -> tuple[Split | None, int, float]:
    """The concurrency (and its split) with the most requests/s as a MIXED replica, which
    prefills a whole prompt (decoding paused) then decodes it with the others."""
    best: tuple[Split | None, int, float] = (None, 1, 0.0)
    for c, s in enumerate(splits, start=1):
        if s is None:
            continue
        cycle = s.cycle_s(c)
        if 1.0 / cycle < floor:
            continue
        if solver is not None:
            prefill_s = solver.prefill_s(s.layout)
        else:
            prefill_s = sum(cm.stage_times(s.layout, decode=False, tokens=cm.prompt_tokens))
        rps = 1.0 / (prefill_s + decode_tokens * cycle / c)
        if rps > best[2]:
            best = (s, c, rps)
    return best


RoleRule = Literal["balanced", "fastest_prefill", "mixed", "hybrid"]
HYBRID_EXACT_MAX = 6
"""Up to this many replicas the hybrid role search enumerates all 3^n assignments."""
HYBRID_MARGIN = 1.05
"""MIXED replicas join a plan with roles only when that is at least 5% more capacity:
within the cost model's error, disaggregation (the paper's design) is kept."""


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
    mixed_rps: float = 0.0
    """Capacity of the MIXED replicas beside PREFILL/DECODER ones (hybrid), requests/s."""


def assign_roles(options: Sequence[ReplicaOption], rule: RoleRule = "balanced") -> Assignment:
    """Choose roles minimising the bottleneck; one option alone is mixed.

    `balanced` searches all assignments (exactly up to EXACT_ROLE_SEARCH_MAX replicas,
    else threshold splits by comparative advantage plus single flips). `fastest_prefill`
    is Splitwise's rule: the replicas fastest at prefill prefill; only their number is
    chosen. `mixed` makes every replica mixed (no roles). `hybrid` lets each replica
    also be MIXED next to PREFILL/DECODER ones (capacity = mixed + min(prefill,
    decode)), exactly up to HYBRID_EXACT_MAX replicas, else by single-replica changes
    from the best two-role and the all-mixed assignments.
    """
    n = len(options)
    if n == 0:
        return Assignment((), float("inf"), 0.0, 0.0)
    if rule == "hybrid" and n > 1:
        return _hybrid(options)
    if rule == "mixed":
        rps = sum(o.mixed_rps for o in options)
        return Assignment(("mixed",) * n, 1.0 / rps if rps > 0 else float("inf"), rps, rps)
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


_ROLE_NAMES = ("prefill", "decoder", "mixed")


def _hybrid_scores(codes: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Capacity of each assignment (rows of role codes 0=P, 1=D, 2=M); -inf if invalid."""
    onehot = codes[:, :, None] == np.arange(3)[None, None, :]  # (a, n, 3)
    totals = (onehot * mu[None]).sum(axis=1)  # (a, 3)
    n_p, n_d = onehot[:, :, 0].sum(axis=1), onehot[:, :, 1].sum(axis=1)
    playable = (~onehot | (mu[None] > 0)).all(axis=(1, 2))
    valid = playable & ((n_p > 0) == (n_d > 0)) & (onehot.any(axis=1).any(axis=1))
    split = np.where(n_p > 0, np.minimum(totals[:, 0], totals[:, 1]), 0.0)
    return np.where(valid, totals[:, 2] + split, -np.inf)


def _hybrid(options: Sequence[ReplicaOption]) -> Assignment:
    n = len(options)
    mu = np.array([[o.prefill_rps, o.decode_rps, o.mixed_rps] for o in options])
    if n <= HYBRID_EXACT_MAX:
        codes = (np.arange(3**n)[:, None] // 3 ** np.arange(n)[None, :]) % 3
        scores = _hybrid_scores(codes, mu)
        best = codes[int(np.argmax(scores))]
    else:
        two = assign_roles(options, "balanced")
        starts = [np.array([_ROLE_NAMES.index(r) for r in two.roles]), np.full(n, 2)]
        best, best_score = starts[0], -np.inf
        for current in starts:
            score = float(_hybrid_scores(current[None], mu)[0])
            while True:
                cands = np.repeat(current[None], 2 * n, axis=0)
                for i in range(n):
                    cands[2 * i, i] = (current[i] + 1) % 3
                    cands[2 * i + 1, i] = (current[i] + 2) % 3
                s = _hybrid_scores(cands, mu)
                j = int(np.argmax(s))
                if s[j] <= score * (1 + 1e-12):
                    break
                current, score = cands[j], float(s[j])
            if score > best_score:
                best, best_score = current, score
    score = float(_hybrid_scores(best[None], mu)[0])
    two = assign_roles(options, "balanced")
    if not score > HYBRID_MARGIN / two.bottleneck_s:
        return two
    roles = tuple(_ROLE_NAMES[int(c)] for c in best)
    p = float(sum(mu[i, 0] for i in range(n) if best[i] == 0))
    d = float(sum(mu[i, 1] for i in range(n) if best[i] == 1))
    m = float(sum(mu[i, 2] for i in range(n) if best[i] == 2))
    return Assignment(roles, 1.0 / score if score > 0 else float("inf"), p, d, m)


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
