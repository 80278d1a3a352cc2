"""The baselines E2LLM is compared with, each a fair reading of the system it stands for.

- **splitwise** (Patel et al., ISCA 2024) adapted to the edge. Splitwise provisions
  whole machines that each hold the model and splits them into a prompt pool and a token
  pool, putting prompts on the fastest hardware. On the edge no single device holds the
  model, so replicas are formed the way an operator would without a search: devices
  from fastest to slowest, each replica closed as soon as it can hold the model (a tail
  that cannot joins the last replica). It gets the same exact DP layer split and the
  same per-request speed floor and concurrency choice as E2LLM (so only grouping, role
  rule and routing differ); roles follow Splitwise's rule (the fastest replicas at
  prefill form the prompt pool, only the pool size is optimised), and routing is
  Splitwise's JSQ by number of outstanding requests (see `planner.sim`).
- **pipeline** (EdgeShard-like, Zhang et al. 2024): one pipeline, the layer split by the
  same DP (EdgeShard also splits by DP), over the devices EdgeShard's DP would pick: the
  best of the fastest-first prefixes of the devices in a few natural orders; no
  replication, so it prefills and decodes on the same pipeline (mixed).
- **memprop** (exo / llama.cpp RPC): one ring over all devices ordered by memory, layers
  split in proportion to each device's memory (exo's default partitioning strategy,
  llama.cpp's `--tensor-split` by free memory), embedding on the first device, head on
  the last; mixed role, the largest concurrency that fits memory and meets the floor.
- **homogeneous**: the best replicas without roles: E2LLM's own search, every replica
  MIXED (it prefills and decodes its own requests), so the gain from roles shows alone.

Every baseline leaves out devices that cannot hold one layer with what a stage needs
(`planner.search.usable_devices`), as an operator would, instead of failing on them.
"""

from __future__ import annotations

from planner.costs import CostModel, Layout
from planner.dp import Split
from planner.roles import ReplicaOption, best_mixed
from planner.search import Evaluator, groups_of, memory_order, speed_order, usable_devices


def splitwise_groups(ev: Evaluator) -> list[tuple[int, ...]]:
    """Greedy replicas: fastest devices first, each closed once it can hold the model."""
    order = speed_order(ev.cm, usable_devices(ev.cm))
    return [ev.best_order(g).devices for g in groups_of(order, ev.greedy_sizes(order))]


def pipeline_groups(ev: Evaluator) -> list[tuple[int, ...]]:
    """One pipeline over the devices EdgeShard would pick (see the module docstring)."""
    usable = usable_devices(ev.cm)
    speed, mem = speed_order(ev.cm, usable), memory_order(ev.cm, usable)
    candidates: list[tuple[int, ...]] = []
    for order in (speed, mem):
        for k in range(1, min(len(order), ev.cm.n_layers) + 1):
            candidates += ev.canonical_orders(order[:k])
    if not candidates:
        return []
    return [max(candidates, key=lambda g: ev.option(g, with_mixed=True).mixed_rps)]


def memprop_layout(cm: CostModel) -> Layout:
    """All usable devices by memory, layers in proportion to memory (largest remainder).

    A device whose share rounds to no layer is left out, as exo and llama.cpp do.
    """
    order = memory_order(cm, usable_devices(cm))
    L = cm.n_layers
    mem = [float(cm.capacity[d]) for d in order]
    total = sum(mem)
    exact = [L * m / total for m in mem]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(order)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: L - sum(counts)]:
        counts[i] += 1
    devices = tuple(d for d, c in zip(order, counts, strict=True) if c > 0)
    bounds = [0]
    for c in counts:
        if c > 0:
            bounds.append(bounds[-1] + c)
    return Layout(devices, tuple(bounds), embed_last=False)


def memprop_option(cm: CostModel, min_tokens_per_s: float) -> ReplicaOption:
    """The memory-proportional ring as a mixed replica (no DP: the split is fixed)."""
    layout = memprop_layout(cm)
    k = len(layout.devices)
    splits: list[Split | None] = []
    for c in range(1, cm.max_concurrency + 1):
        b = -(-c // min(k, c))
        mem = cm.stage_memory(
            layout, kv_tokens=cm.decode_kv_tokens(c), pass_tokens=max(b, cm.peak_prompt_tokens)
        )
        if any(m > cm.capacity[d] for m, d in zip(mem, layout.devices, strict=True)):
            splits.append(None)
            continue
        splits.append(Split(layout, tuple(cm.stage_times(layout, decode=True, tokens=b))))
    decode_tokens = max(cm.workload.mean_output_tokens - 1.0, 1e-6)
    mixed, conc, rps = best_mixed(cm, splits, min_tokens_per_s, decode_tokens)
    return ReplicaOption(layout.devices, None, 0.0, None, 1, 0.0, 0.0, mixed, conc, rps)
