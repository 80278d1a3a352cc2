"""`make_plan`: inventory + model + workload -> a versioned Plan, by any of the methods."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from planner.baselines import memprop_layout, memprop_option, pipeline_groups, splitwise_groups
from planner.bound import capacity_bound
from planner.costs import WORKSPACE_BUFFERS, CostModel, Layout, decode_cycle, micro_batch
from planner.dp import CONCURRENCY_STEPS, Split
from planner.errors import PlanInfeasible
from planner.inventory import Inventory
from planner.load import follow_load
from planner.methods import METHODS
from planner.model import ModelSpec
from planner.plan import Plan, Replica, Role, Stage, Timing
from planner.roles import Assignment, ReplicaOption, RoleRule, assign_roles, evaluate_layout
from planner.search import Evaluation, Evaluator, search_groups, usable_devices
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
    """Plan replicas, roles, concurrency and layer splits; raises PlanInfeasible.

    Infeasible inputs are recognised before any search (`precheck`), and the message of
    a method that finds nothing quotes the figures of what that method tried.
    """
    if method not in METHODS:
        raise ValueError(f"unknown planning method {method!r} (expected one of {METHODS})")
    if max_concurrency < 1:
        raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
    cm = CostModel(inventory, model, workload, max_concurrency)
    reason = precheck(cm, min_tokens_per_s)
    if reason:
        raise PlanInfeasible(f"{method}: {reason}")
    ev = Evaluator(
        cm, min_tokens_per_s, mixed_only=method == "homogeneous", hybrid=method == "e2llm"
    )
    evaluation, tried = _evaluate(ev, method, seed)
    if not evaluation.assignment.bottleneck_s < float("inf"):
        raise PlanInfeasible(_diagnose(ev, method, tried))

    def build(e: Evaluation) -> Plan:
        return build_plan(cm, e, method=method, version=version, min_tokens_per_s=min_tokens_per_s)

    if method == "e2llm":
        evaluation = follow_load(ev, evaluation, build, seed)
    return build(evaluation)


def _evaluate(ev: Evaluator, method: str, seed: int) -> tuple[Evaluation, list[tuple[int, ...]]]:
    """The method's evaluated grouping and the groups it tried."""
    if method == "splitwise":
        groups = splitwise_groups(ev)
        return ev.evaluate(groups, rule="fastest_prefill"), groups
    if method == "pipeline":
        groups = pipeline_groups(ev)
        return ev.evaluate(groups), groups
    if method == "memprop":
        option = memprop_option(ev.cm, ev.min_tokens_per_s)
        used = set(option.devices)
        idle = tuple(d for d in range(len(ev.cm.inventory)) if d not in used)
        return Evaluation((option,), idle, assign_roles([option])), [option.devices]
    extra = [] if method == "homogeneous" else [splitwise_groups(ev)]
    groups = search_groups(ev, random.Random(seed), extra_seeds=extra)
    return ev.evaluate_sets(groups, thorough=True), groups


def precheck(cm: CostModel, min_tokens_per_s: float) -> str:
    """Why no plan can exist, found without searching ("" when a search is worth it):
    memory sums, the largest indivisible piece against the largest device, and the speed
    floor against the fastest any single request could decode."""
    m = cm.model
    n = len(cm.inventory)
    kv = m.request_kv_bytes(cm.peak_context_tokens)
    need = m.total_param_bytes + kv
    have = float(cm.capacity.sum())
    if have < need:
        return (
            f"the model needs {need / _MB:.0f} MB ({m.total_param_bytes / _MB:.0f} MB of weights "
            f"+ {kv / _MB:.0f} MB of KV cache for one request of {cm.peak_context_tokens:.0f} "
            f"tokens) but all {n} devices together have {have / _MB:.0f} MB: short by "
            f"{(need - have) / _MB:.0f} MB"
        )
    usable = usable_devices(cm)
    stage_extra = cm.workspace_bytes(cm.peak_prompt_tokens) + cm.least_layer_kv_bytes(
        cm.peak_context_tokens
    )
    if not usable:
        piece = min(m.layer_param_bytes) + stage_extra
        return (
            f"no device can hold one layer with its workspace and KV ({piece / _MB:.0f} MB); "
            f"the largest has {float(cm.capacity.max()) / _MB:.0f} MB"
        )
    have_usable = sum(float(cm.capacity[d]) for d in usable)
    if have_usable < need:
        return (
            f"the {len(usable)} devices that can hold a layer have {have_usable / _MB:.0f} MB "
            f"together, the model needs {need / _MB:.0f} MB with one request's KV: short by "
            f"{(need - have_usable) / _MB:.0f} MB"
        )
    layer = min(m.layer_param_bytes) + stage_extra
    biggest = max(float(cm.capacity[d]) for d in usable)
    head = m.head_param_bytes + layer
    embed = m.embed_param_bytes + layer
    if head > biggest or (not m.tie_word_embeddings and embed > biggest):
        piece = max(head, embed if not m.tie_word_embeddings else 0.0)
        return (
            f"no device can hold the embedding or head with one layer ({piece / _MB:.0f} MB); "
            f"the largest device has {biggest / _MB:.0f} MB: short by "
            f"{(piece - biggest) / _MB:.0f} MB"
        )
    per_layer = np.min(np.stack([cm.decode_layers(d, 1) for d in usable]), axis=0)
    edges = min(cm.head_s(d, True, 1) for d in usable) + min(cm.embed_s(d, 1) for d in usable)
    fastest = float(per_layer.sum()) + edges
    if 1.0 / fastest < min_tokens_per_s:
        return (
            f"no replica can decode at >= {min_tokens_per_s:g} tokens/s per request: even with "
            f"every layer on the device fastest at it and no transfer at all, a token takes "
            f"{fastest * 1000:.0f} ms ({1.0 / fastest:.2f} tokens/s); lower min_tokens_per_s "
            f"or add faster devices"
        )
    return ""


def _why(ev: Evaluator, group: tuple[int, ...]) -> str:
    """What stops one group: memory, or its speed against the floor."""
    cm = ev.cm
    names = ", ".join(cm.inventory.devices[d].id for d in group)
    mem = sum(float(cm.capacity[d]) for d in group)
    need = cm.model.total_param_bytes + cm.model.request_kv_bytes(cm.peak_context_tokens)
    if mem < need:
        return f"[{names}] has {mem / _MB:.0f} MB for {need / _MB:.0f} MB"
    one = ev.solver.decode(group)[0]
    if one is None:
        return f"[{names}] cannot split the layers to fit each device's memory"
    return f"[{names}] decodes at {1.0 / one.cycle_s(1):.2f} tokens/s for one request"


def _diagnose(ev: Evaluator, method: str, tried: Sequence[tuple[int, ...]]) -> str:
    """Why the method found nothing, with the figures of the groups it actually tried."""
    floor = f"{ev.min_tokens_per_s:g} tokens/s"
    if method == "memprop" and tried:
        lay = memprop_layout(ev.cm)
        mem = ev.cm.stage_memory(
            lay, kv_tokens=ev.cm.decode_kv_tokens(1), pass_tokens=ev.cm.peak_prompt_tokens
        )
        over = [
            (ev.cm.inventory.devices[d].id, m, float(ev.cm.capacity[d]))
            for m, d in zip(mem, lay.devices, strict=True)
            if m > ev.cm.capacity[d]
        ]
        if over:
            dev, m, cap = over[0]
            return (
                f"memprop: its memory-proportional ring puts {m / _MB:.0f} MB on {dev!r}, "
                f"which has {cap / _MB:.0f} MB"
            )
        st = ev.cm.stage_times(lay, decode=True, tokens=1)
        return (
            f"memprop: its memory-proportional ring over {len(lay.devices)} devices decodes "
            f"at {1.0 / sum(st):.2f} tokens/s for one request (floor {floor})"
        )
    if not tried:
        return f"{method}: no device can hold a layer"
    shown = "; ".join(_why(ev, g) for g in tried[:6])
    more = f" (+{len(tried) - 6} more)" if len(tried) > 6 else ""
    return f"{method}: no replica it formed can serve at >= {floor}: {shown}{more}"


def _split_for(option: ReplicaOption, role: str) -> tuple[Split, int]:
    split = {"prefill": option.prefill, "decoder": option.decode, "mixed": option.mixed}[role]
    conc = {"prefill": 1, "decoder": option.concurrency, "mixed": option.mixed_concurrency}[role]
    assert split is not None, f"role {role} chosen for a replica that cannot play it"
    return split, conc


def build_plan(
    cm: CostModel,
    evaluation: Evaluation,
    *,
    method: str,
    version: int,
    min_tokens_per_s: float,
    replica_ids: Sequence[int] | None = None,
) -> Plan:
    """Turn an evaluated grouping into a Plan with per-stage predictions. Replicas are
    numbered prefill first, then mixed, then decoders, unless `replica_ids` (one per
    option, in order) keeps the ids of a plan being re-roled."""
    inv = cm.inventory
    order = {"prefill": 0, "mixed": 1, "decoder": 2}
    triples = list(
        zip(
            evaluation.assignment.roles,
            evaluation.options,
            replica_ids if replica_ids is not None else range(len(evaluation.options)),
            strict=True,
        )
    )
    if replica_ids is None:
        triples.sort(key=lambda t: order[t[0]])
        triples = [(role, o, i) for i, (role, o, _) in enumerate(triples)]
    replicas = []
    for role, option, rid in triples:
        split, conc = _split_for(option, role)
        lay = split.layout
        prefill_s = cm.stage_times(
            lay, decode=False, tokens=cm.prompt_tokens, kv_out=role == "prefill"
        )
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
        replicas.append(Replica(rid, r_role, conc, stages, timing_for(cm, lay, r_role, conc)))
    predicted = _predicted(cm, evaluation.assignment, evaluation.idle, min_tokens_per_s)
    return Plan(
        version, method, cm.n_layers, sorted(replicas, key=lambda r: r.replica_id), predicted
    )


def reassign(
    plan: Plan,
    inventory: Inventory,
    model: ModelSpec,
    workload: Workload,
    *,
    min_tokens_per_s: float = 15.0,
    max_concurrency: int = 16,
    rule: RoleRule = "hybrid",
) -> Plan:
    """The best roles and concurrency for `workload` on `plan`'s layouts, unchanged: every
    device keeps its layers (nothing reloads); replica ids are kept. Raises
    PlanInfeasible when the layouts cannot serve this workload in any roles."""
    cm = CostModel(inventory, model, workload, max_concurrency)
    ladder = [c for c in CONCURRENCY_STEPS if c <= max_concurrency] or [max_concurrency]
    options = []
    for r in plan.replicas:
        devices = tuple(inventory.index(s.device_id) for s in r.stages)
        bounds = tuple([s.layer_start for s in r.stages] + [r.stages[-1].layer_end])
        lay = Layout(devices, bounds, r.embed_last)
        options.append(
            evaluate_layout(cm, lay, min_tokens_per_s=min_tokens_per_s, concurrencies=ladder)
        )
    assignment = assign_roles(options, rule if len(options) > 1 else "balanced")
    if not assignment.bottleneck_s < float("inf"):
        raise PlanInfeasible(
            f"{plan.method}: the layouts of plan v{plan.version} cannot serve prompts of "
            f"{workload.mean_prompt_tokens:.0f} / outputs of {workload.mean_output_tokens:.0f} "
            f"tokens in any roles"
        )
    evaluation = Evaluation(tuple(options), (), assignment)
    return build_plan(
        cm,
        evaluation,
        method=plan.method,
        version=plan.version + 1,
        min_tokens_per_s=min_tokens_per_s,
        replica_ids=[r.replica_id for r in plan.replicas],
    )


PREFILL_GRID = tuple(2**i for i in range(4, 15))
"""Prompt lengths (16..16384) at which a plan lists each stage's predicted prefill time."""


def with_timings(plan: Plan, inventory: Inventory, model: ModelSpec, workload: Workload) -> Plan:
    """`plan` with the routing predictions (`Timing`) this cost model makes for every
    replica that has none: a plan written by hand, or by an older planner, would otherwise
    be routed with no KV budget at all."""
    if all(r.timing is not None for r in plan.replicas):
        return plan
    cm = CostModel(inventory, model, workload, max(r.concurrency for r in plan.replicas))
    replicas = []
    for r in plan.replicas:
        if r.timing is None:
            lay = Layout(
                tuple(inventory.index(s.device_id) for s in r.stages),
                tuple([s.layer_start for s in r.stages] + [r.stages[-1].layer_end]),
                r.embed_last,
            )
            r = dataclasses.replace(r, timing=timing_for(cm, lay, r.role, r.concurrency))
        replicas.append(r)
    return dataclasses.replace(plan, replicas=replicas)


def timing_for(cm: CostModel, lay: Layout, role: str, concurrency: int) -> Timing:
    """What a router needs to know of a replica (see `planner.plan.Timing`)."""
    k = len(lay.devices)
    m = cm.model
    pass_tokens = cm.pass_tokens(role, concurrency, k)
    per_token = max(
        WORKSPACE_BUFFERS
        * m.activation_bytes_per_token
        / cm.kv_bytes(lay.bounds[i], lay.bounds[i + 1])
        for i in range(k)
    )
    return Timing(
        prefill_tokens=PREFILL_GRID,
        prefill_stage_s=tuple(
            tuple(cm.stage_times(lay, decode=False, tokens=t, kv_out=role == "prefill"))
            for t in PREFILL_GRID
        ),
        decode_cycle_s=tuple(
            decode_cycle(cm.stage_times(lay, decode=True, tokens=micro_batch(n, k)), n)
            for n in range(1, concurrency + 1)
        ),
        kv_budget_tokens=max(1.0, cm.kv_budget_tokens(lay, pass_tokens)),
        kv_out_s_per_token=cm.kv_link_s(lay, 1000.0) / 1000.0,
        pass_tokens=pass_tokens,
        workspace_kv_per_token=per_token,
    )


def _predicted(cm: CostModel, a: Assignment, idle: Sequence[int], floor: float) -> dict[str, Any]:
    w = cm.workload
    b = a.bottleneck_s
    served = min(w.arrival_rate_rps, 1.0 / b)
    if all(r == "mixed" for r in a.roles):
        phase = "mixed"
    else:
        phase = "prefill" if a.prefill_rps <= a.decode_rps else "decode"
    bound = capacity_bound(cm, floor).capacity_rps
    return {
        "bottleneck_s": b,
        "bottleneck_phase": phase,
        "capacity_rps": 1.0 / b,
        "capacity_bound_rps": bound,
        "gap_to_bound": 1.0 - (1.0 / b) / bound if bound > 0 else 0.0,
        "prefill_capacity_rps": a.prefill_rps,
        "decode_capacity_rps": a.decode_rps,
        "mixed_capacity_rps": a.mixed_rps,
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
