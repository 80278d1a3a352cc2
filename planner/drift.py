"""Re-planning when the workload drifts: the pure part (observations in, a decision out).

The orchestrator (and the simulator) feed every request's arrival and finish, with the
time they happened; `DriftPlanner.decide(now, plan, queued)` answers

- `Keep`: nothing worth changing;
- `Flip(plan)`: the same layouts with other roles (PREFILL <-> DECODER <-> MIXED) or
  decoder concurrency: no device reloads; a flipping replica finishes its old work first
  (`planner.routing.Router.reconfigure` applies it);
- `Relayout(plan)`: a new grouping or layer split: dispatch pauses, requests in flight
  drain (bounded) or restart, devices reload (see `planner.switch`).

How it decides: the live mix (mean prompt and output lengths, arrival rate, the longest
prompt and context seen, and those of the requests still in flight, which a new plan
must still be able to hold) is estimated over a sliding window (`MixEstimator`). The
current plan, the best flip of it and (when the mix moved far from what the plan was made
for) a fresh plan are each scored by the waiting they would accumulate over the next
`horizon_s` seconds, as a fluid queue: the current backlog `queued` drains at (capacity -
arrival rate) or grows at (arrival rate - capacity), capacities predicted by the cost
model at the live mix, and a re-layout serves nothing while it drains and reloads. The
cheapest option wins if it saves at least `min_gain` of the current plan's waiting;
flips are preferred at equal benefit since they cost nothing. A switch is followed by a
`cooldown_s` quiet period. There is no clock inside: every method takes `now`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from planner.costs import CostModel, Layout, micro_batch
from planner.errors import PlanInfeasible
from planner.inventory import Inventory
from planner.make import make_plan, reassign
from planner.model import ModelSpec
from planner.plan import Plan
from planner.switch import Flip, Keep, Relayout, SwitchCost, SwitchDecision, reload_s
from planner.workload import Workload


@dataclass(frozen=True)
class DriftConfig:
    """When and how eagerly to re-plan."""

    window_s: float = 120.0
    """The arrival rate is measured over the last window_s seconds."""
    recent: int = 30
    """Mean prompt and output lengths come from the most recent this-many arrivals, and
    from the finished requests that arrived most recently: a prompt's length is known on
    arrival, an output's as soon as one of the new requests is through."""
    min_arrivals: int = 20
    """No decision before this many arrivals (and a third as many finishes) in the window."""
    tick_s: float = 10.0
    """How often the simulator asks (the orchestrator may ask whenever it likes)."""
    horizon_s: float = 600.0
    """Waiting is predicted over this horizon when options are compared."""
    min_gain: float = 0.15
    """A switch must save at least this fraction of the current plan's predicted waiting."""
    replan_shift: float = 0.25
    """A fresh plan (a possible re-layout) is computed only when the mean prompt, mean
    output or arrival rate moved by more than this fraction from the mix the current
    plan was made for."""
    cooldown_s: float = 30.0
    """No new flip this soon after a switch (flips cost nothing but must show effect)."""
    relayout_cooldown_s: float = 300.0
    """No re-layout this soon after a switch (it costs a drain and a reload)."""
    relayout: bool = True
    """False: only flips (no weight ever reloads on drift; where reading weights is slow
    or wears the storage, an operator may prefer that)."""


SHIFT = 0.5
"""A change of the prompts' geometric mean by this fraction marks a new mix."""
SHIFT_EVIDENCE = 5
"""Finished requests of the new mix needed before their outputs replace the old ones."""


class MixEstimator:
    """The live workload mix over a sliding window of observations."""

    def __init__(self, window_s: float, recent: int = 30) -> None:
        self.window_s = window_s
        self.recent = recent
        self._arrivals: deque[tuple[float, int]] = deque()
        self._finishes: deque[tuple[float, int, int, float]] = deque()
        self._first: float | None = None
        self._in_flight: dict[str, tuple[int, int, float]] = {}
        self._last: deque[tuple[float, int]] = deque(maxlen=2 * recent)

    def observe_arrival(
        self, now: float, request_id: str, prompt_tokens: int, max_new_tokens: int
    ) -> None:
        """A request arrived with a prompt of this many tokens and this limit on new ones."""
        if self._first is None:
            self._first = now
        self._arrivals.append((now, prompt_tokens))
        self._last.append((now, prompt_tokens))
        self._in_flight[request_id] = (prompt_tokens, max_new_tokens, now)

    def observe_finish(self, now: float, request_id: str, output_tokens: int) -> None:
        """A request ended after generating this many tokens (an unknown id is ignored)."""
        seen = self._in_flight.pop(request_id, None)
        if seen is not None:
            self._finishes.append((now, seen[0], output_tokens, seen[2]))

    def _prune(self, now: float) -> None:
        cut = now - self.window_s
        while self._arrivals and self._arrivals[0][0] < cut:
            self._arrivals.popleft()
        while self._finishes and self._finishes[0][0] < cut:
            self._finishes.popleft()

    def _shift(self) -> float | None:
        """Arrival time of the first of the last `recent` prompts when their lengths differ
        from the `recent` before them by more than SHIFT (geometric means), else None."""
        r = self.recent
        if len(self._last) < 2 * r:
            return None
        block = list(self._last)
        new = [math.log(max(p, 1)) for _, p in block[r:]]
        old = [math.log(max(p, 1)) for _, p in block[:r]]
        if abs(sum(new) / r - sum(old) / r) <= math.log(1.0 + SHIFT):
            return None
        return block[r][0]

    def counts(self, now: float) -> tuple[int, int]:
        """(arrivals, finishes) in the window."""
        self._prune(now)
        return len(self._arrivals), len(self._finishes)

    def estimate(self, now: float) -> Workload | None:
        """Means, rate and peaks of the window (None before any arrival and finish)."""
        self._prune(now)
        if not self._arrivals or not self._finishes or self._first is None:
            return None
        span = min(self.window_s, max(now - self._first, 1e-9))
        prompts = [p for _, p in self._arrivals]
        rate = len(prompts) / span
        prompts = prompts[-self.recent :]
        # the requests that *arrived* last among those finished: under a backlog the
        # last to finish are old ones, and the mix of new arrivals would show late
        by_arrival = sorted(self._finishes, key=lambda f: f[3])
        outputs = [o for _, _, o, _ in by_arrival][-self.recent :]
        shift = self._shift()
        if shift is not None:
            # the prompts changed: once a few of the new requests are through, their
            # outputs alone say what the new mix generates
            after = [o for _, _, o, arrived in by_arrival if arrived >= shift]
            if len(after) >= SHIFT_EVIDENCE:
                outputs = after[-self.recent :]
        w = Workload(
            mean_prompt_tokens=sum(prompts) / len(prompts),
            mean_output_tokens=max(1.0, sum(outputs) / len(outputs)),
            arrival_rate_rps=max(rate, 1e-6),
        )
        # every request still in the system must stay servable after a switch
        live_prompt = max((p for p, _, _ in self._in_flight.values()), default=0)
        live_context = max((p + n for p, n, _ in self._in_flight.values()), default=0)
        seen_prompt = float(max(*prompts, live_prompt))
        seen_context = float(max(max(p + o for _, p, o, _ in self._finishes), live_context))
        return replace(
            w,
            peak_prompt=max(w.peak_prompt_tokens, seen_prompt),
            peak_context=max(w.peak_context_tokens, seen_context),
        )


def waiting_area(
    capacity: float, rate: float, backlog: float, horizon: float, down: float
) -> float:
    """Request-seconds of waiting over `horizon` for a fluid queue: `backlog` requests
    queued now, arrivals at `rate`, nothing served for `down` seconds, then service at
    `capacity` requests/s."""
    down = min(down, horizon)
    area = backlog * down + rate * down * down / 2.0
    q = backlog + rate * down
    t = horizon - down
    drift = rate - capacity
    if drift >= 0:
        return area + q * t + drift * t * t / 2.0
    empty = q / -drift
    if empty >= t:
        return area + q * t + drift * t * t / 2.0
    return area + q * empty / 2.0


def plan_capacity(
    plan: Plan,
    inventory: Inventory,
    model: ModelSpec,
    workload: Workload,
    *,
    min_tokens_per_s: float,
    max_concurrency: int,
) -> float:
    """Requests/s the plan serves at `workload`, roles and concurrency as they are (a
    decoder whose memory no longer holds its concurrency at this mix runs fewer)."""
    cm = CostModel(inventory, model, workload, max(max_concurrency, 1))
    prefill = decode = mixed = 0.0
    out = max(workload.mean_output_tokens - 1.0, 1e-6)
    for r in plan.replicas:
        devices = tuple(inventory.index(s.device_id) for s in r.stages)
        bounds = tuple([s.layer_start for s in r.stages] + [r.stages[-1].layer_end])
        lay = Layout(devices, bounds, r.embed_last)
        k = len(devices)
        if r.role == "prefill":
            if _fits(cm, lay, cm.prefill_kv_tokens(k), cm.peak_prompt_tokens):
                st = cm.stage_times(lay, decode=False, tokens=cm.prompt_tokens, kv_out=True)
                prefill += 1.0 / max(max(st), cm.kv_link_s(lay, cm.prompt_tokens))
            continue
        c = r.concurrency
        work = cm.peak_prompt_tokens if r.role == "mixed" else 0.0
        while c > 1 and not _fits(cm, lay, cm.decode_kv_tokens(c), max(work, micro_batch(c, k))):
            c -= 1
        if not _fits(cm, lay, cm.decode_kv_tokens(c), max(work, micro_batch(c, k))):
            continue
        st = cm.stage_times(lay, decode=True, tokens=micro_batch(c, k))
        cycle = max(sum(st), min(k, c) * max(st))
        if 1.0 / cycle < min_tokens_per_s:
            continue
        if r.role == "decoder":
            tps = min(c / cycle, out / cm.kv_link_s(lay, cm.prompt_tokens))
            decode += tps / out
        else:
            pre = sum(cm.stage_times(lay, decode=False, tokens=cm.prompt_tokens))
            mixed += 1.0 / (pre + out * cycle / c)
    split = min(prefill, decode) if prefill > 0 and decode > 0 else 0.0
    return mixed + split


def _fits(cm: CostModel, lay: Layout, kv_tokens: float, work: float) -> bool:
    mem = cm.stage_memory(lay, kv_tokens=kv_tokens, pass_tokens=work)
    return all(m <= cm.capacity[d] for m, d in zip(mem, lay.devices, strict=True))


def _moved(a: Workload, b: Workload, by: float) -> bool:
    def rel(x: float, y: float) -> float:
        return abs(x - y) / max(y, 1e-9)

    return (
        rel(a.mean_prompt_tokens, b.mean_prompt_tokens) > by
        or rel(a.mean_output_tokens, b.mean_output_tokens) > by
        or rel(a.arrival_rate_rps, b.arrival_rate_rps) > by
    )


class DriftPlanner:
    """Observations in, a decision out (see the module docstring)."""

    def __init__(
        self,
        inventory: Inventory | None,
        model: ModelSpec,
        *,
        designed_for: Workload,
        method: str = "e2llm",
        seed: int = 0,
        min_tokens_per_s: float = 15.0,
        max_concurrency: int = 16,
        config: DriftConfig | None = None,
        switch: SwitchCost | None = None,
    ) -> None:
        self._inventory = inventory
        self.model = model
        self.method = method
        self.seed = seed
        self.floor = min_tokens_per_s
        self.max_concurrency = max_concurrency
        self.config = config or DriftConfig()
        self.switch = switch or SwitchCost()
        self.mix = MixEstimator(self.config.window_s, self.config.recent)
        self.designed_for = designed_for
        """The mix the current layouts were planned for."""
        self._last_switch = -math.inf
        self._fresh_for: Workload | None = None
        self._fresh_plan: Plan | None = None
        self.decisions: list[str] = []
        """Every non-trivial decision, for reports."""

    @property
    def inventory(self) -> Inventory:
        """The devices to plan with (the orchestrator sets the live ones before a check)."""
        if self._inventory is None:
            raise ValueError("drift planner: no inventory given yet")
        return self._inventory

    @inventory.setter
    def inventory(self, inventory: Inventory) -> None:
        self._inventory = inventory

    @property
    def tick_s(self) -> float:
        """How often the simulator asks."""
        return self.config.tick_s

    def observe_arrival(
        self, now: float, request_id: str, prompt_tokens: int, max_new_tokens: int
    ) -> None:
        """A request arrived."""
        self.mix.observe_arrival(now, request_id, prompt_tokens, max_new_tokens)

    def observe_finish(self, now: float, request_id: str, output_tokens: int) -> None:
        """A request ended (answered, failed or cancelled)."""
        self.mix.observe_finish(now, request_id, output_tokens)

    def decide(self, now: float, plan: Plan, queued: int) -> SwitchDecision:
        """Keep, flip roles / concurrency, or re-layout (see the module docstring)."""
        if now - self._last_switch < self.config.cooldown_s:
            return Keep("cooling down after a switch")
        w = enough_observed(self.mix, self.config, now)
        if w is None:
            return Keep("not enough observations")
        return self.decide_for(now, plan, queued, w)

    def decide_for(self, now: float, plan: Plan, queued: int, w: Workload) -> SwitchDecision:
        """`decide` at a mix measured elsewhere: the orchestrator measures it in its event
        loop and runs this (seconds: it may search a fresh plan) in a thread."""
        cfg = self.config
        quiet = now - self._last_switch
        if quiet < cfg.cooldown_s:
            return Keep("cooling down after a switch")
        area = self._area_fn(w, float(queued))
        cur = area(self._capacity(plan, w), 0.0)
        options: list[tuple[float, int, SwitchDecision]] = []
        try:
            flipped = reassign(
                plan,
                self.inventory,
                self.model,
                w,
                min_tokens_per_s=self.floor,
                max_concurrency=self.max_concurrency,
            )
            cap = self._capacity(flipped, w)
            if _changed(plan, flipped):
                options.append((area(cap, 0.0), 0, Flip(flipped, self._why(w, cap))))
        except PlanInfeasible:
            pass
        if (
            cfg.relayout
            and quiet >= cfg.relayout_cooldown_s
            and _moved(w, self.designed_for, cfg.replan_shift)
        ):
            fresh = self._fresh(w, plan.version + 1)
            if fresh is not None:
                down = self.switch.drain_timeout_s + reload_s(plan, fresh, self.model, self.switch)
                cap = self._capacity(fresh, w)
                options.append((area(cap, down), 1, Relayout(fresh, self._why(w, cap, down))))
        if not options:
            return Keep("no better option")
        best_area, _, decision = min(options, key=lambda o: (o[0], o[1]))
        if best_area > cur * (1.0 - cfg.min_gain) or cur - best_area < 1.0:
            return Keep(f"predicted waiting {cur:.0f} vs {best_area:.0f} request-s: not worth it")
        self._last_switch = now
        if isinstance(decision, Relayout):
            self.designed_for = w
        self.decisions.append(f"{now:.0f}s {type(decision).__name__.lower()}: {decision.reason}")
        return decision

    def _area_fn(self, w: Workload, queued: float) -> Callable[[float, float], float]:
        def area(capacity: float, down: float) -> float:
            return waiting_area(capacity, w.arrival_rate_rps, queued, self.config.horizon_s, down)

        return area

    def _capacity(self, plan: Plan, w: Workload) -> float:
        return plan_capacity(
            plan,
            self.inventory,
            self.model,
            w,
            min_tokens_per_s=self.floor,
            max_concurrency=self.max_concurrency,
        )

    def _fresh(self, w: Workload, version: int) -> Plan | None:
        """A full plan for the live mix; recomputed only when the mix moved by half of
        `replan_shift` since the last one (a search costs seconds on a large pool)."""
        if self._fresh_for is None or _moved(w, self._fresh_for, self.config.replan_shift / 2):
            self._fresh_for = w
            try:
                self._fresh_plan = make_plan(
                    self.inventory,
                    self.model,
                    w,
                    method=self.method,
                    seed=self.seed,
                    version=version,
                    min_tokens_per_s=self.floor,
                    max_concurrency=self.max_concurrency,
                )
            except PlanInfeasible:
                self._fresh_plan = None
        p = self._fresh_plan
        return None if p is None else replace(p, version=version)

    @staticmethod
    def _why(w: Workload, capacity: float, down: float = 0.0) -> str:
        extra = f", {down:.0f} s to drain and reload" if down else ""
        return (
            f"live mix {w.mean_prompt_tokens:.0f}/{w.mean_output_tokens:.0f} tokens at "
            f"{w.arrival_rate_rps:.2f} req/s: {capacity:.3f} req/s{extra}"
        )


def enough_observed(mix: MixEstimator, config: DriftConfig, now: float) -> Workload | None:
    """The live mix, once the window holds enough arrivals and finishes to trust it."""
    arrivals, finishes = mix.counts(now)
    if arrivals < config.min_arrivals or finishes < max(1, config.min_arrivals // 3):
        return None
    return mix.estimate(now)


def _changed(a: Plan, b: Plan) -> bool:
    ra = {r.replica_id: (r.role, r.concurrency) for r in a.replicas}
    rb = {r.replica_id: (r.role, r.concurrency) for r in b.replicas}
    return ra != rb
