"""Finding the grouping: which devices form each replica, and in which pipeline order.

The search is over *partitions* of the devices (unordered groups); a group is scored in a
few canonical pipeline orders (largest memory last, where the head lives; second largest
first for the embedding; the device on the slowest link first, where decode's inbound
hop carries only token ids), keeping the best. Groups that cannot hold the model stay
idle. It runs, all with budgets counted in evaluations (the planner reads no clock):

1. **Seeds** from heuristics: every baseline's grouping (so E2LLM is never predicted
   below a baseline's plan), greedy cuts of the devices by speed, by memory and
   interleaved, and memory-balanced bins for every plausible replica count.
2. **Local search** from each seed (first improvement, deterministic order): move a
   device to another group or out, swap two devices, merge two groups, split one.
3. **The GA** (the paper's encoding, `planner.ga`), seeded with the local optima, adds
   diversity from the caller's random generator; its best is polished by local search.
4. **Orders**: the final groups are scored in every pipeline order (up to 4 devices,
   else the canonical ones), each role taking its best, since links make order matter.

The result does not depend on the seed unless the GA finds better than the deterministic
local optima, which is what makes runs with different seeds agree.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from planner.costs import CostModel
from planner.dp import SplitSolver
from planner.ga import GAConfig, run_ga
from planner.roles import Assignment, ReplicaOption, RoleRule, assign_roles, evaluate_group

INFEASIBLE = 1e12
"""Fitness floor of groupings that cannot serve; minus a bonus for devices put to use."""

Group = tuple[int, ...]
STARTS = 6
"""Local searches run from this many of the best heuristic starts."""
SMALL_POOL = 8
"""Up to this many devices the search scores every pipeline order of small groups."""


def combine(options: Sequence[ReplicaOption]) -> ReplicaOption:
    """One group's options in several pipeline orders, each role taken from the order
    best at it (ties: the first order)."""
    p = max(options, key=lambda o: o.prefill_rps)
    d = max(options, key=lambda o: o.decode_rps)
    m = max(options, key=lambda o: o.mixed_rps)
    return ReplicaOption(
        options[0].devices,
        p.prefill,
        p.prefill_rps,
        d.decode,
        d.concurrency,
        d.decode_tps,
        d.decode_rps,
        m.mixed,
        m.mixed_concurrency,
        m.mixed_rps,
    )


def groups_of(perm: Sequence[int], sizes: Sequence[int]) -> list[Group]:
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
        """The search's objective (seconds per request; huge when it cannot serve)."""
        b = self.assignment.bottleneck_s
        if b < float("inf") and len(self.options) >= self.min_replicas:
            return b
        used = sum(len(o.devices) for o in self.options)
        return INFEASIBLE - used


class Evaluator:
    """Scores groupings on one cost model; remembers every group it has solved.

    `mixed_only` scores every replica as MIXED (the homogeneous-replicas baseline: the
    same search without roles); `hybrid` lets the role search make any replica MIXED
    beside PREFILL and DECODER ones (E2LLM).
    """

    def __init__(
        self,
        cm: CostModel,
        min_tokens_per_s: float,
        *,
        mixed_only: bool = False,
        hybrid: bool = False,
    ) -> None:
        self.min_replicas = 1
        """2 once a grouping with two serving replicas is known: the paper's method
        disaggregates prefill and decode whenever the devices allow it, and a single
        mixed replica is the degraded fallback (even where the cost model rates one
        large mixed replica higher: the homogeneous baseline then shows it)."""
        self.cm = cm
        self.solver = SplitSolver(cm)
        self.min_tokens_per_s = min_tokens_per_s
        self.mixed_only = mixed_only
        self.hybrid = hybrid
        self._plain: dict[Group, ReplicaOption] = {}
        self._mixed: dict[Group, ReplicaOption] = {}
        self._best_order: dict[frozenset[int], ReplicaOption] = {}
        self._thorough: dict[frozenset[int], ReplicaOption] = {}
        self._fitness: dict[frozenset[frozenset[int]], float] = {}
        self.evaluations = 0
        """Groupings scored so far (the search's budget unit)."""

    def option(self, devices: Group, *, with_mixed: bool = False) -> ReplicaOption:
        """Best configuration of one ordered group in every role."""
        with_mixed = with_mixed or self.mixed_only or self.hybrid
        cache = self._mixed if with_mixed else self._plain
        if devices not in cache:
            cache[devices] = evaluate_group(
                self.solver, devices, min_tokens_per_s=self.min_tokens_per_s, with_mixed=with_mixed
            )
        return cache[devices]

    def best_order(self, group: Sequence[int], *, thorough: bool = False) -> ReplicaOption:
        """The group's best configuration in every role, each role in its own best
        pipeline order (a role's split is its own layout). Orders scored: every one up to
        3 devices in small pools while searching, up to 4 when `thorough`; else the
        canonical ones (one while searching, all three when `thorough`)."""
        key = frozenset(group)
        cache = self._thorough if thorough else self._best_order
        if key not in cache:
            small = len(group) <= 3 and len(self.cm.inventory) <= SMALL_POOL
            if len(group) <= 4 and (thorough or small):
                orders = [tuple(o) for o in itertools.permutations(group)]
            else:
                orders = self.canonical_orders(group)[: 3 if thorough else 1]
            cache[key] = combine([self.option(o) for o in orders])
        return cache[key]

    def canonical_orders(self, group: Sequence[int]) -> list[Group]:
        """Up to three pipeline orders worth trying for an unordered group."""
        if len(group) == 1:
            return [tuple(group)]
        cap = self.cm.capacity
        links = self.cm.links
        by_mem = sorted(group, key=lambda d: (float(cap[d]), d))
        orders = [tuple(by_mem)]
        orders.append((by_mem[-2], *by_mem[:-2], by_mem[-1]))
        slow = min(group, key=lambda d: (links[d].bandwidth_mbps, -links[d].latency_ms, d))
        rest = [d for d in by_mem if d != slow]
        orders.append((slow, *rest))
        return list(dict.fromkeys(orders))

    def holds(self, devices: Group) -> bool:
        """The group can hold the model in some role."""
        return self.option(devices).feasible

    def evaluate(self, groups: Sequence[Group], rule: RoleRule = "balanced") -> Evaluation:
        """Roles and capacities of a grouping in the given orders (unservable groups idle)."""
        options: list[ReplicaOption] = []
        idle: list[int] = []
        for g in groups:
            o = self.option(g)
            if o.feasible:
                options.append(o)
            else:
                idle.extend(g)
        return self._assemble(options, idle, rule)

    def _assemble(
        self, options: list[ReplicaOption], idle: list[int], rule: RoleRule
    ) -> Evaluation:
        if self.mixed_only:
            playing = [o for o in options if o.mixed_rps > 0]
            idle = idle + [d for o in options if o.mixed_rps <= 0 for d in o.devices]
            return Evaluation(tuple(playing), tuple(idle), assign_roles(playing, "mixed"))
        if len(options) == 1:
            options = [self.option(options[0].devices, with_mixed=True)]
        if self.hybrid and rule == "balanced":
            rule = "hybrid"
        return Evaluation(
            tuple(options), tuple(idle), assign_roles(options, rule), self.min_replicas
        )

    def evaluate_sets(
        self, groups: Sequence[Sequence[int]], *, thorough: bool = False
    ) -> Evaluation:
        """A partition of unordered groups, each role of each in its best order."""
        options: list[ReplicaOption] = []
        idle: list[int] = []
        for g in groups:
            o = self.best_order(g, thorough=thorough)
            if o.feasible and (not self.mixed_only or o.mixed_rps > 0):
                options.append(o)
            else:
                idle.extend(g)
        return self._assemble(options, idle, "balanced")

    def set_fitness(self, groups: Sequence[Sequence[int]]) -> float:
        """Fitness of a partition (cached)."""
        key = frozenset(frozenset(g) for g in groups)
        if key not in self._fitness:
            self.evaluations += 1
            self._fitness[key] = self.evaluate_sets(groups).fitness
        return self._fitness[key]

    def fitness(self, perm: Sequence[int], sizes: Sequence[int]) -> float:
        """GA fitness of a chromosome: its groups, each in its best canonical order."""
        return self.set_fitness(groups_of(perm, sizes))

    def greedy_sizes(self, perm: Sequence[int]) -> list[int]:
        """Cut a device order into the shortest prefixes that can each hold the model.

        A tail that cannot hold it alone joins the last replica.
        """
        sizes: list[int] = []
        start = 0
        for end in range(1, len(perm) + 1):
            if self.best_order(perm[start:end]).feasible:
                sizes.append(end - start)
                start = end
        if start < len(perm):
            if sizes:
                sizes[-1] += len(perm) - start
            else:
                sizes.append(len(perm) - start)
        return sizes


def speed_order(cm: CostModel, devices: Sequence[int] | None = None) -> list[int]:
    """Devices from fastest to slowest at prefill (ties: inventory order)."""
    ds = range(len(cm.inventory)) if devices is None else devices
    t = {d: float(cm.prefill_layers(d, cm.prompt_tokens).sum()) for d in ds}
    return sorted(t, key=lambda d: (t[d], d))


def memory_order(cm: CostModel, devices: Sequence[int] | None = None) -> list[int]:
    """Devices from most to least memory (ties: inventory order)."""
    ds = range(len(cm.inventory)) if devices is None else devices
    return sorted(ds, key=lambda d: (-cm.capacity[d], d))


def usable_devices(cm: CostModel) -> list[int]:
    """Devices that can hold at least one layer with what a stage needs beside it (the
    workspace of the longest prompt and one layer's KV for the longest context); the
    others can serve in no replica and are left out."""
    m = cm.model
    layer = min(m.layer_param_bytes)
    need = (
        layer
        + cm.workspace_bytes(cm.peak_prompt_tokens)
        + cm.least_layer_kv_bytes(cm.peak_context_tokens)
    )
    return [d for d in range(len(cm.inventory)) if cm.capacity[d] >= need]


@dataclass(frozen=True)
class SearchBudget:
    """How much work the search may do (in groupings scored, not seconds)."""

    local_search: int
    """Groupings the local searches may score in total."""
    ga: GAConfig | None
    """GA settings (None: no GA, for large pools)."""
    neighbours: int
    """Neighbours tried per local-search step before giving up on a start (sampled by
    the seeded generator when the neighbourhood is larger)."""


def budget_for(n: int) -> SearchBudget:
    """A budget that keeps 12 devices under a few seconds and 256 under a minute."""
    if n <= 16:
        return SearchBudget(
            6000, GAConfig(population=40, generations=40, patience=12, elite=3), 100_000
        )
    if n <= 80:
        return SearchBudget(2500, GAConfig(population=30, generations=15, patience=6), 600)
    return SearchBudget(1200, None, 250)


def _bins(cm: CostModel, devices: Sequence[int], k: int) -> list[list[int]]:
    """Deal devices into k groups balancing memory (largest first into the emptiest)."""
    bins: list[list[int]] = [[] for _ in range(k)]
    load = [0.0] * k
    for d in memory_order(cm, devices):
        i = min(range(k), key=lambda j: (load[j], j))
        bins[i].append(d)
        load[i] += float(cm.capacity[d])
    return [b for b in bins if b]


def _cut(ev: Evaluator, order: Sequence[int]) -> list[list[int]]:
    sizes = ev.greedy_sizes(order)
    return [list(g) for g in groups_of(order, sizes)]


def seed_partitions(
    ev: Evaluator, devices: Sequence[int], extra: Sequence[Sequence[Group]] = ()
) -> list[list[list[int]]]:
    """Heuristic starting partitions (deterministic)."""
    cm = ev.cm
    speed, mem = speed_order(cm, devices), memory_order(cm, devices)
    interleaved = list(
        dict.fromkeys(x for pair in zip(mem, reversed(mem), strict=True) for x in pair)
    )
    seeds = [_cut(ev, o) for o in (speed, mem, interleaved)]
    need = cm.model.total_param_bytes
    total = sum(float(cm.capacity[d]) for d in devices)
    most = max(1, int(total // need))
    counts = range(1, most + 1)
    if most > 12:  # large pools: around the greedy cuts' replica count only
        typical = max(1, len(seeds[0]))
        counts = range(max(1, typical - 2), min(most, typical + 2) + 1)
    for k in counts:
        seeds.append(_bins(cm, devices, k))
    seeds += [[list(g) for g in groups] for groups in extra]
    unique: dict[frozenset[frozenset[int]], list[list[int]]] = {}
    for s in seeds:
        unique.setdefault(frozenset(frozenset(g) for g in s), s)
    return list(unique.values())


def _neighbourhood_size(groups: list[list[int]], idle: list[int]) -> int:
    g = len(groups)
    n = sum(len(x) for x in groups)
    pairs = sum(len(a) * len(b) for a, b in itertools.combinations(groups, 2))
    splits = sum(2 ** (len(x) - 1) - 1 for x in groups if 2 <= len(x) <= 6)
    return n * g + len(idle) * g + g * (g - 1) // 2 + pairs + splits


def _all_moves(groups: list[list[int]], idle: list[int]) -> list[tuple[str, int, int, int, int]]:
    g = len(groups)
    moves: list[tuple[str, int, int, int, int]] = []
    for a in range(g):
        for i in range(len(groups[a])):
            moves += [("move", a, i, b, 0) for b in range(g) if b != a]
            moves.append(("out", a, i, 0, 0))
    for j in range(len(idle)):
        moves += [("in", j, 0, b, 0) for b in range(g)]
    for a, b in itertools.combinations(range(g), 2):
        moves.append(("merge", a, 0, b, 0))
        moves += [
            ("swap", a, i, b, k) for i in range(len(groups[a])) for k in range(len(groups[b]))
        ]
    for a in range(g):
        n = len(groups[a])
        if 2 <= n <= 6:
            moves += [("split", a, mask, 0, 0) for mask in range(1, 2 ** (n - 1))]
    return moves


def _random_move(
    groups: list[list[int]], idle: list[int], rng: random.Random
) -> tuple[str, int, int, int, int]:
    g = len(groups)
    kind = rng.choice(("move", "swap", "swap", "merge", "split", "out", "in"))
    a = rng.randrange(g)
    if kind == "in" and idle:
        return ("in", rng.randrange(len(idle)), 0, a, 0)
    if kind == "split" and 2 <= len(groups[a]) <= 6:
        return ("split", a, rng.randrange(1, 2 ** (len(groups[a]) - 1)), 0, 0)
    if kind == "out" or g == 1:
        return ("out", a, rng.randrange(len(groups[a])), 0, 0)
    b = rng.randrange(g - 1)
    b += b >= a
    if kind == "merge":
        return ("merge", min(a, b), 0, max(a, b), 0)
    if kind == "swap":
        return ("swap", a, rng.randrange(len(groups[a])), b, rng.randrange(len(groups[b])))
    return ("move", a, rng.randrange(len(groups[a])), b, 0)


def _neighbours(
    groups: list[list[int]], idle: list[int], rng: random.Random | None, limit: int
) -> Iterator[tuple[list[list[int]], list[int]]]:
    """Partitions one move away (moves, swaps, merges, splits): every one in a fixed
    order, or `limit` drawn by `rng` when there are more."""
    if rng is not None and _neighbourhood_size(groups, idle) > limit:
        moves = [_random_move(groups, idle, rng) for _ in range(limit)]
    else:
        moves = _all_moves(groups, idle)
    for kind, a, i, b, k in moves:
        new = [list(x) for x in groups]
        out = list(idle)
        if kind == "move":
            new[b].append(new[a].pop(i))
        elif kind == "out":
            out.append(new[a].pop(i))
        elif kind == "in":
            new[b].append(out.pop(a))
        elif kind == "merge":
            new[a] += new[b]
            new[b] = []
        elif kind == "swap":
            new[a][i], new[b][k] = new[b][k], new[a][i]
        else:
            members = new[a]
            left = [d for t, d in enumerate(members) if i >> t & 1]
            new[a] = left
            new.append([d for t, d in enumerate(members) if not i >> t & 1])
        yield [x for x in new if x], out


def local_search(
    ev: Evaluator,
    groups: list[list[int]],
    idle: list[int],
    *,
    budget: int,
    neighbours: int,
    rng: random.Random | None = None,
) -> tuple[list[list[int]], list[int], float]:
    """First-improvement descent over partitions until no neighbour is better or the
    budget (groupings scored) runs out."""
    best = ev.set_fitness(groups)
    stop = ev.evaluations + budget
    improved = True
    while improved and ev.evaluations < stop:
        improved = False
        for cand, out in _neighbours(groups, idle, rng, neighbours):
            if ev.evaluations >= stop:
                break
            f = ev.set_fitness(cand)
            if f < best * (1 - 1e-9):
                groups, idle, best, improved = cand, out, f, True
                break
    return groups, idle, best


def search_groups(
    ev: Evaluator,
    rng: random.Random,
    *,
    devices: Sequence[int] | None = None,
    extra_seeds: Sequence[Sequence[Group]] = (),
    budget: SearchBudget | None = None,
) -> list[Group]:
    """The E2LLM grouping (see the module docstring); `devices` defaults to every usable
    device, `extra_seeds` are groupings it must do at least as well as."""
    pool = list(devices) if devices is not None else usable_devices(ev.cm)
    if not pool:
        return []
    b = budget or budget_for(len(pool))
    seeds = seed_partitions(ev, pool, extra_seeds)
    if any(len(ev.evaluate_sets(s).options) >= 2 for s in seeds):
        ev.min_replicas = 2
    # local search from the most promising starts only (many cuts lead to one optimum)
    seeds = sorted(seeds, key=ev.set_fitness)[:STARTS]
    per_start = max(1, b.local_search // (len(seeds) + 1))
    results = []
    ls_rng = random.Random(0)
    for s in seeds:
        placed = {d for g in s for d in g}
        idle = [d for d in pool if d not in placed]
        results.append(
            local_search(ev, s, idle, budget=per_start, neighbours=b.neighbours, rng=ls_rng)
        )
    results.sort(key=lambda r: r[2])
    best_groups, best_idle, best_fit = results[0]
    if b.ga is not None and len(pool) > 1:
        index = {d: i for i, d in enumerate(pool)}
        ga_seeds = []
        for groups, idle, _ in results:
            perm = [index[d] for g in groups for d in g] + [index[d] for d in idle]
            sizes = [len(g) for g in groups] + ([len(idle)] if idle else [])
            ga_seeds.append((perm, sizes))

        def fitness(perm: Sequence[int], sizes: Sequence[int]) -> float:
            return ev.set_fitness([[pool[i] for i in g] for g in groups_of(perm, sizes)])

        perm, sizes, fit = run_ga(len(pool), fitness, rng, b.ga, ga_seeds)
        if fit < best_fit:
            groups = [[pool[i] for i in g] for g in groups_of(perm, sizes)]
            best_groups, best_idle, best_fit = local_search(
                ev, groups, [], budget=per_start, neighbours=b.neighbours, rng=rng
            )
    return [tuple(g) for g in best_groups] + [(d,) for d in best_idle]
