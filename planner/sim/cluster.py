"""A plan serving a request stream, event by event, routed by `planner.routing.Router`.

The router is driven exactly as the orchestrator drives it (same events, same calls):
what is simulated is the policy that runs. Service times come from the planner's cost
model (the simulated "truth"); the router only sees the plan's predictions.

- PREFILL replicas are pipelines (flow shops): a prompt enters stage i when the stage is
  free and the prompt has left stage i-1. The prefill produces the first token.
- The decoder is bound when the first token is out (the router's choice), one message
  later (`bind_message_s`); the prompt's KV then crosses the links: every source device's
  uplink, then (store and forward at the broker) every destination device's downlink.
  Links are FIFO resources shared by all KV transfers; activation hops are part of the
  stage times.
- DECODER replicas run up to `concurrency` requests; one step yields a token for each,
  every cycle(n) seconds for a batch of n; newcomers join at step boundaries.
- MIXED replicas run stage by stage, as the agents do: every stage is a FIFO server of
  prompt passes and decode steps, decode steps that meet at a stage run as one batch of
  at most the micro-batch of the requests decoding there (`micro_batch(n, stages)`) and
  travel on as one message, and a step that waits at a stage while it prefills someone
  else's prompt is stalled (i.e. waiting) for that long. A step behind a prompt follows
  it down the pipeline, doing its own work at each stage while the prompt occupies the
  next, so it loses the prompt's stage time minus its own at each stage, not the
  prompt's whole pass.
- KV memory is checked on every device at every admission and every token: weights,
  workspace and the live KV of the requests it holds must fit its memory, or the run
  stops with `SimulationError` naming the device (the router's reservations prevent it).
- A re-planner (`planner.drift.DriftPlanner`) may be asked every `tick_s`: a flip takes
  effect replica by replica as each drains its old work; a re-layout pauses dispatch,
  drains for up to `SwitchCost.drain_timeout_s`, restarts what is still running, and
  resumes after the slowest device has reloaded.

Every request's timestamps land in a `planner.metrics.RequestRecord`; `SimResult.summary`
is `planner.metrics.summarize` over them, the same code a runtime run is measured with.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from planner.costs import CostModel, Layout, decode_cycle, micro_batch
from planner.inventory import Inventory
from planner.metrics import SLO, RequestRecord, Summary, summarize
from planner.model import ModelSpec
from planner.plan import Plan, Replica
from planner.routing import Bind, Binding, Dispatch, Policy, Reject, Router
from planner.sim.kernel import EventQueue
from planner.switch import Flip, Keep, Relayout, SwitchCost, SwitchDecision, reload_s
from planner.workload import Request, Workload

# Tie order of simultaneous events: finish work before admitting new work.
_STEP, _KV, _FIRST, _WAKE, _ARRIVAL, _TICK = 0, 1, 2, 3, 4, 5


class SimulationError(RuntimeError):
    """The simulated cluster broke a physical limit (names the device and the figures)."""


class Replanner(Protocol):
    """What the simulator asks every `tick_s` (see `planner.drift.DriftPlanner`)."""

    @property
    def tick_s(self) -> float: ...

    def observe_arrival(
        self, now: float, request_id: str, prompt_tokens: int, max_new_tokens: int
    ) -> None: ...

    def observe_finish(self, now: float, request_id: str, output_tokens: int) -> None: ...

    def decide(self, now: float, plan: Plan, queued: int) -> SwitchDecision: ...


@dataclass
class _Live:
    """A request in the simulated cluster."""

    req: Request
    rec: RequestRecord
    prompt: int
    """Tokens to prefill (prompt, plus tokens already streamed after a restart)."""
    generated: int = 0
    epoch: int = 0
    """Bumped when the request restarts, so its stale events do nothing."""
    paused_at: float = float("nan")
    """When a re-layout interrupted its decoding (the gap counts as a stall)."""
    kv_ready: tuple[float, ...] = ()
    """When each stage of its PREFILL replica finished its pass: its layers' KV can leave
    then, while the later stages still compute."""

    @property
    def rid(self) -> str:
        return self.rec.request_id

    @property
    def max_new(self) -> int:
        """Tokens still to generate (the client's limit: the simulated output length)."""
        return self.req.output_tokens - self.generated


@dataclass
class _Job:
    """A prompt pass or a batch of decode steps moving down a MIXED replica's stages."""

    prefill: bool
    lives: list[tuple[_Live, int]]
    """The requests it carries, each with the epoch it was sent under."""
    arrived: float = 0.0
    """When it reached the stage it waits at."""

    def live(self) -> list[tuple[_Live, int]]:
        """Its requests not restarted since it was sent (a restart bumps the epoch)."""
        self.lives = [(lv, e) for lv, e in self.lives if lv.epoch == e]
        return self.lives


@dataclass
class _Stage:
    """One stage of a MIXED replica: what waits there, and when it last prefilled."""

    queue: deque[_Job] = field(default_factory=deque)
    busy: bool = False
    prefills: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=16))


@dataclass
class _Node:
    """One replica at run time."""

    replica: Replica
    layout: Layout
    stage_free: list[float]
    active: list[_Live] = field(default_factory=list)
    joining: list[_Live] = field(default_factory=list)
    stages: list[_Stage] = field(default_factory=list)
    """A MIXED replica's stages as FIFO servers (empty for other roles)."""
    stepping: bool = False
    kv_live: dict[str, float] = field(default_factory=dict)
    """Live KV tokens per request on this replica."""
    kv_total: float = 0.0
    """Their sum."""
    kv_room: dict[float, float] = field(default_factory=dict)
    """KV tokens its memory holds beside a pass of that many tokens (cached)."""
    passes: dict[str, float] = field(default_factory=dict)
    """Prompts being prefilled here (their workspace is in use)."""
    cycles: dict[int, tuple[float, list[float]]] = field(default_factory=dict)
    stage_s: dict[tuple[bool, int], list[float]] = field(default_factory=dict)
    """Each stage's time for a decode batch or a prompt of that many tokens (cached)."""
    epoch: int = 0
    """Bumped when the node is dropped by a re-layout (its events do nothing)."""


@dataclass(frozen=True)
class SimResult:
    """One simulated run: the standard figures and what produced them."""

    summary: Summary
    """TTFT, TBT, end-to-end, waiting (mean and percentiles), throughput, goodput."""
    records: tuple[RequestRecord, ...]
    """Every request's timestamps, by id."""
    utilisation: dict[str, float]
    """Busy fraction of each device over the makespan."""
    events: int
    """Events processed (a cost figure of the simulator itself)."""
    switches: tuple[str, ...] = ()
    """Plan switches made during the run: '<time> flip|relayout: <reason>'."""

    @property
    def n_arrived(self) -> int:
        """Requests that arrived."""
        return self.summary.n_arrived

    @property
    def n_completed(self) -> int:
        """Requests that finished."""
        return self.summary.n_completed

    @property
    def unfinished(self) -> int:
        """Arrivals that did not end (a horizon cut the run short)."""
        return self.summary.unfinished


class _Cluster:
    def __init__(
        self,
        plan: Plan,
        cm: CostModel,
        policy: Policy,
        *,
        bind_message_s: float,
        switch: SwitchCost,
        replanner: Replanner | None,
        bind: Binding = "ready",
    ) -> None:
        self.cm = cm
        self.policy: Policy = policy
        self.bind: Binding = bind
        self.bind_message_s = bind_message_s
        self.switch = switch
        self.replanner = replanner
        self.events = EventQueue()
        n = len(cm.inventory)
        self.busy = np.zeros(n)
        self.up_free = np.zeros(n)
        self.down_free = np.zeros(n)
        self.live: dict[str, _Live] = {}
        self.switches: list[str] = []
        self.state = "serving"
        """serving, draining (a re-layout waits for requests in flight) or reloading."""
        self._pending_plan: Plan | None = None
        self._drain_until = 0.0
        self.pending_arrivals = 0
        self._wake_at: float | None = None
        self._ticks_seen = 0
        self._idle_ticks = 0
        self._install(plan, now=0.0)

    # ---- plan ------------------------------------------------------------------------

    def _install(self, plan: Plan, now: float, queued: Sequence[_Live] = ()) -> None:
        self.plan = plan
        self.nodes = {r.replica_id: self._node(r, now) for r in plan.replicas}
        roles = {r.role for r in plan.replicas}
        if "mixed" not in roles and not {"prefill", "decoder"} <= roles:
            raise ValueError("plan needs a mixed replica, or prefill and decoder replicas")
        self.router = Router(plan, self.policy, bind=self.bind)
        for lv in queued:
            self.router.arrive(lv.rid, lv.prompt, lv.max_new, now)

    def _node(self, r: Replica, now: float) -> _Node:
        inv = self.cm.inventory
        devices = tuple(inv.index(s.device_id) for s in r.stages)
        bounds = tuple([s.layer_start for s in r.stages] + [r.stages[-1].layer_end])
        return _Node(r, Layout(devices, bounds, r.embed_last), [now] * len(devices))

    def _cycle(self, node: _Node, n: int) -> tuple[float, list[float]]:
        if n not in node.cycles:
            k = len(node.layout.devices)
            st = self.cm.stage_times(node.layout, decode=True, tokens=micro_batch(n, k))
            node.cycles[n] = (decode_cycle(st, n), st)
        return node.cycles[n]

    # ---- memory ----------------------------------------------------------------------

    def _check_memory(self, node: _Node) -> None:
        largest = max(node.passes.values(), default=0.0)
        k = len(node.layout.devices)
        work = max(largest, float(micro_batch(max(1, len(node.active)), k)))
        if work not in node.kv_room:
            node.kv_room[work] = self.cm.kv_budget_tokens(node.layout, work)
        if node.kv_total > node.kv_room[work] + 1e-6:
            mem = self.cm.stage_memory(node.layout, kv_tokens=node.kv_total, pass_tokens=work)
            i = max(
                range(k), key=lambda j: mem[j] - float(self.cm.capacity[node.layout.devices[j]])
            )
            d = node.layout.devices[i]
            raise SimulationError(
                f"device {self.cm.inventory.devices[d].id!r} (replica "
                f"{node.replica.replica_id}): weights + workspace + KV of {node.kv_total:.0f} "
                f"tokens need {mem[i] / 1e6:.0f} MB, it has {self.cm.capacity[d] / 1e6:.0f} MB"
            )

    def _kv_add(self, node: _Node, lv: _Live, tokens: float) -> None:
        node.kv_live[lv.rid] = node.kv_live.get(lv.rid, 0.0) + tokens
        node.kv_total += tokens
        self._check_memory(node)

    def _kv_free(self, node: _Node, lv: _Live) -> None:
        node.kv_total -= node.kv_live.pop(lv.rid, 0.0)

    # ---- routing -----------------------------------------------------------------------

    def decide(self, now: float) -> None:
        self._maybe_switch(now)
        if self.state != "serving":
            return
        for d in self.router.decide(now):
            lv = self.live[d.request_id]
            if isinstance(d, Reject):
                lv.rec.status = "failed" if lv.generated else "rejected"
                del self.live[d.request_id]
                for node in self.nodes.values():
                    self._kv_free(node, lv)
                if self.replanner is not None:
                    self.replanner.observe_finish(now, lv.rid, lv.generated)
            elif isinstance(d, Dispatch):
                self._dispatch(self.nodes[d.replica_id], lv, now)
            elif isinstance(d, Bind):
                self._bind(self.nodes[d.replica_id], lv, now)
        wake = self.router.next_wakeup()
        if wake is not None and wake > now and (self._wake_at is None or wake < self._wake_at):
            self._wake_at = wake
            self.events.schedule(wake, _WAKE, self._on_wake)

    def _on_wake(self, now: float) -> None:
        if self._wake_at is not None and now >= self._wake_at:
            self._wake_at = None
        self.decide(now)

    def arrive(self, lv: _Live) -> Callable[[float], None]:
        def handler(now: float) -> None:
            self.pending_arrivals -= 1
            self.live[lv.rid] = lv
            if self.replanner is not None:
                self.replanner.observe_arrival(
                    now, lv.rid, lv.req.prompt_tokens, lv.req.output_tokens
                )
            self.router.arrive(lv.rid, lv.prompt, lv.max_new, now)
            self.decide(now)

        return handler

    # ---- prefill -----------------------------------------------------------------------

    def _dispatch(self, node: _Node, lv: _Live, now: float) -> None:
        if lv.generated == 0:
            lv.rec.prefill_start_s = now
        lv.rec.prefill_replica = node.replica.replica_id
        node.passes[lv.rid] = float(lv.prompt)
        self._kv_add(node, lv, lv.prompt)
        if node.replica.role == "mixed":
            self._stage_arrive(node, 0, _Job(True, [(lv, lv.epoch)]), now)
            return
        t = now
        service = 0.0
        times = self.cm.stage_times(
            node.layout, decode=False, tokens=lv.prompt, kv_out=node.replica.role == "prefill"
        )
        ready = []
        for i, s in enumerate(times):
            t = max(t, node.stage_free[i]) + s
            node.stage_free[i] = t
            self.busy[node.layout.devices[i]] += s
            service += s
            ready.append(t)
        lv.kv_ready = tuple(ready)
        if lv.generated == 0:
            lv.rec.prefill_service_s += service
        epoch, node_epoch = lv.epoch, node.epoch
        self.events.schedule(t, _FIRST, lambda at: self._prefilled(node, lv, at, epoch, node_epoch))

    def _prefilled(self, node: _Node, lv: _Live, now: float, epoch: int, node_epoch: int) -> None:
        if lv.epoch != epoch or node.epoch != node_epoch:
            return
        node.passes.pop(lv.rid, None)
        self.router.prefill_done(lv.rid, now)
        decoder = self.router.requests[lv.rid].decoder
        self._first_token(lv, now)
        if lv.generated >= lv.req.output_tokens:
            self._kv_free(node, lv)
            self._finish(lv, now)
        elif decoder is not None and decoder != node.replica.replica_id:
            # bound at dispatch: the stages hand the KV over without a bind message
            self._bind(self.nodes[decoder], lv, now, message_s=0.0)
        self.decide(now)

    def _first_token(self, lv: _Live, now: float) -> None:
        """A prefill yields the next token (the first one, or the next after a restart)."""
        if lv.generated == 0:
            lv.rec.first_token_s = now
        lv.generated += 1

    # ---- KV hand-off ---------------------------------------------------------------------

    def _bind(self, node: _Node, lv: _Live, now: float, message_s: float | None = None) -> None:
        lv.rec.decoder_replica = node.replica.replica_id
        src = self.nodes[lv.rec.prefill_replica or 0]
        epoch, node_epoch = lv.epoch, node.epoch
        message_s = self.bind_message_s if message_s is None else message_s
        if src is node:  # it flipped to decoding: the KV is already here
            self.events.schedule(
                now + message_s,
                _KV,
                lambda at: self._kv_arrived(src, node, lv, at, epoch, node_epoch, moved=False),
            )
            return
        self._kv_add(node, lv, lv.prompt)
        # Bound at dispatch (no bind message), each prefill stage sent its layers' KV as
        # soon as its pass was done, while the later stages computed; bound later, the KV
        # leaves when the bind arrives. Each piece crosses its sender's uplink, then its
        # receiver's downlink (the broker relays it message by message), then the
        # receiving agent takes it in (`CostModel.kv_delivery`).
        # The first step can start once each decoder stage will have its layers' KV by
        # the time the step reaches it (a later stage's KV may still be on its way while
        # the first stages compute).
        k = len(src.layout.devices)
        early = message_s == 0.0 and len(lv.kv_ready) == k
        _, stage_s = self._cycle(node, 1)
        reach = dict(zip(node.layout.devices, np.cumsum([0.0, *stage_s[:-1]]), strict=True))
        ready = lv.kv_ready if early else [now + message_s] * k
        pieces = self.cm.kv_delivery(
            src.layout, node.layout, lv.prompt, ready, self.up_free, self.down_free
        )
        done = max([now, *(t - float(reach[d]) for d, t in pieces)])
        self.events.schedule(
            done, _KV, lambda at: self._kv_arrived(src, node, lv, at, epoch, node_epoch)
        )

    def _kv_arrived(
        self,
        src: _Node,
        node: _Node,
        lv: _Live,
        now: float,
        epoch: int,
        node_epoch: int,
        *,
        moved: bool = True,
    ) -> None:
        if lv.epoch != epoch or node.epoch != node_epoch:
            return
        if moved:
            self._kv_free(src, lv)
        self.router.kv_moved(lv.rid, now)
        if node.replica.role == "mixed":
            self._decode_in_stages(node, [lv], now)
        else:
            node.joining.append(lv)
            if not node.stepping:
                self._step(node, now)
        self.decide(now)

    # ---- decoding ----------------------------------------------------------------------

    @staticmethod
    def _admit_one(node: _Node, lv: _Live, now: float) -> None:
        if np.isnan(lv.rec.decode_start_s):
            lv.rec.decode_start_s = now
            lv.rec.decoder_replica = node.replica.replica_id
        elif not np.isnan(lv.paused_at):
            lv.rec.decode_stall_s += now - lv.paused_at
            lv.paused_at = float("nan")
        node.active.append(lv)

    def _admit(self, node: _Node, now: float) -> None:
        for lv in node.joining:
            self._admit_one(node, lv, now)
        node.joining.clear()

    def _step(self, node: _Node, now: float) -> None:
        self._admit(node, now)
        if not node.active:
            node.stepping = False
            return
        node.stepping = True
        n = len(node.active)
        cycle, st = self._cycle(node, n)
        m = min(len(node.layout.devices), n)
        for d, s in zip(node.layout.devices, st, strict=True):
            self.busy[d] += m * s
        node_epoch = node.epoch
        self.events.schedule(now + cycle, _STEP, lambda t: self._step_done(node, t, node_epoch))

    def _step_done(self, node: _Node, now: float, node_epoch: int) -> None:
        if node.epoch != node_epoch:
            return
        still = [lv for lv in node.active if not self._token(node, lv, now)]
        finished = len(still) < len(node.active)
        node.active = still
        self._check_memory(node)
        self._step(node, now)
        if finished:
            self.decide(now)

    def _token(self, node: _Node, lv: _Live, now: float) -> bool:
        """A decode step gave `lv` its next token (its KV grows by one); True if that was
        its last, and it is finished and its KV freed."""
        lv.generated += 1
        node.kv_live[lv.rid] += 1.0
        node.kv_total += 1.0
        if lv.generated < lv.req.output_tokens:
            return False
        self._kv_free(node, lv)
        self._finish(lv, now)
        return True

    def _finish(self, lv: _Live, now: float) -> None:
        if not np.isnan(lv.paused_at):  # its restart's prefill gave its last token
            lv.rec.decode_stall_s += now - lv.paused_at
            lv.paused_at = float("nan")
        lv.rec.finish_s = now
        lv.rec.output_tokens = lv.req.output_tokens
        lv.rec.status = "done"
        self.router.finish(lv.rid, now)
        self.live.pop(lv.rid, None)
        if self.replanner is not None:
            self.replanner.observe_finish(now, lv.rid, lv.req.output_tokens)

    # ---- mixed replicas ------------------------------------------------------------------

    def _stage_arrive(self, node: _Node, i: int, job: _Job, now: float) -> None:
        if not node.stages:
            node.stages = [_Stage() for _ in node.layout.devices]
        stage = node.stages[i]
        job.arrived = now
        stage.queue.append(job)  # a batch's steps travel as one message (`DecodeBatch`)
        if not stage.busy:
            self._stage_start(node, i, now)

    def _stage_start(self, node: _Node, i: int, now: float) -> None:
        """Stage `i` takes the job at the head of its queue; decode steps queued one after
        another run as one batch of at most the micro-batch of the requests decoding
        here (as an agent batches consecutive decode messages). A decode step is stalled
        for the time the stage spent prefilling while it waited."""
        stage = node.stages[i]
        stage.busy = False
        job: _Job | None = None
        while stage.queue and job is None:
            head = stage.queue.popleft()
            if head.live():
                job = head
        if job is None:
            return
        if not job.prefill:
            cap = micro_batch(max(1, len(node.active)), len(node.stages))
            if len(job.lives) > cap:  # the rest run next
                stage.queue.appendleft(_Job(False, job.lives[cap:], job.arrived))
                job.lives = job.lives[:cap]
            self._stall(stage, job, now)
            while stage.queue and not stage.queue[0].prefill and len(job.lives) < cap:
                more = stage.queue[0]
                room = cap - len(job.lives)
                if len(more.live()) > room:  # the batch is full: the rest run next
                    taken = _Job(False, more.lives[:room], more.arrived)
                    more.lives = more.lives[room:]
                    more = taken
                else:
                    stage.queue.popleft()
                self._stall(stage, more, now)
                job.lives.extend(more.lives)
        if job.prefill:
            ((lv, _),) = job.lives
            s = self._stage_s(node, False, lv.prompt)[i]
            stage.prefills.append((now, now + s))
            if lv.generated == 0:
                lv.rec.prefill_service_s += s
        else:
            s = self._stage_s(node, True, len(job.lives))[i]
        stage.busy = True
        self.busy[node.layout.devices[i]] += s
        node_epoch = node.epoch
        self.events.schedule(
            now + s, _STEP, lambda at: self._stage_done(node, i, job, at, node_epoch)
        )

    @staticmethod
    def _stall(stage: _Stage, job: _Job, now: float) -> None:
        if not stage.prefills or stage.prefills[-1][1] <= job.arrived:
            return  # the stage prefilled nothing since the job arrived
        waited = 0.0
        for start, end in stage.prefills:
            waited += max(0.0, min(end, now) - max(start, job.arrived))
        for lv, _ in job.lives:
            lv.rec.decode_stall_s += waited

    def _stage_s(self, node: _Node, decode: bool, tokens: int) -> list[float]:
        key = (decode, tokens)
        if key not in node.stage_s:
            node.stage_s[key] = self.cm.stage_times(node.layout, decode=decode, tokens=tokens)
        return node.stage_s[key]

    def _stage_done(self, node: _Node, i: int, job: _Job, now: float, node_epoch: int) -> None:
        if node.epoch != node_epoch:
            return
        if i + 1 < len(node.stages):
            self._stage_arrive(node, i + 1, job, now)
        elif job.prefill:
            self._prefilled_in_stages(node, job, now)
        else:
            self._stepped_in_stages(node, job, now)
        self._stage_start(node, i, now)

    def _prefilled_in_stages(self, node: _Node, job: _Job, now: float) -> None:
        ((lv, epoch),) = job.lives
        if lv.epoch != epoch:
            return
        node.passes.pop(lv.rid, None)
        self.router.prefill_done(lv.rid, now)
        self._first_token(lv, now)
        if lv.generated >= lv.req.output_tokens:
            self._kv_free(node, lv)
            self._finish(lv, now)
        else:
            self._decode_in_stages(node, [lv], now)
        self.decide(now)

    def _decode_in_stages(self, node: _Node, lives: list[_Live], now: float) -> None:
        for lv in lives:
            self._admit_one(node, lv, now)
        self._check_memory(node)
        self._stage_arrive(node, 0, _Job(False, [(lv, lv.epoch) for lv in lives]), now)

    def _stepped_in_stages(self, node: _Node, job: _Job, now: float) -> None:
        """A batch of steps left the last stage: a token each; the rest go round again."""
        still = []
        finished = False
        for lv, epoch in job.live():
            if self._token(node, lv, now):
                node.active.remove(lv)
                finished = True
            else:
                still.append((lv, epoch))
        self._check_memory(node)
        if still:
            self._stage_arrive(node, 0, _Job(False, still), now)
        if finished:
            self.decide(now)

    # ---- re-planning ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        assert self.replanner is not None
        if self.state == "serving":
            self._apply(self.replanner.decide(now, self.plan, self.router.queued), now)
        if not (self.pending_arrivals or self.live):
            return
        busy = self.events.processed - self._ticks_seen
        self._ticks_seen = self.events.processed + 1
        self._idle_ticks = 0 if busy > 1 else self._idle_ticks + 1
        if self._idle_ticks > 100:
            raise SimulationError(
                f"stalled at {now:.0f} s: {len(self.live)} requests can no longer be served "
                f"by plan v{self.plan.version} (nothing happened for 100 re-planning ticks)"
            )
        self.events.schedule(now + self.replanner.tick_s, _TICK, self.tick)

    def _apply(self, decision: SwitchDecision, now: float) -> None:
        if isinstance(decision, Keep):
            return
        kind = "flip" if isinstance(decision, Flip) else "relayout"
        self.switches.append(f"{now:.1f} {kind}: {decision.reason}")
        if isinstance(decision, Flip):
            self.plan = decision.plan
            self.router.reconfigure(decision.plan)
            self.decide(now)
            return
        assert isinstance(decision, Relayout)
        self.state = "draining"
        self._pending_plan = decision.plan
        self._drain_until = now + self.switch.drain_timeout_s
        self.events.schedule(self._drain_until, _TICK, self._drain_over)
        self._maybe_switch(now)

    def _maybe_switch(self, now: float) -> None:
        """Flipped replicas take their new role; a drained re-layout goes ahead."""
        flipped = self.router.take_flipped()
        if flipped:
            new = {r.replica_id: r for r in self.plan.replicas}
            for rid in flipped:
                node = self.nodes[rid]
                node.replica = new[rid]
                node.cycles.clear()
                node.stage_s.clear()
                node.stage_free = [max(now, f) for f in node.stage_free]
        if self.state == "draining" and self.router.in_flight == 0:
            self._relayout(now)

    def _drain_over(self, now: float) -> None:
        if self.state == "draining":
            self._relayout(now)

    def _relayout(self, now: float) -> None:
        """Drop the old replicas; restart what still runs; resume once devices reloaded."""
        assert self._pending_plan is not None
        old, new = self.plan, self._pending_plan
        queued = [self.live[rid] for rid in self.router.queue]
        waiting = set(self.router.queue)
        for node in self.nodes.values():
            node.epoch += 1
        restarted = []
        for rid, lv in self.live.items():
            if rid in waiting:
                continue
            lv.epoch += 1
            if lv.generated > 0:
                lv.prompt = lv.req.prompt_tokens + lv.generated
                if not np.isnan(lv.rec.decode_start_s):
                    lv.paused_at = now
            else:
                lv.rec.prefill_service_s = 0.0
            restarted.append(lv)
        restarted.sort(key=lambda lv: lv.req.id)
        resume = now + reload_s(old, new, self.cm.model, self.switch)
        self.state = "reloading"
        self._pending_plan = None
        self._install(new, resume, restarted + queued)

        def serve(at: float) -> None:
            self.state = "serving"
            self.decide(at)

        self.events.schedule(resume, _WAKE, serve)


def simulate(
    plan: Plan,
    inventory: Inventory,
    model: ModelSpec,
    workload: Workload,
    requests: Sequence[Request],
    *,
    routing: Policy = "time",
    max_concurrency: int = 16,
    horizon_s: float = float("inf"),
    slo: SLO | None = None,
    bind_message_s: float = 0.001,
    switch: SwitchCost | None = None,
    replanner: Replanner | None = None,
    bind: Binding = "ready",
) -> SimResult:
    """Serve `requests` with `plan`; `workload` gives the mean lengths the cost model uses
    (decode context); `routing` is the router's policy and `bind` when it binds decoders
    (``dispatch``: as the runtime orchestrator does today); `replanner` may switch plans."""
    cm = CostModel(
        inventory, model, workload, max(max_concurrency, max(r.concurrency for r in plan.replicas))
    )
    cluster = _Cluster(
        plan,
        cm,
        routing,
        bind_message_s=bind_message_s,
        switch=switch or SwitchCost(),
        replanner=replanner,
        bind=bind,
    )
    records = [RequestRecord(str(r.id), r.arrival_s, r.prompt_tokens) for r in requests]
    cluster.pending_arrivals = len(requests)
    for r, rec in zip(requests, records, strict=True):
        lv = _Live(r, rec, r.prompt_tokens)
        cluster.events.schedule(r.arrival_s, _ARRIVAL, cluster.arrive(lv))
    if replanner is not None and requests:
        first = min(r.arrival_s for r in requests)
        cluster.events.schedule(first + replanner.tick_s, _TICK, cluster.tick)
    cluster.events.run(until=horizon_s)
    summary = summarize(records, slo)
    span = max(summary.makespan_s, 1e-12)
    return SimResult(
        summary=summary,
        records=tuple(records),
        utilisation={
            inventory.devices[d].id: float(min(1.0, cluster.busy[d] / span))
            for d in range(len(inventory))
        },
        events=cluster.events.processed,
        switches=tuple(cluster.switches),
    )
