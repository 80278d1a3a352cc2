"""A plan serving a request stream: prefill pipelines, KV hand-off, batched decoders.

- PREFILL replicas are pipelines (flow shops): a prompt enters stage i when the stage is
  free and the prompt has left stage i-1; stage times come from `CostModel.stage_times`
  for that prompt's length. The prefill produces the first token.
- The KV cache then moves to a DECODER replica chosen at that moment; the transfer takes
  `CostModel.kv_transfer_s` (links are not modelled as shared between transfers).
- DECODER replicas run up to `concurrency` requests; one step yields a token for each,
  every cycle(n) seconds for a batch of n; newcomers join at step boundaries.
- MIXED replicas alternate: a waiting prompt is prefilled (whole pipeline, decoding
  paused) whenever the batch has room, else the batch takes a decode step.
- Routing, at arrival (prefill) and after prefill (decoder): `jsq_time` (E2LLM) picks the
  replica with the least estimated time until the request is done there (queued work
  ahead plus its own service); `jsq_count` (Splitwise) picks the fewest outstanding
  requests. Ties go to the lower replica id.

Waiting time is time spent queued, not served: before the prefill starts plus before a
decoder admits the request into its batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from planner.costs import CostModel, Layout, decode_cycle, micro_batch
from planner.inventory import Inventory
from planner.model import ModelSpec
from planner.plan import Plan, Replica
from planner.sim.kernel import Event, EventQueue
from planner.workload import Request, Workload

Routing = Literal["jsq_time", "jsq_count"]

# Tie order of simultaneous events: finish work before admitting new work.
_STEP, _KV_ARRIVAL, _ARRIVAL = 0, 1, 2


@dataclass
class _Req:
    req: Request
    prefill_start: float = float("nan")
    first_token: float = float("nan")
    decode_wait: float = 0.0
    decode_admit: float = float("nan")
    finish: float = float("nan")
    remaining: int = 0
    queued_at: float = 0.0


@dataclass
class _Node:
    """One replica at run time."""

    replica: Replica
    layout: Layout
    cycle: list[float]
    """cycle[n]: seconds per decode step with n requests in the batch (index 0 unused)."""
    stage_decode: list[list[float]]
    """stage_decode[n]: per-stage time of one micro-batch when n requests decode."""
    stage_free: list[float] = field(default_factory=list)
    outstanding: int = 0
    active: list[_Req] = field(default_factory=list)
    joining: list[_Req] = field(default_factory=list)
    queue: deque[_Req] = field(default_factory=deque)
    stepping: bool = False

    @property
    def concurrency(self) -> int:
        return self.replica.concurrency


@dataclass(frozen=True)
class SimResult:
    """Figures of one simulated run (times in seconds)."""

    n_arrived: int
    """Requests that arrived."""
    n_completed: int
    """Requests that finished."""
    waiting: dict[str, float]
    """Queueing time: mean, p50, p90, p99."""
    ttft: dict[str, float]
    """Time to first token: mean, p50, p90, p99."""
    tbt: dict[str, float]
    """Mean time between tokens per request (decode phase): mean, p50, p90, p99."""
    e2e: dict[str, float]
    """Arrival to last token: mean, p50, p90, p99."""
    throughput_rps: float
    """Completed requests per second of makespan."""
    throughput_tokens_per_s: float
    """Generated tokens per second of makespan."""
    makespan_s: float
    """First arrival to last completion."""
    utilisation: dict[str, float]
    """Busy fraction of each device over the makespan."""
    events: int
    """Events processed (a cost figure of the simulator itself)."""

    @property
    def unfinished(self) -> int:
        """Arrivals that did not finish (0 unless a horizon cut the run short)."""
        return self.n_arrived - self.n_completed


def _stats(xs: Sequence[float]) -> dict[str, float]:
    if not xs:
        return {"mean": float("nan"), "p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    a = np.asarray(xs, dtype=float)
    return {
        "mean": float(a.mean()),
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


class _Cluster:
    def __init__(self, plan: Plan, cm: CostModel, routing: Routing) -> None:
        self.cm = cm
        self.routing = routing
        self.events = EventQueue()
        inv = cm.inventory
        self.busy = np.zeros(len(inv))
        self.prefill: list[_Node] = []
        self.decoders: list[_Node] = []
        self.mixed: list[_Node] = []
        for r in plan.replicas:
            node = self._node(r)
            {"prefill": self.prefill, "decoder": self.decoders, "mixed": self.mixed}[r.role].append(
                node
            )
        if not self.mixed and not (self.prefill and self.decoders):
            raise ValueError("plan needs a mixed replica, or prefill and decoder replicas")
        self.done: list[_Req] = []
        self._prefill_cache: dict[tuple[int, int], list[float]] = {}

    def _node(self, r: Replica) -> _Node:
        inv = self.cm.inventory
        devices = tuple(inv.index(s.device_id) for s in r.stages)
        bounds = tuple([s.layer_start for s in r.stages] + [r.stages[-1].layer_end])
        layout = Layout(devices, bounds, r.embed_last)
        cycle, stage_decode = [0.0], [[0.0] * len(devices)]
        for n in range(1, r.concurrency + 1):
            st = self.cm.stage_times(layout, decode=True, tokens=micro_batch(n, len(devices)))
            stage_decode.append(st)
            cycle.append(decode_cycle(st, n))
        return _Node(r, layout, cycle, stage_decode, stage_free=[0.0] * len(devices))

    def prefill_times(self, node: _Node, tokens: int) -> list[float]:
        key = (node.replica.replica_id, tokens)
        if key not in self._prefill_cache:
            self._prefill_cache[key] = self.cm.stage_times(node.layout, decode=False, tokens=tokens)
        return self._prefill_cache[key]

    # ---- arrivals and prefill -------------------------------------------------------

    def arrive(self, r: _Req) -> Iterable[Event]:
        def handler(now: float) -> Iterable[Event]:
            if self.mixed:
                node = self._pick_mixed(now, r)
                node.outstanding += 1
                node.queue.append(r)
                r.queued_at = now
                return self._kick_mixed(node, now)
            node = self._pick_prefill(now, r)
            return self._start_prefill(node, r, now)

        return [(r.req.arrival_s, _ARRIVAL, handler)]

    def _pick_prefill(self, now: float, r: _Req) -> _Node:
        if self.routing == "jsq_count":
            return min(self.prefill, key=lambda n: n.outstanding)

        def finish(n: _Node) -> float:
            t = now
            for free, s in zip(
                n.stage_free, self.prefill_times(n, r.req.prompt_tokens), strict=True
            ):
                t = max(t, free) + s
            return t

        return min(self.prefill, key=finish)

    def _start_prefill(self, node: _Node, r: _Req, now: float) -> Iterable[Event]:
        t = now
        times = self.prefill_times(node, r.req.prompt_tokens)
        for i, s in enumerate(times):
            start = max(t, node.stage_free[i])
            if i == 0:
                r.prefill_start = start
            t = start + s
            node.stage_free[i] = t
            self.busy[node.layout.devices[i]] += s
        node.outstanding += 1

        def done(at: float) -> Iterable[Event]:
            node.outstanding -= 1
            r.first_token = at
            r.remaining = r.req.output_tokens - 1
            if r.remaining <= 0:
                r.finish = at
                self.done.append(r)
                return []
            dec = self._pick_decoder(at, r)
            dec.outstanding += 1
            kv = self.cm.kv_transfer_s(node.layout, dec.layout, r.req.prompt_tokens)
            return [(at + kv, _KV_ARRIVAL, lambda t2: self._decoder_arrival(dec, r, t2))]

        return [(t, _STEP, done)]

    # ---- decoders -------------------------------------------------------------------

    def _pick_decoder(self, now: float, r: _Req) -> _Node:
        if self.routing == "jsq_count":
            return min(self.decoders, key=lambda n: n.outstanding)
        mean_left = max(self.cm.workload.mean_output_tokens - 1.0, 1.0)

        def estimate(n: _Node) -> float:
            c = n.concurrency
            ahead = len(n.active) + len(n.joining) + len(n.queue)
            full_cycle = n.cycle[c]
            wait = 0.0
            if ahead >= c:
                # slots free at the batch's token rate; each holds ~mean_left tokens
                wait = (ahead - c + 1) * mean_left * full_cycle / c
            own = r.remaining * n.cycle[min(ahead + 1, c)]
            return wait + own

        return min(self.decoders, key=estimate)

    def _decoder_arrival(self, node: _Node, r: _Req, now: float) -> Iterable[Event]:
        r.queued_at = now
        if len(node.active) + len(node.joining) < node.concurrency:
            node.joining.append(r)
        else:
            node.queue.append(r)
        if not node.stepping:
            return self._step(node, now)
        return []

    def _admit(self, node: _Node, now: float) -> None:
        for r in node.joining:
            r.decode_wait += now - r.queued_at
            r.decode_admit = now
            node.active.append(r)
        node.joining.clear()
        while node.queue and len(node.active) < node.concurrency:
            r = node.queue.popleft()
            r.decode_wait += now - r.queued_at
            r.decode_admit = now
            node.active.append(r)

    def _step(self, node: _Node, now: float) -> Iterable[Event]:
        self._admit(node, now)
        if not node.active:
            node.stepping = False
            return []
        node.stepping = True
        n = len(node.active)
        m = min(len(node.layout.devices), n)
        for d, s in zip(node.layout.devices, node.stage_decode[n], strict=True):
            self.busy[d] += m * s
        return [(now + node.cycle[n], _STEP, lambda t: self._step_done(node, t))]

    def _step_done(self, node: _Node, now: float) -> Iterable[Event]:
        still = []
        for r in node.active:
            r.remaining -= 1
            if r.remaining <= 0:
                r.finish = now
                node.outstanding -= 1
                self.done.append(r)
            else:
                still.append(r)
        node.active = still
        if node.replica.role == "mixed":
            return self._mixed_iteration(node, now)
        return self._step(node, now)

    # ---- mixed replicas ---------------------------------------------------------------

    def _pick_mixed(self, now: float, r: _Req) -> _Node:
        if self.routing == "jsq_count" or len(self.mixed) == 1:
            return min(self.mixed, key=lambda n: n.outstanding)
        return min(
            self.mixed,
            key=lambda n: (n.outstanding + 1) * sum(self.prefill_times(n, r.req.prompt_tokens)),
        )

    def _kick_mixed(self, node: _Node, now: float) -> Iterable[Event]:
        if node.stepping:
            return []
        return self._mixed_iteration(node, now)

    def _mixed_iteration(self, node: _Node, now: float) -> Iterable[Event]:
        if node.queue and len(node.active) < node.concurrency:
            node.stepping = True
            r = node.queue.popleft()
            r.prefill_start = now
            times = self.prefill_times(node, r.req.prompt_tokens)
            for d, s in zip(node.layout.devices, times, strict=True):
                self.busy[d] += s

            def prefilled(at: float) -> Iterable[Event]:
                r.first_token = at
                r.remaining = r.req.output_tokens - 1
                if r.remaining <= 0:
                    r.finish = at
                    node.outstanding -= 1
                    self.done.append(r)
                else:
                    r.decode_admit = at
                    node.active.append(r)
                return self._mixed_iteration(node, at)

            return [(now + sum(times), _STEP, prefilled)]
        if node.active:
            node.stepping = True
            n = len(node.active)
            m = min(len(node.layout.devices), n)
            for d, s in zip(node.layout.devices, node.stage_decode[n], strict=True):
                self.busy[d] += m * s
            return [(now + node.cycle[n], _STEP, lambda t: self._step_done(node, t))]
        node.stepping = False
        return []


def simulate(
    plan: Plan,
    inventory: Inventory,
    model: ModelSpec,
    workload: Workload,
    requests: Sequence[Request],
    *,
    routing: Routing = "jsq_time",
    max_concurrency: int = 16,
    horizon_s: float = float("inf"),
) -> SimResult:
    """Serve `requests` with `plan`; `workload` gives the mean lengths the cost model uses."""
    cm = CostModel(
        inventory, model, workload, max(max_concurrency, max(r.concurrency for r in plan.replicas))
    )
    cluster = _Cluster(plan, cm, routing)
    reqs = [_Req(r) for r in requests]
    for r in reqs:
        for t, order, h in cluster.arrive(r):
            cluster.events.schedule(t, order, h)
    cluster.events.run(until=horizon_s)
    done = sorted(cluster.done, key=lambda r: r.req.id)
    t0 = min((r.req.arrival_s for r in reqs), default=0.0)
    t_end = max((r.finish for r in done), default=t0)
    makespan = max(t_end - t0, 1e-12)
    waits = [(r.prefill_start - r.req.arrival_s) + r.decode_wait for r in done]
    tbt = [
        (r.finish - r.decode_admit) / (r.req.output_tokens - 1)
        for r in done
        if r.req.output_tokens > 1
    ]
    tokens = sum(r.req.output_tokens for r in done)
    return SimResult(
        n_arrived=len(reqs),
        n_completed=len(done),
        waiting=_stats(waits),
        ttft=_stats([r.first_token - r.req.arrival_s for r in done]),
        tbt=_stats(tbt),
        e2e=_stats([r.finish - r.req.arrival_s for r in done]),
        throughput_rps=len(done) / makespan,
        throughput_tokens_per_s=tokens / makespan,
        makespan_s=makespan,
        utilisation={
            inventory.devices[d].id: float(min(1.0, cluster.busy[d] / makespan))
            for d in range(len(inventory))
        },
        events=cluster.events.processed,
    )
