"""An upper bound on the capacity any plan can reach: a linear relaxation over compute,
memory and links (in the spirit of Helix's max-flow formulation).

Each device may hold any number of layers l (1..L) in any role, and may split its time
between several such configurations (the relaxation: a real plan gives each device one):

- PREFILL with l layers: x requests/s cost x * l * t_prefill (its fastest layer at the
  mean prompt) of device time and x * (latency + KV bytes of l layers / bandwidth) of
  its uplink (the prompt's KV leaves); they cover l layer-prefills each.
- DECODER with l layers at micro-batch b: y tokens/s cost y * (l * t_decode(b) + h) / b
  of device time, where h is its inbound hop (its own link's one-way time for b
  tokens' activations; none when it holds every layer), and y / (output - 1) requests'
  KV on its downlink; they cover l layer-tokens each. Only (l, b) whose memory holds l
  layers with the KV of b mean contexts (and of the longest context) and whose stage
  (with its hop) meets the speed floor exist.
- MIXED with l layers at micro-batch b: z requests/s cost z * l * (t_prefill +
  (output - 1) * t_decode(b) / b), no KV transfer; they cover both.

Maximise lambda subject to layer-prefill and layer-token coverage of lambda requests/s,
device time <= 1 and link time <= 1 per direction. Every plan the planner can build maps
to a feasible point (stage times include these costs plus hops and edges; a decoder of
concurrency c with m micro-batches of b spends at least l * t_decode(b) / b per token;
its memory holds at least b mean contexts), so its predicted capacity is at most the
bound. Embedding and head are left out (a smaller cost keeps it an upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.sparse import coo_matrix

from planner.costs import CostModel


@dataclass(frozen=True)
class Bound:
    """The relaxation's optimum."""

    capacity_rps: float
    """No plan serves more requests/s than this (0: nothing can serve)."""
    prefill_share: float
    """Fraction of the optimum's device time spent prefilling (where capacity goes)."""
    binding: str
    """What limits the optimum: compute, links, or (with neither) memory/speed floor."""


def capacity_bound(cm: CostModel, min_tokens_per_s: float) -> Bound:
    """Solve the relaxation (a few thousand variables; HiGHS)."""
    m = cm.model
    L = m.n_layers
    n = len(cm.inventory)
    out = max(cm.workload.mean_output_tokens - 1.0, 1e-6)
    prompt = cm.prompt_tokens
    # the least KV a layer takes (a sliding-window layer's, where the model has them): a
    # relaxation may be optimistic, never pessimistic
    kv_token = float(cm.kv_layer.min())
    kv_prompt = min(m.request_kv_bytes(prompt, i, i + 1) for i in range(L))
    act = m.activation_bytes_per_token
    w_layer = min(m.layer_param_bytes)
    mean_ctx = cm.workload.mean_context_tokens
    cycle_cap = 1.0 / min_tokens_per_s
    batches = np.arange(1, cm.max_concurrency + 1)

    cols: list[tuple[str, int, int]] = []
    cost_dev: list[float] = []
    cost_up: list[float] = []
    cost_down: list[float] = []
    cov_p: list[float] = []
    cov_d: list[float] = []
    for d in range(n):
        cap = float(cm.capacity[d])
        link = cm.links[d]
        tp = float(cm.prefill_layers(d, prompt).min())
        td = np.array([float(cm.decode_layers(d, int(b)).min()) for b in batches])
        for ell in range(1, L + 1):
            kv_out = link.one_way_s(kv_prompt * ell)
            # PREFILL
            if (
                ell * (w_layer + cm.peak_prompt_tokens * kv_token)
                + cm.workspace_bytes(cm.peak_prompt_tokens)
                <= cap
            ):
                cols.append(("prefill", d, ell))
                cost_dev.append(ell * tp)
                cost_up.append(kv_out)
                cost_down.append(0.0)
                cov_p.append(ell)
                cov_d.append(0.0)
            # DECODER and MIXED: the cheapest micro-batch that fits and meets the floor; a
            # stage that does not hold every layer pays at least its own inbound hop
            hop = (
                np.array([link.one_way_s(float(b) * act) for b in batches])
                if ell < L
                else np.zeros(len(batches))
            )
            for role in ("decoder", "mixed"):
                work = np.maximum(batches, cm.peak_prompt_tokens) if role == "mixed" else batches
                mem = ell * (
                    w_layer + np.maximum(batches * mean_ctx, cm.peak_context_tokens) * kv_token
                ) + np.array([cm.workspace_bytes(float(x)) for x in work])
                ok = (mem <= cap) & (ell * td + hop <= cycle_cap)
                if not ok.any():
                    continue
                per_token = np.where(ok, (ell * td + hop) / batches, np.inf)
                best = float(per_token.min())
                cols.append((role, d, ell))
                if role == "decoder":
                    cost_dev.append(best)
                    cost_up.append(0.0)
                    cost_down.append(kv_out / out)
                    cov_p.append(0.0)
                    cov_d.append(ell)
                else:
                    cost_dev.append(ell * tp + out * best)
                    cost_up.append(0.0)
                    cost_down.append(0.0)
                    cov_p.append(ell)
                    cov_d.append(ell * out)
    if not cols:
        return Bound(0.0, 0.0, "memory")
    k = len(cols)
    lam = k  # the last variable is lambda
    rows, cidx, vals = [], [], []
    rhs: list[float] = []
    kinds: list[str] = []
    r = 0
    # coverage: L * lambda - sum(cov_p * x) <= 0 ; L * out * lambda - sum(cov_d * x) <= 0
    for cov, scale in ((cov_p, 1.0), (cov_d, out)):
        for j, c in enumerate(cov):
            if c:
                rows.append(r)
                cidx.append(j)
                vals.append(-c)
        rows.append(r)
        cidx.append(lam)
        vals.append(L * scale)
        rhs.append(0.0)
        kinds.append("coverage")
        r += 1
    # per device: compute, uplink, downlink time <= 1
    for kind, costs in (("compute", cost_dev), ("links", cost_up), ("links", cost_down)):
        by_dev: dict[int, list[int]] = {}
        for j, (_, d, _) in enumerate(cols):
            if costs[j] > 0:
                by_dev.setdefault(d, []).append(j)
        for js in by_dev.values():
            for j in js:
                rows.append(r)
                cidx.append(j)
                vals.append(costs[j])
            rhs.append(1.0)
            kinds.append(kind)
            r += 1
    a = coo_matrix((vals, (rows, cidx)), shape=(r, k + 1)).tocsr()
    objective = np.zeros(k + 1)
    objective[lam] = -1.0
    res = linprog(objective, A_ub=a, b_ub=np.array(rhs), bounds=(0, None), method="highs")
    if res.status != 0:
        raise RuntimeError(f"capacity bound: the LP solver failed ({res.message})")
    x = res.x
    capacity = float(x[lam])
    dev_time = np.array(cost_dev) * x[:k]
    pre_time = sum(
        (ell * float(cm.prefill_layers(d, prompt).min()) * x[j])
        for j, (role, d, ell) in enumerate(cols)
        if role in ("prefill", "mixed")
    )
    share = float(pre_time / dev_time.sum()) if dev_time.sum() > 0 else 0.0
    duals = np.abs(np.asarray(res.ineqlin.marginals))
    by_kind = {
        kind: float(duals[[i for i, k in enumerate(kinds) if k == kind]].sum())
        for kind in set(kinds)
    }
    binding = "links" if by_kind.get("links", 0.0) > by_kind.get("compute", 0.0) else "compute"
    return Bound(capacity, share, binding)
