"""Genetic algorithm over replica groupings (the paper's encoding), on DEAP.

Chromosome: a permutation of the N devices plus a list of replica sizes summing to N;
replica r is the next sizes[r] devices of the permutation, in that pipeline order.
Crossover: one-point on the permutation, repaired by appending the missing devices in
the other parent's order; one-point on the sizes, repaired to sum to N. Mutation (one
move each time): swap two devices, move one device to another position, shift a
boundary between neighbouring replicas, split a replica, merge two neighbours. Elitism
keeps the best few unchanged. All randomness comes from the `random.Random` passed in
(DEAP's own operators use the global generator, so they are not used here).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from deap import base, tools

Fitness = Callable[[Sequence[int], Sequence[int]], float]


class _MinFitness(base.Fitness):
    weights = (-1.0,)


class Chromosome(list[int]):
    """A device permutation with replica sizes (`sizes`) and a DEAP fitness."""

    def __init__(self, perm: Sequence[int], sizes: Sequence[int]) -> None:
        super().__init__(perm)
        self.sizes: list[int] = list(sizes)
        self.fitness = _MinFitness()

    def key(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Hashable identity (for de-duplication and caching)."""
        return tuple(self), tuple(self.sizes)


@dataclass(frozen=True)
class GAConfig:
    """Search budget and operator rates."""

    population: int = 60
    """Individuals per generation."""
    generations: int = 80
    """Upper bound on generations."""
    patience: int = 25
    """Stop after this many generations without improvement."""
    elite: int = 4
    """Best individuals copied unchanged into the next generation."""
    cx_prob: float = 0.8
    """Probability a pair is recombined."""
    mut_prob: float = 0.5
    """Probability a child is mutated (one move)."""
    tournament: int = 3
    """Tournament size for parent selection."""


def repair_sizes(sizes: Sequence[int], n: int) -> list[int]:
    """Sizes >= 1 summing to n: truncate the excess, give the shortfall to a new replica."""
    out: list[int] = []
    total = 0
    for s in sizes:
        s = max(1, int(s))
        if total + s > n:
            s = n - total
        if s <= 0:
            break
        out.append(s)
        total += s
    if total < n:
        out.append(n - total)
    return out


def crossover(a: Chromosome, b: Chromosome, rng: random.Random) -> tuple[Chromosome, Chromosome]:
    """One-point crossover with repair on both parts."""
    n = len(a)
    cut = rng.randrange(1, n) if n > 1 else 0

    def child(p: Chromosome, q: Chromosome) -> Chromosome:
        head = list(p[:cut])
        taken = set(head)
        perm = head + [g for g in q if g not in taken]
        k = rng.randrange(0, len(p.sizes) + 1)
        cover = sum(p.sizes[:k])
        rest, acc = [], 0
        for s in q.sizes:
            acc += s
            if acc > cover:
                rest.append(min(s, acc - cover))
        return Chromosome(perm, repair_sizes(list(p.sizes[:k]) + rest, n))

    return child(a, b), child(b, a)


def mutate(c: Chromosome, rng: random.Random) -> Chromosome:
    """Apply one of the mutation moves; returns a new chromosome."""
    perm, sizes = list(c), list(c.sizes)
    n = len(perm)
    move = rng.randrange(5)
    if move == 0 and n > 1:  # swap two devices (between or within replicas)
        i, j = rng.sample(range(n), 2)
        perm[i], perm[j] = perm[j], perm[i]
    elif move == 1 and n > 1:  # move one device to another position
        i, j = rng.sample(range(n), 2)
        perm.insert(j, perm.pop(i))
    elif move == 2 and len(sizes) > 1:  # shift a boundary between neighbours
        r = rng.randrange(len(sizes) - 1)
        if rng.random() < 0.5 and sizes[r] > 1:
            sizes[r] -= 1
            sizes[r + 1] += 1
        elif sizes[r + 1] > 1:
            sizes[r] += 1
            sizes[r + 1] -= 1
    elif move == 3 and any(s > 1 for s in sizes):  # split a replica in two
        r = rng.choice([i for i, s in enumerate(sizes) if s > 1])
        cut = rng.randrange(1, sizes[r])
        sizes[r : r + 1] = [cut, sizes[r] - cut]
    elif len(sizes) > 1:  # merge two neighbours
        r = rng.randrange(len(sizes) - 1)
        sizes[r : r + 2] = [sizes[r] + sizes[r + 1]]
    return Chromosome(perm, repair_sizes(sizes, n))


def _tournament(
    pop: Sequence[Chromosome], k: int, size: int, rng: random.Random
) -> list[Chromosome]:
    return [
        min(rng.sample(list(pop), min(size, len(pop))), key=lambda c: c.fitness.values[0])
        for _ in range(k)
    ]


def run_ga(
    n: int,
    fitness: Fitness,
    rng: random.Random,
    config: GAConfig | None = None,
    seeds: Sequence[tuple[Sequence[int], Sequence[int]]] = (),
) -> tuple[list[int], list[int], float]:
    """Minimise `fitness(perm, sizes)`; returns the best (perm, sizes, fitness)."""
    cfg = config or GAConfig()
    toolbox = base.Toolbox()
    toolbox.register("mate", crossover, rng=rng)
    toolbox.register("mutate", mutate, rng=rng)
    toolbox.register("select", _tournament, size=cfg.tournament, rng=rng)
    scores: dict[tuple[tuple[int, ...], tuple[int, ...]], float] = {}

    def evaluate(c: Chromosome) -> None:
        key = c.key()
        if key not in scores:
            scores[key] = fitness(list(c), list(c.sizes))
        c.fitness.values = (scores[key],)

    pop = [Chromosome(p, repair_sizes(s, n)) for p, s in seeds][: cfg.population]
    while len(pop) < cfg.population:
        perm = list(range(n))
        rng.shuffle(perm)
        sizes: list[int] = []
        while sum(sizes) < n:
            sizes.append(rng.randint(1, max(1, min(n - sum(sizes), 4))))
        pop.append(Chromosome(perm, repair_sizes(sizes, n)))
    for c in pop:
        evaluate(c)
    hof = tools.HallOfFame(cfg.elite, similar=lambda a, b: a.key() == b.key())
    hof.update(pop)
    best, stale = hof[0].fitness.values[0], 0
    for _ in range(cfg.generations):
        parents = toolbox.select(pop, cfg.population - cfg.elite)
        children: list[Chromosome] = []
        for a, b in zip(parents[::2], parents[1::2], strict=False):
            if rng.random() < cfg.cx_prob:
                children.extend(toolbox.mate(a, b))
            else:
                children.extend([Chromosome(a, a.sizes), Chromosome(b, b.sizes)])
        if len(parents) % 2:
            children.append(Chromosome(parents[-1], parents[-1].sizes))
        children = [toolbox.mutate(c) if rng.random() < cfg.mut_prob else c for c in children]
        for c in children:
            evaluate(c)
        elites = [Chromosome(h, h.sizes) for h in hof]
        for e in elites:
            evaluate(e)
        pop = elites + children[: cfg.population - cfg.elite]
        hof.update(pop)
        current = hof[0].fitness.values[0]
        if current < best:
            best, stale = current, 0
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    top = hof[0]
    return list(top), list(top.sizes), float(top.fitness.values[0])
