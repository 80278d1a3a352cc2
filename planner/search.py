"""Evaluating groupings (cached per ordered device group) and the E2LLM GA search."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from planner.costs import CostModel
from planner.dp import SplitSolver
from planner.ga import GAConfig, run_ga
from planner.roles import Assignment, ReplicaOption, RoleRule, assign_roles, evaluate_group

INFEASIBLE = 1e12
"""Fitness floor of groupings that cannot serve; minus a bonus for devices put to use."""


def groups_of(perm: Sequence[int], sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """Replica device groups encoded by a chromosome."""
    out, at = [], 0
    for s in sizes:
        out.append(tuple(perm[at : at + s]))
        at += s
    return out


@dataclass(frozen=True)
class Evaluation:
    """A grouping with its roles."""

    options: tuple[ReplicaOption, ...]
    """Replicas that can serve, in grouping order."""
    idle: tuple[int, ...]
    """Devices in groups that cannot hold the model."""
    assignment: Assignment
    """Roles and predicted capacities."""
    min_replicas: int = 1
    """Fewer serving replicas than this count as unservable (see `Evaluator`)."""

    @property
    def fitness(self) -> float:
        """The GA's objective (seconds per request; huge when it cannot serve)."""
        b = self.assignment.bottleneck_s
        if b < float("inf") and len(self.options) >= self.min_replicas:
            return b
        used = sum(len(o.devices) for o in self.options)
        return INFEASIBLE - used


class Evaluator:
    """Scores groupings on one cost model; remembers every group it has solved."""

    def __init__(self, cm: CostModel, min_tokens_per_s: float) -> None:
        self.min_replicas = 1
        """2 once a grouping with two serving replicas is known: the paper's method
        disaggregates prefill and decode whenever the devices allow it, and a single
        mixed replica is the degraded fallback."""
        self.cm = cm
        self.solver = SplitSolver(cm)
        self.min_tokens_per_s = min_tokens_per_s
        self._plain: dict[tuple[int, ...], ReplicaOption] = {}
        self._mixed: dict[tuple[int, ...], ReplicaOption] = {}

    def option(self, devices: tuple[int, ...], *, with_mixed: bool = False) -> ReplicaOption:
        """Best configuration of one ordered group in every role."""
        cache = self._mixed if with_mixed else self._plain
        if devices not in cache:
            cache[devices] = evaluate_group(
                self.solver, devices, min_tokens_per_s=self.min_tokens_per_s, with_mixed=with_mixed
            )
        return cache[devices]

    def holds(self, devices: tuple[int, ...]) -> bool:
        """The group can hold the model in some role."""
        return self.option(devices).feasible

    def evaluate(
        self, groups: Sequence[tuple[int, ...]], rule: RoleRule = "balanced"
    ) -> Evaluation:
        """Roles and capacities of a grouping (unservable groups stay idle)."""
        options: list[ReplicaOption] = []
        idle: list[int] = []
        for g in groups:
            o = self.option(g)
            if o.feasible:
                options.append(o)
            else:
                idle.extend(g)
        if len(options) == 1:
            options = [self.option(options[0].devices, with_mixed=True)]
        return Evaluation(
            tuple(options), tuple(idle), assign_roles(options, rule), self.min_replicas
        )

    def fitness(self, perm: Sequence[int], sizes: Sequence[int]) -> float:
        """GA fitness of a chromosome."""
        return self.evaluate(groups_of(perm, sizes)).fitness

    def greedy_sizes(self, perm: Sequence[int]) -> list[int]:
        """Cut a device order into the shortest prefixes that can each hold the model.

        A tail that cannot hold it alone joins the last replica.
        """
        sizes: list[int] = []
        start = 0
        for end in range(1, len(perm) + 1):
            if self.holds(tuple(perm[start:end])):
                sizes.append(end - start)
                start = end
        if start < len(perm):
            if sizes:
                sizes[-1] += len(perm) - start
            else:
                sizes.append(len(perm) - start)
        return sizes


def speed_order(cm: CostModel) -> list[int]:
    """Devices from fastest to slowest at prefill (ties: inventory order)."""
    t = [float(cm.prefill_layers(d, cm.prompt_tokens).sum()) for d in range(len(cm.inventory))]
    return sorted(range(len(t)), key=lambda d: (t[d], d))


def memory_order(cm: CostModel) -> list[int]:
    """Devices from most to least memory (ties: inventory order)."""
    return sorted(range(len(cm.inventory)), key=lambda d: (-cm.capacity[d], d))


def ga_config_for(n: int) -> GAConfig:
    """A search budget that grows gently with the number of devices."""
    if n <= 8:
        return GAConfig(population=40, generations=60, patience=20, elite=3)
    if n <= 20:
        return GAConfig(population=100, generations=200, patience=50, elite=4)
    return GAConfig(population=120, generations=300, patience=60, elite=6)


def e2llm_groups(
    ev: Evaluator, rng: random.Random, config: GAConfig | None = None
) -> list[tuple[int, ...]]:
    """The E2LLM grouping: GA over (permutation, sizes), seeded with greedy groupings."""
    n = len(ev.cm.inventory)
    orders = [speed_order(ev.cm), memory_order(ev.cm)]
    by_mem = memory_order(ev.cm)
    interleaved = [x for pair in zip(by_mem, reversed(by_mem), strict=True) for x in pair]
    orders.append(list(dict.fromkeys(interleaved)))
    for _ in range(4):
        perm = list(range(n))
        rng.shuffle(perm)
        orders.append(perm)
    seeds = [(o, ev.greedy_sizes(o)) for o in orders]
    if any(len(ev.evaluate(groups_of(p, s)).options) >= 2 for p, s in seeds):
        ev.min_replicas = 2
    seeds += [(o, [n]) for o in orders[:2]]
    perm, sizes, _ = run_ga(n, ev.fitness, rng, config or ga_config_for(n), seeds)
    return groups_of(perm, sizes)
