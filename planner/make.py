"""`make_plan`: inventory + model + workload -> a versioned Plan, by any of the methods."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from planner.baselines import memprop_option, pipeline_groups, splitwise_groups
from planner.costs import CostModel, micro_batch
from planner.dp import Split
from planner.errors import PlanInfeasible
from planner.inventory import Inventory
from planner.methods import METHODS
from planner.model import ModelSpec
from planner.plan import Plan, Replica, Role, Stage
from planner.roles import Assignment, ReplicaOption, assign_roles
from planner.search import Evaluation, Evaluator, e2llm_groups
from planner.workload import Workload

_MB = 1e6


def make_plan(
    inventory: Inventory,
    model: ModelSpec,
    workload: Workload,
    *,
    method: str = "e2llm",
    seed: int = 0,
    version: int = 1,
    min_tokens_per_s: float = 15.0,
    max_concurrency: int = 16,
) -> Plan:
    """Plan replicas, roles, concurrency and layer splits; raises PlanInfeasible."""
    if method not in METHODS:
        raise ValueError(f"unknown planning method {method!r} (expected one of {METHODS})")
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    cm = CostModel(inventory, model, workload, max_concurrency)
    ev = Evaluator(cm, min_tokens_per_s)
    evaluation = _evaluate(ev, method, seed)
    if not evaluation.assignment.bottleneck_s < float("inf"):
        raise PlanInfeasible(_diagnose(ev, method))
    return build_plan(
        cm, evaluation, method=method, version=version, min_tokens_per_s=min_tokens_per_s
    )


def _evaluate(ev: Evaluator, method: str, seed: int) -> Evaluation:
    if method == "e2llm":
        return ev.evaluate(e2llm_groups(ev, random.Random(seed)))
    if method == "splitwise":
        return ev.evaluate(splitwise_groups(ev), rule="fastest_prefill")
    if method == "pipeline":
        return ev.evaluate(pipeline_groups(ev))
    option = memprop_option(ev.cm, ev.min_tokens_per_s)
    used = set(option.devices)
    idle = tuple(d for d in range(len(ev.cm.inventory)) if d not in used)
    return Evaluation((option,), idle, assign_roles([option]))


def _split_for(option: ReplicaOption, role: str) -> tuple[Split, int]:
    split = {"prefill": option.prefill, "decoder": option.decode, "mixed": option.mixed}[role]
    conc = {"prefill": 1, "decoder": option.concurrency, "mixed": option.mixed_concurrency}[role]
    assert split is not None, f"role {role} chosen for a replica that cannot play it"
    return split, conc


def build_plan(
    cm: CostModel, evaluation: Evaluation, *, method: str, version: int, min_tokens_per_s: float
) -> Plan:
    """Turn an evaluated grouping into a Plan with per-stage predictions."""
    inv = cm.inventory
    order = {"prefill": 0, "mixed": 1, "decoder": 2}
    pairs = sorted(
        zip(evaluation.assignment.roles, evaluation.options, strict=True), key=lambda p: order[p[0]]
    )
    replicas = []
    for rid, (role, option) in enumerate(pairs):
        split, conc = _split_for(option, role)
        lay = split.layout
        prefill_s = cm.stage_times(lay, decode=False, tokens=cm.prompt_tokens)
        decode_s = cm.stage_times(lay, decode=True, tokens=micro_batch(conc, len(lay.devices)))
        stages = [
            Stage(
                device_id=inv.devices[d].id,
                layer_start=lay.bounds[i],
                layer_end=lay.bounds[i + 1],
                embed=lay.embed_on(i),
                head=lay.head_on(i),
                predicted_prefill_s=prefill_s[i],
                predicted_decode_s=decode_s[i],
            )
            for i, d in enumerate(lay.devices)
        ]
        r_role: Role = (
            "prefill" if role == "prefill" else "decoder" if role == "decoder" else "mixed"
        )
        replicas.append(Replica(rid, r_role, conc, stages))
    predicted = _predicted(cm, evaluation.assignment, evaluation.idle, min_tokens_per_s)
    return Plan(version, method, cm.n_layers, replicas, predicted)


def _predicted(cm: CostModel, a: Assignment, idle: Sequence[int], floor: float) -> dict[str, Any]:
    w = cm.workload
    b = a.bottleneck_s
    served = min(w.arrival_rate_rps, 1.0 / b)
    if a.roles == ("mixed",):
        phase = "mixed"
    else:
        phase = "prefill" if a.prefill_rps <= a.decode_rps else "decode"
    return {
        "bottleneck_s": b,
        "bottleneck_phase": phase,
        "capacity_rps": 1.0 / b,
        "prefill_capacity_rps": a.prefill_rps,
        "decode_capacity_rps": a.decode_rps,
        "arrival_interval_s": w.arrival_interval_s,
        "excess_s": max(0.0, b - w.arrival_interval_s),
        "utilisation": w.arrival_rate_rps * b,
        "throughput_rps": served,
        "throughput_tokens_per_s": served * w.mean_output_tokens,
        "mean_prompt_tokens": float(w.mean_prompt_tokens),
        "mean_output_tokens": float(w.mean_output_tokens),
        "min_tokens_per_s": float(floor),
        "idle_devices": [cm.inventory.devices[d].id for d in idle],
    }


def _diagnose(ev: Evaluator, method: str) -> str:
    """Say why nothing can serve: total memory, per-device memory, or speed floor."""
    cm = ev.cm
    m = cm.model
    w = cm.workload
    n = len(cm.inventory)
    kv = w.mean_context_tokens * m.kv_bytes_per_token_per_layer * m.n_layers
    need = m.total_param_bytes + kv
    have = float(cm.capacity.sum())
    if have < need:
        return (
            f"{method}: the model needs {need / _MB:.0f} MB ({m.total_param_bytes / _MB:.0f} MB "
            f"of weights + {kv / _MB:.0f} MB of KV cache for one request of "
            f"{w.mean_context_tokens:.0f} tokens) but all {n} devices together have "
            f"{have / _MB:.0f} MB: short by {(need - have) / _MB:.0f} MB"
        )
    everything = tuple(range(n))
    whole = ev.option(everything, with_mixed=True)
    if not whole.feasible:
        biggest = float(cm.capacity.max())
        edge = max(m.embed_param_bytes, m.head_param_bytes) + min(m.layer_param_bytes)
        if edge > biggest:
            return (
                f"{method}: no device can hold the embedding or head with one layer "
                f"({edge / _MB:.0f} MB); the largest device has {biggest / _MB:.0f} MB: "
                f"short by {(edge - biggest) / _MB:.0f} MB"
            )
        return (
            f"{method}: devices have {have / _MB:.0f} MB in total for {need / _MB:.0f} MB, "
            f"but no split into whole layers per device fits (every device of a replica "
            f"needs at least one of the {m.n_layers} layers; layers of "
            f"{max(m.layer_param_bytes) / _MB:.0f} MB, KV {kv / _MB:.0f} MB per request)"
        )
    one = ev.solver.decode(everything)[0]
    speed = 1.0 / one.cycle_s(1) if one is not None else 0.0
    return (
        f"{method}: the devices can hold the model but no replica it could form decodes at "
        f">= {ev.min_tokens_per_s:g} tokens/s per request (one pipeline over all devices "
        f"reaches {speed:.1f} tokens/s for a single request); lower min_tokens_per_s or "
        f"add faster devices"
    )
