"""Plans that follow the load: at low arrival rates, roles and concurrency for latency.

The grouping search maximises capacity (the right goal once the load nears it: waiting
then grows without bound). Below `LOW_LOAD` of that capacity, several plans can carry
the load and the question becomes which one answers fastest. The candidates, all on the
searched groups:

- the capacity-optimal roles and concurrencies;
- the same roles with each decoder on its *latency* split: the concurrency whose layer
  split decodes one request fastest (less KV reserved lets the split favour the fast
  devices), as long as the load stays below `HEADROOM` of the capacity;
- the role assignments (PREFILL / DECODER / MIXED) with the least latency proxy (the
  fastest prefill replica's prompt time plus the output at the fastest decoder's
  per-token time) among those that carry the load.

Each candidate serves the same short seeded request stream at the actual rate in the
simulator (the same code that is compared later), and the least mean end-to-end latency
wins; ties keep the capacity-optimal plan. Deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from planner.costs import CostModel
from planner.plan import Plan
from planner.roles import (
    HYBRID_EXACT_MAX,
    Assignment,
    ReplicaOption,
    _hybrid_scores,
)
from planner.search import Evaluation, Evaluator

LOW_LOAD = 0.8
"""Below this fraction of the best capacity, latency decides between plans."""
HEADROOM = 0.5
"""A latency candidate must keep the load below this fraction of its own capacity: a
short probe cannot see the queueing of a plan run close to its limit."""
PROBE_REQUESTS = 30
"""Requests of the short stream each candidate serves."""
ROLE_CANDIDATES = 2
"""Role assignments (by latency proxy) tried beside the capacity-optimal one."""

_NAMES = ("prefill", "decoder", "mixed")


def latency_split(ev: Evaluator, option: ReplicaOption, load_rps: float) -> ReplicaOption:
    """The option with its decoder on the split that decodes one request fastest, among
    concurrencies that still give it `load_rps` requests/s (unchanged if none is
    faster)."""
    if option.decode is None:
        return option
    cm = ev.cm
    out = max(cm.workload.mean_output_tokens - 1.0, 1e-6)
    best = option
    best_token = option.decode.cycle_s(1)
    for c, split in enumerate(ev.solver.decode(option.decode.layout.devices), start=1):
        if split is None:
            continue
        cycle = split.cycle_s(c)
        if 1.0 / cycle < ev.min_tokens_per_s or c / cycle / out < load_rps:
            continue
        if split.cycle_s(1) < best_token * (1 - 1e-9):
            best_token = split.cycle_s(1)
            best = replace(
                option,
                decode=split,
                concurrency=c,
                decode_tps=c / cycle,
                decode_rps=c / cycle / out,
            )
    return best


def role_candidates(
    options: Sequence[ReplicaOption], load_rps: float, out_tokens: float
) -> list[Assignment]:
    """Up to ROLE_CANDIDATES role assignments that carry `load_rps`, least latency proxy
    first (exact enumeration up to HYBRID_EXACT_MAX replicas, none beyond)."""
    n = len(options)
    if n < 2 or n > HYBRID_EXACT_MAX:
        return []
    mu = np.array([[o.prefill_rps, o.decode_rps, o.mixed_rps] for o in options])
    codes = (np.arange(3**n)[:, None] // 3 ** np.arange(n)[None, :]) % 3
    caps = _hybrid_scores(codes, mu)
    inf = np.inf
    pre = np.array(
        [
            [
                o.prefill.total_s if o.prefill is not None else inf,
                inf,
                o.mixed.total_s if o.mixed is not None else inf,
            ]
            for o in options
        ]
    )
    tok = np.array(
        [
            [
                inf,
                o.decode.cycle_s(1) if o.decode is not None else inf,
                o.mixed.cycle_s(1) if o.mixed is not None else inf,
            ]
            for o in options
        ]
    )
    onehot = codes[:, :, None] == np.arange(3)[None, None, :]
    first = np.where(onehot, pre[None], inf).min(axis=(1, 2))
    per_token = np.where(onehot, tok[None], inf).min(axis=(1, 2))
    proxy = first + out_tokens * per_token
    ok = np.isfinite(caps) & (caps >= load_rps) & np.isfinite(proxy)
    out: list[Assignment] = []
    for j in np.argsort(np.where(ok, proxy, inf), kind="stable")[:ROLE_CANDIDATES]:
        if not ok[j]:
            break
        roles = tuple(_NAMES[int(c)] for c in codes[j])
        p = float(sum(mu[i, 0] for i in range(n) if codes[j][i] == 0))
        d = float(sum(mu[i, 1] for i in range(n) if codes[j][i] == 1))
        m = float(sum(mu[i, 2] for i in range(n) if codes[j][i] == 2))
        out.append(Assignment(roles, 1.0 / float(caps[j]), p, d, m))
    return out


def follow_load(
    ev: Evaluator,
    evaluation: Evaluation,
    build: Callable[[Evaluation], Plan],
    seed: int,
) -> Evaluation:
    """The evaluation to build at this arrival rate (see the module docstring)."""
    from planner.sim.cluster import simulate  # the simulator needs the planner, not back

    cm: CostModel = ev.cm
    w = cm.workload
    capacity = 1.0 / evaluation.assignment.bottleneck_s
    if w.arrival_rate_rps > LOW_LOAD * capacity or len(evaluation.options) < 2:
        return evaluation
    need = w.arrival_rate_rps / HEADROOM
    out = max(w.mean_output_tokens - 1.0, 1e-6)
    share = need / max(1, len(evaluation.options))
    fast = tuple(latency_split(ev, o, share) for o in evaluation.options)
    candidates = [evaluation]
    if any(a is not b for a, b in zip(fast, evaluation.options, strict=True)):
        roles = evaluation.assignment.roles
        candidates.append(replace(evaluation, options=fast, assignment=with_roles(fast, roles)))
    for a in role_candidates(evaluation.options, need, out):
        if a.roles != evaluation.assignment.roles:
            candidates.append(replace(evaluation, assignment=a))
    if len(candidates) == 1:
        return evaluation
    reqs = w.sample_requests(PROBE_REQUESTS, np.random.default_rng([seed, 17]))
    best, best_e2e = evaluation, float("inf")
    for cand in candidates:
        if 1.0 / cand.assignment.bottleneck_s < need:
            continue
        plan = build(cand)
        res = simulate(plan, cm.inventory, cm.model, w, reqs, max_concurrency=cm.max_concurrency)
        e2e = res.summary.e2e.mean
        if res.n_completed == len(reqs) and e2e < best_e2e * (1 - 1e-3):
            best, best_e2e = cand, e2e
    return best


def with_roles(options: Sequence[ReplicaOption], roles: Sequence[str]) -> Assignment:
    """The assignment figures of given roles on given options."""
    p = sum(o.prefill_rps for o, r in zip(options, roles, strict=True) if r == "prefill")
    d = sum(o.decode_rps for o, r in zip(options, roles, strict=True) if r == "decoder")
    m = sum(o.mixed_rps for o, r in zip(options, roles, strict=True) if r == "mixed")
    cap = m + (min(p, d) if p > 0 and d > 0 else 0.0)
    return Assignment(tuple(roles), 1.0 / cap if cap > 0 else float("inf"), p, d, m)
