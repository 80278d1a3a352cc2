"""The orchestrator's decisions, apart from doing them ("sans-I/O", like h11 or vLLM v1's
scheduler): `FogCore.handle(event, now) -> commands`.

No asyncio, no MQTT, no files, no clock: the shell (`fog.orchestrator`) turns bus messages
into events, feeds them in with the time, and turns the commands it gets back into
publishes. Planning (the GA) is the one slow computation: the core asks for it with a
`ComputePlan` command and learns the result from a `PlanComputed` event.

What it decides:
- the device registry and who is lost (last-will, error/stuck state, silence);
- the plan lifecycle (`PlanPhase`): wait for the expected devices, plan, publish, wait
  until every device of the plan is ready for it, serve; after a loss keep serving on the
  replicas that lost no device; before any other switch drain (no new dispatch, requests
  in flight may finish, bounded), then restart the rest seamlessly under the new plan;
- each request's lifecycle (`RequestStatus`): validate, queue (bounded), route (the
  simulator's own policy, `planner.routing.Router`, fed the same events: what is
  simulated is what runs; the decoder is bound at dispatch, since the devices hand the
  KV over as each prefill stage ends), stream tokens in order, finish or fail with
  an `ErrorCode`; each dispatch is a new *attempt*, so late messages of an abandoned
  attempt are ignored; a fault (lost replica, stall, device error) restarts the request
  from its prompt plus the tokens already streamed, at most `max_retries` times;
- re-planning on drift (with a `DriftPlanner`): the live mix (prompt and output lengths,
  arrival rate) is measured over a sliding window; every `tick_s` the core asks for a
  check (`CheckDrift`, run off the loop: it may search a plan) and, when the predicted
  waiting saved beats the switch, takes the answer: preferably a flip of roles or
  decoder concurrency on the same layouts (devices reconfigure, nothing reloads), or a
  re-layout; either is installed like any new plan (drain, bounded, then switch).

Every accepted request ends exactly once: with `done`, or an `error` event with a code.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from e2llm_edge.errors import ParamError
from e2llm_edge.fog.registry import Registry
from e2llm_edge.fog.textio import StreamDecoder
from e2llm_edge.params import GenerationParams, ModelLimits, check_prompt, validate
from e2llm_edge.wire import messages as m
from e2llm_edge.wire.messages import (
    AttemptKey,
    ClientId,
    DeviceStatus,
    ErrorCode,
    RequestEventData,
    RequestEventKind,
    RequestId,
    Sampling,
)
from planner import Inventory, Plan, Workload
from planner.drift import DriftPlanner, MixEstimator, enough_observed
from planner.errors import InventoryError
from planner.routing import Dispatch, Policy, Reject, Router
from planner.switch import Flip, Keep, Relayout, SwitchDecision


class PlanPhase(StrEnum):
    NONE = "none"
    """No plan yet: waiting for the devices the operator said to expect."""
    PLANNING = "planning"
    """A plan is being computed."""
    LOADING = "loading"
    """A plan is published; its devices are loading or not all confirmed ready."""
    SERVING = "serving"
    """Requests are dispatched (maybe on fewer replicas after a loss)."""
    DRAINING = "draining"
    """A new plan waits; no new dispatch, requests in flight may finish."""
    NO_PLAN = "no_plan"
    """The devices present cannot hold the model; requests fail fast."""


class RequestStatus(StrEnum):
    QUEUED = "queued"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    """The first token arrived: its KV cache is moving to the decoder."""
    DECODING = "decoding"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELLED = "cancelled"


LIVE = frozenset({RequestStatus.PREFILLING, RequestStatus.TRANSFERRING, RequestStatus.DECODING})
"""Statuses of a request running on devices."""


class TextCodec(Protocol):
    """The model's tokenizer and chat template (`fog.textio.ChatTokenizer` in the shell)."""

    def encode_prompt(self, prompt: str, raw: bool = False) -> list[int]: ...

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class ModelInfo:
    """What the core must know of the model."""

    context_length: int
    vocab_size: int
    n_layers: int
    eos_token_id: int | None = None


@dataclass(frozen=True)
class FogConfig:
    """Decisions' parameters (the shell's `OrchestratorConfig` carries them)."""

    orchestrator_id: str = "orchestrator"
    expect_devices: int = 1
    settle_s: float = 1.5
    method: str = "e2llm"
    seed: int = 0
    workload: Workload = field(default_factory=lambda: Workload(256, 128, 0.5))
    min_tokens_per_s: float = 15.0
    request_timeout: float = 60.0
    heartbeat_timeout: float = 6.0
    max_queue: int = 1024
    max_retries: int = 5
    drain_timeout: float = 10.0
    loss_drain_timeout: float = 1.0
    regroup_after: float = 30.0
    replay_cache: int = 512
    summary_every_s: float = 2.0
    will_grace_s: float = 0.4
    """A device's last-will counts once we are still connected this long after it: a
    broker shutting down publishes every client's will just before it drops us too, and
    that must not look like every device dying at once (a re-plan at each broker restart)."""
    routing: Policy = "time"
    """The router's policy (`planner.routing`; the simulator's default too)."""


# --------------------------------------------------------------------------- events


@dataclass(frozen=True)
class DeviceStateSeen:
    device_id: str
    msg: m.DeviceState
    retained: bool = False


@dataclass(frozen=True)
class DeviceProfileSeen:
    device_id: str
    msg: m.DeviceProfileMsg


@dataclass(frozen=True)
class DeviceHeard:
    """A heartbeat (or any live message) from a device."""

    device_id: str


@dataclass(frozen=True)
class PlanSeen:
    """A plan on the plan topic: retained from a predecessor, or our own echo."""

    plan: Plan
    retained: bool


@dataclass(frozen=True)
class TokenArrived:
    device_id: str
    msg: m.TokenOut


@dataclass(frozen=True)
class DeviceErrorArrived:
    device_id: str
    msg: m.ErrorReport


@dataclass(frozen=True)
class RequestArrived:
    client_id: str
    msg: m.GenerateRequest


@dataclass(frozen=True)
class BadRequestArrived:
    """A request that failed to decode; answerable if its id could be read."""

    client_id: str
    request_id: str | None
    error: str


@dataclass(frozen=True)
class CancelArrived:
    client_id: str
    msg: m.Release


@dataclass(frozen=True)
class PlanComputed:
    """The answer to a `ComputePlan`: a plan, or why there is none."""

    version: int
    plan: Plan | None
    error: str | None = None
    infeasible: bool = False


@dataclass(frozen=True)
class DriftChecked:
    """The answer to a `CheckDrift` for plan `version`."""

    version: int
    decision: SwitchDecision


@dataclass(frozen=True)
class Reconnected:
    """Our broker connection came back: messages in flight may be lost."""


@dataclass(frozen=True)
class Tick:
    pass


Event = (
    DeviceStateSeen
    | DeviceProfileSeen
    | DeviceHeard
    | PlanSeen
    | TokenArrived
    | DeviceErrorArrived
    | RequestArrived
    | BadRequestArrived
    | CancelArrived
    | PlanComputed
    | DriftChecked
    | Reconnected
    | Tick
)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Send:
    """Work or a release for one device's inbox."""

    device_id: str
    msg: m.PrefillStart | m.Release


@dataclass(frozen=True)
class Answer:
    """One response event to a client."""

    client_id: str
    msg: m.ResponseEvent


@dataclass(frozen=True)
class PublishPlan:
    plan: Plan


@dataclass(frozen=True)
class ComputePlan:
    """Run the planner (slow) and report back with `PlanComputed(version, ...)`."""

    version: int
    inventory: Inventory
    method: str
    seed: int
    workload: Workload
    min_tokens_per_s: float


@dataclass(frozen=True)
class CheckDrift:
    """Weigh a switch for the live mix (seconds: run it off the loop, then report back
    with `DriftChecked(version, run())`). The core leaves `planner` alone meanwhile."""

    version: int
    now: float
    plan: Plan
    queued: int
    workload: Workload
    inventory: Inventory
    planner: DriftPlanner

    def run(self) -> SwitchDecision:
        self.planner.inventory = self.inventory
        return self.planner.decide_for(self.now, self.plan, self.queued, self.workload)


@dataclass(frozen=True)
class Notify:
    """A request lifecycle event for monitors."""

    request_id: str
    kind: RequestEventKind
    data: RequestEventData


@dataclass(frozen=True)
class PublishSummary:
    summary: m.ClusterSummary


@dataclass(frozen=True)
class Log:
    """Something an operator should read (the shell logs it, rate-limited by `key`)."""

    level: str
    key: str
    text: str


Command = Send | Answer | PublishPlan | ComputePlan | CheckDrift | Notify | PublishSummary | Log


# --------------------------------------------------------------------------- requests


@dataclass
class Route:
    """Where the current attempt runs."""

    prefill: int
    decoder: int
    plan_version: int
    dispatched: float


@dataclass
class Request:
    """One request from arrival to its last event."""

    rid: RequestId
    client: ClientId
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    text: StreamDecoder
    arrived: float
    status: RequestStatus = RequestStatus.QUEUED
    attempt: int = 0
    generated: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    route: Route | None = None
    queued_at: float = 0.0
    first_dispatch: float | None = None
    first_token: float | None = None
    progress: float = 0.0
    waiting_s: float = 0.0
    """Time queued at the fog node (each wait, re-queues included) plus what devices
    reported: prefill queueing at stages, the first decode step waiting for the KV."""
    retries: int = 0
    restarts: int = 0

    @property
    def key(self) -> AttemptKey:
        return AttemptKey(self.rid, self.attempt)

    @property
    def running(self) -> bool:
        return self.status in LIVE


@dataclass
class Replay:
    """What a finished request sent its client, to send again on a re-submission."""

    client: str
    generated: list[int]
    texts: list[str]
    final: m.ResponseEvent


# --------------------------------------------------------------------------- the core


class FogCore:
    """All decisions of one serving orchestrator. Feed `handle(event, now)`; execute what
    it returns, in order."""

    def __init__(
        self,
        cfg: FogConfig,
        model: ModelInfo,
        text: TextCodec,
        *,
        registry: Registry | None = None,
        epoch: int = 0,
        pinned: Plan | None = None,
        started: float = 0.0,
        drift: DriftPlanner | None = None,
    ) -> None:
        self.cfg = cfg
        self.model = model
        self.text = text
        self.limits = ModelLimits(model.context_length, model.vocab_size)
        self.registry = registry or Registry()
        self.epoch = epoch
        self.pinned = pinned
        """A plan (e.g. from `e2llm plan -o`) used instead of planning while all of its
        devices are available."""
        self.inherited: Plan | None = None
        """The retained plan of a predecessor orchestrator: adopted (version bumped, no
        reload) while all its devices are present."""
        self.inherit_until = 0.0
        """How long to wait for the inherited plan's devices before planning anew."""
        self.offline_since: dict[str, float] = {}
        """Devices whose last-will came, not yet acted on (`FogConfig.will_grace_s`)."""
        self.started = started
        self.phase = PlanPhase.NONE
        self.plan: Plan | None = None
        self.version = 0
        self.plan_error: str | None = None
        self.pending: Plan | None = None
        self.drain_until = 0.0
        self.dead: set[int] = set()
        """Replicas of the current plan that lost a device (no dispatch to them)."""
        self.router: Router | None = None
        """Routing state of the current plan (the queue mirrored in its order)."""
        self.requests: dict[str, Request] = {}
        self.queue: deque[str] = deque()
        self.finished: OrderedDict[str, Replay] = OrderedDict()
        self.replan_at: float | None = None
        self.planning_version: int | None = None
        self.ever_planned = False
        self.regroup_at: float | None = None
        self.confirm_after = 0.0
        self.recovering_since: float | None = None
        self.recoveries: deque[float] = deque(maxlen=64)
        self.last_summary = -1e9
        self.completed = self.failed = self.restarted = self.tokens_out = 0
        self.waits: deque[float] = deque(maxlen=256)
        self.ttfts: deque[float] = deque(maxlen=256)
        self.now = started
        self.drift = drift
        """Re-planning on drift (None: the plan changes only with the devices)."""
        self.mix = MixEstimator(drift.config.window_s, drift.config.recent) if drift else None
        self.drift_checking: int | None = None
        """Plan version a drift check is running for."""
        self.drift_checked = started
        self._out: list[Command] = []

    # ------------------------------------------------------------------ entry point

    def handle(self, event: Event, now: float) -> list[Command]:
        """Decide what `event` at time `now` changes; returns the commands to run."""
        self._out = []
        self.now = now
        handler = self._handlers[type(event)]
        handler(self, event)
        self._dispatch()
        if now - self.last_summary >= self.cfg.summary_every_s:
            self.last_summary = now
            self._emit(PublishSummary(self.summary()))
        out, self._out = self._out, []
        return out

    def next_wakeup(self) -> float | None:
        """When the router can dispatch a waiting request if nothing else happens first
        (the shell ticks then, not only every tick period)."""
        if self.router is None or self.phase != PlanPhase.SERVING or self.pending is not None:
            return None
        return self.router.next_wakeup()

    def _emit(self, cmd: Command) -> None:
        self._out.append(cmd)

    def _log(self, level: str, key: str, text: str) -> None:
        self._emit(Log(level, key, text))

    # ------------------------------------------------------------------ devices

    def _on_state(self, ev: DeviceStateSeen) -> None:
        dev, msg = ev.device_id, ev.msg
        self.registry.state(dev, msg, self.now, retained=ev.retained)
        watched = dev in self._watched()
        if msg.status == DeviceStatus.OFFLINE:
            if watched and not ev.retained:
                self.offline_since.setdefault(dev, self.now)  # acted on after the grace
            elif watched:
                self._lost(dev, "went offline")
            return
        self.offline_since.pop(dev, None)
        if msg.status in (DeviceStatus.ERROR, DeviceStatus.STUCK):
            if watched:
                self._lost(dev, f"reported {msg.status.value}: {msg.last_error}")
            return
        if dev in self.registry.lost and not ev.retained:
            self.registry.lost.discard(dev)
            self._schedule_replan(f"device {dev} is back")
        if watched and not ev.retained and msg.plan_version > self.version:
            self._moved_on(dev, msg.plan_version)
        self._check_serving()

    def _moved_on(self, dev: str, version: int) -> None:
        """A device of ours runs a newer plan than ours: another orchestrator has taken
        over (ours will see its lease and step down). Stop dispatching into a cluster we
        no longer steer; what runs here restarts (not the requests' fault)."""
        if self.phase == PlanPhase.SERVING:
            self._log(
                "warning",
                "moved-on",
                f"device {dev} runs plan v{version}, ours is v{self.version}: "
                "another orchestrator serves; dispatch stops",
            )
            self.phase = PlanPhase.LOADING
        self._requeue(lambda r: True, f"device {dev} moved on to plan v{version}", fault=False)

    def _on_profile(self, ev: DeviceProfileSeen) -> None:
        if self.registry.profile(ev.device_id, ev.msg, self.now):
            self._schedule_replan(f"device profile from {ev.device_id}")

    def _on_heard(self, ev: DeviceHeard) -> None:
        self.registry.heard(ev.device_id, self.now)

    def _on_plan_seen(self, ev: PlanSeen) -> None:
        if ev.plan.version > self.version and self.plan is None:
            # a predecessor's plan: continue its numbering, and adopt it as soon as its
            # devices' retained states are in (a takeover reloads nothing)
            self.version = ev.plan.version
            self.inherited = ev.plan
            self.inherit_until = self.now + self.cfg.settle_s
            self.replan_at = self.now

    def _lost(self, dev: str, why: str) -> None:
        """Stop using the replicas holding `dev`; their requests restart on the others."""
        if dev in self.registry.lost:
            return
        self._log("warning", f"lost:{dev}", f"device {dev} lost: {why}")
        self.registry.lost.add(dev)
        if self.recovering_since is None:
            self.recovering_since = self.now
        if self.pending is not None and dev in _devices(self.pending):
            self._log("info", "pending", f"pending plan v{self.pending.version} needs {dev}")
            self.pending = None
            self._settle_phase()
        if self.plan is not None:
            hit = {r.replica_id for r in self.plan.replicas if dev in _replica_devices(r)}
            self.dead |= hit
            if self.router is not None:
                self.router.exclude(hit)
            self._requeue(
                lambda r: (
                    r.route is not None and (r.route.prefill in hit or r.route.decoder in hit)
                ),
                f"device {dev} {why}",
                fault=True,
            )
            if not self._can_serve() and self.phase == PlanPhase.SERVING:
                self.phase = PlanPhase.LOADING
        self.replan_at = self.now  # capacity is short: plan again at once

    def _settle_phase(self) -> None:
        """The phase when no plan is pending: serving means every live device is ready."""
        if self.plan is None:
            self.phase = PlanPhase.NO_PLAN if self.plan_error else PlanPhase.NONE
            return
        self.phase = PlanPhase.LOADING
        self._check_serving()

    # ------------------------------------------------------------------ planning

    def _watched(self) -> set[str]:
        devs = _devices(self.plan) if self.plan is not None else set()
        if self.pending is not None:
            devs |= _devices(self.pending)
        return devs

    def _live_devices(self) -> set[str]:
        if self.plan is None:
            return set()
        return {
            s.device_id
            for r in self.plan.replicas
            if r.replica_id not in self.dead
            for s in r.stages
        }

    def _dead_devices(self) -> set[str]:
        if self.plan is None:
            return set()
        return {
            s.device_id for r in self.plan.replicas if r.replica_id in self.dead for s in r.stages
        }

    def _can_serve(self) -> bool:
        if self.plan is None:
            return False
        return self.plan.without(self._dead_devices(), self.version) is not None

    def _schedule_replan(self, why: str) -> None:
        self._log("info", "replan", f"re-plan scheduled: {why}")
        self.replan_at = self.now + self.cfg.settle_s

    def _maybe_plan(self) -> None:
        if self.pending is not None:
            self._maybe_switch()
            return
        if self.regroup_at is not None and self.now >= self.regroup_at:
            self.regroup_at = None
            self.replan_at = self.now
        if self.planning_version is not None:
            return
        avail = self.registry.available()
        version = self.version + 1
        plan = None
        if self.inherited is not None:
            # a takeover: adopt the predecessor's plan as soon as its devices are known,
            # without the usual settling (every second here is a second without service)
            if _devices(self.inherited) <= set(avail):
                plan = _renumbered(self.inherited, version)
            elif self.now < self.inherit_until:
                return  # its devices' retained states may still be on their way
            self.inherited = None
        if plan is None and (self.replan_at is None or self.now < self.replan_at):
            return
        if plan is None:
            if not self.ever_planned and len(avail) < self.cfg.expect_devices:
                return  # wait for the devices the operator said to expect
            if not avail:
                return
            if self.pinned is not None and _devices(self.pinned) <= set(avail):
                plan = _renumbered(self.pinned, version)
        self.replan_at = None
        if plan is None and self.plan is not None and self.dead:
            plan = self.plan.without(self._dead_devices(), version)
            if plan is not None:
                self._log(
                    "info",
                    "survivors",
                    f"plan v{version}: the replicas that lost no device, as they are",
                )
                if set(avail) - _devices(plan):
                    self.regroup_at = self.now + self.cfg.regroup_after
        if plan is not None:
            self._adopt(plan)
            return
        try:
            inv, problems = self.registry.inventory(avail)
        except InventoryError as exc:
            self._no_plan(f"no usable device among {avail}: {exc}")
            return
        for p in problems:
            self._log("warning", f"profile:{p.split()[0]}", p)
        self.planning_version = version
        if self.phase in (PlanPhase.NONE, PlanPhase.NO_PLAN):
            self.phase = PlanPhase.PLANNING
        self._emit(
            ComputePlan(
                version,
                inv,
                self.cfg.method,
                self.cfg.seed,
                self.cfg.workload,
                self.cfg.min_tokens_per_s,
            )
        )

    def _on_plan_computed(self, ev: PlanComputed) -> None:
        if ev.version != self.planning_version:
            return  # an answer to a question no longer asked
        self.planning_version = None
        if ev.plan is None:
            if ev.infeasible:
                grace_end = self.confirm_after + self.cfg.heartbeat_timeout
                if self.confirm_after > 0 and self.now < grace_end:
                    # just back on the broker: devices not heard again yet are no proof the
                    # model cannot be held; look again later
                    self.replan_at = grace_end
                    return
                self._no_plan(
                    f"no plan can hold the model with devices "
                    f"{self.registry.available()}: {ev.error}"
                )
            else:
                self.plan_error = f"planning failed: {ev.error}"
                self._log("warning", "planning", self.plan_error)
                if self.phase == PlanPhase.PLANNING:
                    self.phase = PlanPhase.NONE
            return
        self._adopt(ev.plan)

    def _no_plan(self, why: str) -> None:
        self.plan_error = why
        self._log("warning", "no_plan", why)
        self._requeue(lambda r: True, "plan withdrawn", fault=False)
        self.plan, self.pending, self.dead, self.router = None, None, set(), None
        self.phase = PlanPhase.NO_PLAN
        for rid in list(self.queue):
            req = self.requests.get(rid)
            if req is not None:
                self._fail(req, ErrorCode.NO_PLAN, why)

    def _adopt(self, plan: Plan) -> None:
        """A new plan is ready: switch to it (after a drain), unless nothing changes."""
        self.ever_planned = True
        self.plan_error = None
        if _devices(plan) & self.registry.lost:
            self.replan_at = self.now  # a device went away while we planned
            if self.phase == PlanPhase.PLANNING:
                self.phase = PlanPhase.NONE
            return
        if self.plan is not None and not self.dead and _same_layout(plan, self.plan):
            self._log("info", "same", f"re-plan keeps the layout of plan v{self.version}")
            return
        self.pending = plan
        bound = (
            self.cfg.loss_drain_timeout
            if self.dead or self.plan is None
            else (self.cfg.drain_timeout)
        )
        self.drain_until = self.now + bound
        if any(r.running for r in self.requests.values()):
            self.phase = PlanPhase.DRAINING
        self._maybe_switch()

    def _maybe_switch(self) -> None:
        """Install the pending plan once the drain is over (nothing running, or timed out)."""
        if self.pending is None:
            return
        if any(r.running for r in self.requests.values()) and self.now < self.drain_until:
            return
        plan, self.pending = self.pending, None
        self._requeue(lambda r: True, f"plan v{plan.version} replaces v{self.version}", fault=False)
        self.plan, self.version, self.dead = plan, plan.version, set()
        self.phase = PlanPhase.LOADING
        self.router = Router(
            plan,
            self.cfg.routing,
            # the mix the plan was made for (a drift switch's is the live one)
            mean_output_tokens=plan.figure(
                "mean_output_tokens", self.cfg.workload.mean_output_tokens
            ),
            bind="dispatch",
        )
        for rid in self.queue:
            self._route_arrival(self.requests[rid], front=False)
        self._emit(PublishPlan(plan))
        self._log("info", "plan", f"published plan v{plan.version}: {describe_plan(plan)}")
        self._check_serving()

    def _check_serving(self) -> None:
        """Serve a plan once every device of its live replicas is ready for it."""
        if self.plan is None or self.phase != PlanPhase.LOADING or not self._can_serve():
            return
        if not self.registry.ready_for(self._live_devices(), self.version, self.confirm_after):
            return
        self.phase = PlanPhase.SERVING
        if self.recovering_since is not None and not self.dead:
            self.recoveries.append(self.now - self.recovering_since)
            self._log(
                "info",
                "serving",
                f"plan v{self.version} serving, "
                f"{self.now - self.recovering_since:.2f} s after the device loss",
            )
            self.recovering_since = None
        else:
            self._log("info", "serving", f"plan v{self.version} serving")

    # ------------------------------------------------------------------ requests

    def _on_request(self, ev: RequestArrived) -> None:
        msg, client = ev.msg, ClientId(ev.client_id)
        rid = msg.request_id
        if rid in self.requests or rid in self.finished:
            # QoS 1 redelivery, or a client re-sending after a reconnect: send it again
            # what it may have missed (it drops the indices it already holds)
            self._replay(client, rid)
            return
        try:
            params = GenerationParams(
                max_new_tokens=msg.max_new_tokens,
                temperature=msg.temperature,
                top_p=msg.top_p,
                seed=0 if msg.seed is None else msg.seed,
                raw=msg.raw,
            )
            ids = self._prompt_ids(msg)
            validate(params, ids, self.limits, prompt=msg.prompt)
            resume = list(msg.resume)
            if len(resume) > msg.max_new_tokens:
                raise ParamError(
                    "resume",
                    f"resume holds {len(resume)} tokens, max_new_tokens is {msg.max_new_tokens}",
                )
            if any(not 0 <= t < self.model.vocab_size for t in resume):
                raise ParamError("resume", f"resume ids must be in [0, {self.model.vocab_size})")
        except ParamError as exc:  # the one validation the local path applies too
            self._answer_error(client, rid, ErrorCode.BAD_REQUEST, str(exc))
            return
        sampling = params.sampling()
        if self.phase == PlanPhase.NO_PLAN and self.plan_error is not None:
            self._answer_error(client, rid, ErrorCode.NO_PLAN, self.plan_error)
            return
        if len(self.queue) >= self.cfg.max_queue:
            self._answer_error(
                client, rid, ErrorCode.OVERLOADED, f"{len(self.queue)} requests already waiting"
            )
            return
        req = Request(
            rid=rid,
            client=client,
            prompt_ids=ids,
            max_new_tokens=msg.max_new_tokens,
            sampling=sampling,
            text=StreamDecoder(self.text),
            arrived=self.now,
            queued_at=self.now,
            progress=self.now,
        )
        for tok in resume:  # a takeover: continue the answer the client already holds
            req.generated.append(tok)
            req.texts.append(req.text.push(tok))
        self.requests[rid] = req
        self._notify(rid, RequestEventKind.QUEUED, RequestEventData(prompt_tokens=len(ids)))
        if resume and resume[-1] == self.model.eos_token_id:
            self._finish(req, "stop")  # the client holds the whole answer but its end
        elif len(resume) >= msg.max_new_tokens:
            self._finish(req, "length")
        else:
            self.queue.append(rid)
            self._route_arrival(req, front=False)
            if self.mix is not None:
                self.mix.observe_arrival(self.now, rid, len(ids), msg.max_new_tokens)

    def _route_arrival(self, req: Request, *, front: bool) -> None:
        """The router queues it too (at the back, or at the front for a restart), with the
        prompt it will be prefilled with and the tokens it may still generate."""
        if self.router is None:
            return
        prompt = len(req.prompt_ids) + len(req.generated)
        left = req.max_new_tokens - len(req.generated)
        if front:
            self.router.restart(req.rid, prompt, left, self.now)
        else:
            self.router.arrive(req.rid, prompt, left, self.now)

    def _prompt_ids(self, msg: m.GenerateRequest) -> list[int]:
        """The prompt's token ids; ParamError when the request's prompt forms are wrong."""
        given = [x is not None for x in (msg.prompt, msg.messages, msg.prompt_ids)]
        if sum(given) != 1:
            raise ParamError("prompt", "give exactly one of prompt, messages or prompt_ids")
        if msg.prompt is not None:
            check_prompt(msg.prompt)
            return self.text.encode_prompt(msg.prompt, raw=msg.raw)
        if msg.messages is not None:
            if not any(x.content.strip() for x in msg.messages):
                raise ParamError("messages", "empty conversation: nothing to generate from")
            return self.text.encode_messages(
                [{"role": x.role, "content": x.content} for x in msg.messages]
            )
        return list(msg.prompt_ids or [])

    def _on_bad_request(self, ev: BadRequestArrived) -> None:
        rid = ev.request_id or "invalid"
        self._answer_error(
            ClientId(ev.client_id), rid, ErrorCode.BAD_REQUEST, f"malformed request: {ev.error}"
        )

    def _on_cancel(self, ev: CancelArrived) -> None:
        req = self.requests.get(ev.msg.request_id)
        if req is not None and req.client == ev.client_id:
            self._fail(
                req,
                ErrorCode.CANCELLED,
                ev.msg.reason or "cancelled by the client",
                status=RequestStatus.CANCELLED,
            )

    def _replay(self, client: str, rid: str) -> None:
        req = self.requests.get(rid)
        done = self.finished.get(rid)
        src: Request | Replay | None = req if req is not None else done
        if src is None or src.client != client:
            return
        for i, (tok, text) in enumerate(zip(src.generated, src.texts, strict=True)):
            self._answer(
                ClientId(client),
                m.ResponseEvent(
                    request_id=RequestId(rid), event="token", token_ids=[tok], text=text, index=i
                ),
            )
        if done is not None:
            self._answer(ClientId(client), done.final)

    def _dispatch(self) -> None:
        """Start what the router decides now (it waits for a prefill pipeline and a decoder
        slot with room for the request's KV)."""
        if (
            self.phase != PlanPhase.SERVING
            or self.plan is None
            or self.pending is not None
            or self.router is None
        ):
            return
        for decision in self.router.decide(self.now):
            req = self.requests[decision.request_id]
            if isinstance(decision, Reject):
                self._fail(req, ErrorCode.BAD_REQUEST, decision.reason)
                continue
            assert isinstance(decision, Dispatch) and decision.decoder is not None, (
                f"bound at dispatch, got {decision}"
            )
            self.queue.remove(req.rid)
            self._start(req, decision.replica_id, decision.decoder)

    def _start(self, req: Request, p: int, d: int) -> None:
        assert self.plan is not None
        prompt = req.prompt_ids + req.generated
        req.route = Route(p, d, self.version, self.now)
        req.status = RequestStatus.PREFILLING
        req.progress = self.now
        req.waiting_s += self.now - req.queued_at
        if req.first_dispatch is None:
            req.first_dispatch = self.now
            self.waits.append(self.now - req.arrived)
        embed_dev = next(s.device_id for s in self.plan.replica(p).stages if s.embed)
        self._emit(
            Send(
                embed_dev,
                m.PrefillStart(
                    request_id=req.rid,
                    attempt=req.attempt,
                    token_ids=prompt,
                    decoder_replica=d,
                    sampling=req.sampling,
                    max_new_tokens=req.max_new_tokens,
                    generated=list(req.generated),
                    plan_version=self.version,
                ),
            )
        )
        self._notify(
            req.rid,
            RequestEventKind.ROUTED,
            RequestEventData(
                prefill_replica=p,
                decoder_replica=d,
                plan_version=self.version,
                retry=req.retries,
                attempt=req.attempt,
            ),
        )

    def _on_token(self, ev: TokenArrived) -> None:
        self.registry.heard(ev.device_id, self.now)
        msg = ev.msg
        req = self.requests.get(msg.request_id)
        if (
            req is None
            or msg.attempt != req.attempt
            or req.route is None
            or msg.plan_version != req.route.plan_version
        ):
            return  # late token of a finished, failed or abandoned attempt
        if msg.index != len(req.generated):
            if msg.index > len(req.generated):
                self._log(
                    "warning",
                    "gap",
                    f"request {req.rid}: token {msg.index} arrived, expected {len(req.generated)}",
                )
            return  # duplicate (QoS 1 redelivery) or gap
        req.progress = self.now
        if req.status == RequestStatus.PREFILLING:
            req.status = RequestStatus.TRANSFERRING
            if self.router is not None and req.route.plan_version == self.version:
                self.router.prefill_done(req.rid, self.now)
            if msg.timings is not None:
                req.waiting_s += msg.timings.prefill_queued_s
            if req.first_token is None:
                req.first_token = self.now
                self.ttfts.append(self.now - req.arrived)
                self._notify(
                    req.rid,
                    RequestEventKind.FIRST_TOKEN,
                    RequestEventData(ttft_s=round(self.now - req.arrived, 4)),
                )
        elif req.status == RequestStatus.TRANSFERRING:
            req.status = RequestStatus.DECODING
            if self.router is not None and req.route.plan_version == self.version:
                self.router.kv_moved(req.rid, self.now)  # the decoder ran a step: it has it
            if msg.timings is not None:
                req.waiting_s += msg.timings.kv_wait_s
        elif msg.timings is not None:  # decoding: stalled behind other prompts' prefill
            req.waiting_s += msg.timings.decode_stall_s
        req.generated.append(msg.token_id)
        text = req.text.push(msg.token_id)
        req.texts.append(text)
        self.tokens_out += 1
        self._answer(
            req.client,
            m.ResponseEvent(
                request_id=req.rid,
                event="token",
                token_ids=[msg.token_id],
                text=text,
                index=msg.index,
            ),
        )
        if msg.finished:
            self._finish(req, msg.finish_reason or "stop")

    def _finish(self, req: Request, reason: m.FinishReason) -> None:
        self._release_slots(req)
        if self.mix is not None:
            self.mix.observe_finish(self.now, req.rid, len(req.generated))
        req.status = RequestStatus.FINISHED
        self.requests.pop(req.rid, None)
        self.completed += 1
        first = req.first_token if req.first_token is not None else self.now
        n = len(req.generated)
        route = req.route
        stats = m.RequestStats(
            prompt_ids=req.prompt_ids,
            prompt_tokens=len(req.prompt_ids),
            new_tokens=n,
            queue_wait_s=round((req.first_dispatch or self.now) - req.arrived, 4),
            waiting_s=round(req.waiting_s, 4),
            ttft_s=round(first - req.arrived, 4),
            total_s=round(self.now - req.arrived, 4),
            decode_tokens_per_s=round((n - 1) / (self.now - first), 2)
            if n > 1 and self.now > first
            else 0.0,
            prefill_replica=route.prefill if route else None,
            decoder_replica=route.decoder if route else None,
            plan_version=route.plan_version if route else self.version,
            retries=req.retries,
            restarts=req.restarts,
        )
        final = m.ResponseEvent(
            request_id=req.rid,
            event="done",
            token_ids=list(req.generated),
            text=self.text.decode(req.generated),
            index=n,
            finish_reason=reason,
            stats=stats,
        )
        self._remember(req, final)
        self._answer(req.client, final)
        self._notify(
            req.rid,
            RequestEventKind.DONE,
            RequestEventData(
                prompt_tokens=stats.prompt_tokens,
                new_tokens=n,
                waiting_s=stats.waiting_s,
                ttft_s=stats.ttft_s,
                total_s=stats.total_s,
                decode_tokens_per_s=stats.decode_tokens_per_s,
                prefill_replica=stats.prefill_replica,
                decoder_replica=stats.decoder_replica,
                plan_version=stats.plan_version,
                retry=req.retries,
            ),
        )
        self._maybe_switch()

    def _fail(
        self,
        req: Request,
        code: ErrorCode,
        text: str,
        status: RequestStatus = RequestStatus.FAILED,
    ) -> None:
        """End a request with an error event; its devices drop their state."""
        self._release_on_devices(req)
        self._release_slots(req)
        if self.mix is not None:
            self.mix.observe_finish(self.now, req.rid, len(req.generated))
        req.status = status
        self.requests.pop(req.rid, None)
        with contextlib.suppress(ValueError):
            self.queue.remove(req.rid)
        self.failed += 1
        final = m.ResponseEvent(
            request_id=req.rid,
            event="error",
            error_code=code,
            error=text,
            token_ids=list(req.generated),
            index=len(req.generated),
        )
        self._remember(req, final)
        self._answer(req.client, final)
        self._notify(req.rid, RequestEventKind.FAILED, RequestEventData(code=code))
        self._maybe_switch()

    def _release_slots(self, req: Request) -> None:
        """The router forgets it: queue place, prefill pipeline, decoder slot, KV."""
        if self.router is not None:
            self.router.finish(req.rid, self.now)
        req.route = None

    def _release_on_devices(self, req: Request) -> None:
        """The devices of the current attempt free its state now (they would anyway after
        their request timeout)."""
        route = req.route
        if self.plan is None or route is None or route.plan_version != self.version:
            return
        devs: set[str] = set()
        for rep in (route.prefill, route.decoder):
            with contextlib.suppress(KeyError):
                devs |= _replica_devices(self.plan.replica(rep))
        for dev in sorted(devs - self.registry.lost):
            self._emit(
                Send(
                    dev,
                    m.Release(
                        request_id=req.rid,
                        attempt=req.attempt,
                        reason="orchestrator",
                        plan_version=self.version,
                    ),
                )
            )

    def _requeue(self, which: Callable[[Request], bool], why: str, *, fault: bool) -> None:
        """Running requests picked by `which` abandon their attempt and go back to the
        front of the queue; they continue from the tokens already streamed. A fault counts
        against `max_retries`."""
        running = [r for r in self.requests.values() if r.running and which(r)]
        for req in sorted(running, key=lambda x: x.arrived, reverse=True):
            self._release_on_devices(req)
            self._release_slots(req)
            req.restarts += 1
            self.restarted += 1
            if fault:
                req.retries += 1
                if req.retries > self.cfg.max_retries:
                    self._fail(
                        req,
                        ErrorCode.RETRIES_EXHAUSTED,
                        f"{why}; gave up after {self.cfg.max_retries} faults",
                    )
                    continue
            req.attempt += 1
            req.status = RequestStatus.QUEUED
            req.queued_at = self.now
            self.queue.appendleft(req.rid)
            self._route_arrival(req, front=True)
            self._notify(
                req.rid,
                RequestEventKind.REQUEUED,
                RequestEventData(reason=why, generated=len(req.generated), fault=fault),
            )

    def _on_device_error(self, ev: DeviceErrorArrived) -> None:
        """A device could not go on with the live attempt: retry it (bounded)."""
        self.registry.heard(ev.device_id, self.now)
        msg = ev.msg
        if msg.request_id is None:
            return
        req = self.requests.get(msg.request_id)
        if req is None or msg.attempt not in (None, req.attempt) or not req.running:
            return  # about an abandoned attempt, or not ours
        why = f"device {ev.device_id}: {msg.code.value}: {msg.message}"
        if msg.code == ErrorCode.PLAN_VERSION and msg.plan_version > self.version:
            self._moved_on(ev.device_id, msg.plan_version)
            return
        if req.retries >= self.cfg.max_retries:
            self._fail(req, msg.code, why)
            return
        self._requeue_one(req, why)

    def _requeue_one(self, req: Request, why: str) -> None:
        self._requeue(lambda r: r is req, why, fault=True)

    def _remember(self, req: Request, final: m.ResponseEvent) -> None:
        self.finished[req.rid] = Replay(req.client, list(req.generated), list(req.texts), final)
        while len(self.finished) > self.cfg.replay_cache:
            self.finished.popitem(last=False)

    # ------------------------------------------------------------------ time

    def _on_tick(self, ev: Tick) -> None:
        for dev, since in list(self.offline_since.items()):
            if self.now - since >= self.cfg.will_grace_s:
                del self.offline_since[dev]
                if dev in self._watched():
                    self._lost(dev, "went offline")
                    self._dispatch()  # restart on the survivors before any re-plan
        for dev, quiet in self.registry.silent(
            self._watched(), self.now, self.cfg.heartbeat_timeout
        ):
            self._lost(dev, f"silent for {quiet:.1f} s")
        for req in list(self.requests.values()):
            if req.running and self.now - req.progress > self.cfg.request_timeout:
                self._requeue_one(req, f"no progress for {self.cfg.request_timeout:.0f} s")
            elif (
                req.status == RequestStatus.QUEUED
                and self.plan is None
                and self.plan_error
                and self.now - req.arrived > self.cfg.request_timeout
            ):
                self._fail(req, ErrorCode.NO_PLAN, self.plan_error)
        self._maybe_plan()
        self._check_serving()
        self._maybe_check_drift()

    # ------------------------------------------------------------------ drift

    def _maybe_check_drift(self) -> None:
        """Ask for a drift check every `tick_s` while serving a whole plan steadily."""
        drift, mix = self.drift, self.mix
        if (
            drift is None
            or mix is None
            or self.plan is None
            or self.phase != PlanPhase.SERVING
            or self.pending is not None
            or self.planning_version is not None
            or self.drift_checking is not None
            or self.dead
            or self.now - self.drift_checked < drift.config.tick_s
        ):
            return
        self.drift_checked = self.now
        w = enough_observed(mix, drift.config, self.now)
        if w is None:
            return
        try:
            inv, _ = self.registry.inventory(self.registry.available())
        except InventoryError:
            return  # planning proper says why
        self.drift_checking = self.version
        self._emit(CheckDrift(self.version, self.now, self.plan, len(self.queue), w, inv, drift))

    def _on_drift_checked(self, ev: DriftChecked) -> None:
        if ev.version != self.drift_checking:
            return
        self.drift_checking = None
        d = ev.decision
        if isinstance(d, Keep):
            self._log("info", "drift", f"drift check on plan v{ev.version}: keep ({d.reason})")
            return
        if (
            ev.version != self.version
            or self.pending is not None
            or self.planning_version is not None
            or self.dead
        ):
            return  # the plan changed meanwhile: the next check looks again
        kind = "flip roles/concurrency, no reload" if isinstance(d, Flip) else "re-layout"
        assert isinstance(d, Flip | Relayout)
        plan = _renumbered(d.plan, self.version + 1)
        self._log("info", "drift", f"workload drift: {kind} (plan v{plan.version}): {d.reason}")
        self._adopt(plan)

    def _on_reconnected(self, ev: Reconnected) -> None:
        """Back on the broker: messages in flight may be lost and devices' subscriptions
        may not be back yet. Restart the attempts; dispatch again once each device of the
        plan has been heard live (its state is re-published on its own reconnect and every
        heartbeat interval)."""
        self._log(
            "warning", "reconnect", "reconnected to the broker: restarting requests in flight"
        )
        self.confirm_after = self.now
        self.registry.touch_all(self.now)
        # wills seen just before our own disconnect were the broker shutting down; a
        # device that really died stays silent and times out
        self.offline_since.clear()
        if self.plan is not None and self.phase == PlanPhase.SERVING:
            self.phase = PlanPhase.LOADING
        self._requeue(lambda r: True, "broker connection lost", fault=False)

    # ------------------------------------------------------------------ output

    def _answer(self, client: ClientId, msg: m.ResponseEvent) -> None:
        self._emit(Answer(client, msg))

    def _answer_error(self, client: ClientId, rid: str, code: ErrorCode, text: str) -> None:
        self._answer(
            client,
            m.ResponseEvent(request_id=RequestId(rid), event="error", error_code=code, error=text),
        )

    def _notify(self, rid: str, kind: RequestEventKind, data: RequestEventData) -> None:
        self._emit(Notify(rid, kind, data))

    def summary(self) -> m.ClusterSummary:
        plan = self.plan
        return m.ClusterSummary(
            orchestrator_id=self.cfg.orchestrator_id,
            epoch=self.epoch,
            phase=self.phase.value,
            plan_version=self.version,
            serving=self.phase == PlanPhase.SERVING,
            plan_error=self.plan_error,
            devices={
                d: e.state.status if e.state is not None else DeviceStatus.ONLINE
                for d, e in sorted(self.registry.devices.items())
            },
            replicas=[
                m.ReplicaSummary(
                    replica_id=r.replica_id,
                    role=r.role,
                    concurrency=r.concurrency,
                    devices=[s.device_id for s in r.stages],
                    prefill_queue_tokens=round(
                        sum(self.router.replicas[r.replica_id].prefilling.values())
                    )
                    if self.router is not None
                    else 0,
                    decoding=len(self.router.replicas[r.replica_id].decoding)
                    if self.router is not None
                    else 0,
                )
                for r in (plan.replicas if plan is not None else [])
            ],
            queued=len(self.queue),
            in_flight=sum(r.running for r in self.requests.values()),
            completed=self.completed,
            failed=self.failed,
            dead_replicas=sorted(self.dead),
            draining=self.pending is not None,
            restarted=self.restarted,
            last_recovery_s=round(self.recoveries[-1], 3) if self.recoveries else None,
            rss_bytes=0,  # the shell fills it in: the core reads no process state
            mean_wait_s=round(sum(self.waits) / len(self.waits), 4) if self.waits else None,
            mean_ttft_s=round(sum(self.ttfts) / len(self.ttfts), 4) if self.ttfts else None,
            tokens_out=self.tokens_out,
            uptime_s=round(self.now - self.started, 1),
        )

    # ------------------------------------------------------------------ invariants

    def check_invariants(self) -> None:
        """What must hold between any two events (used by the property tests)."""
        queued = [rid for rid in self.queue if rid in self.requests]
        assert len(queued) == len(set(queued)), "a request is queued twice"
        for rid, req in self.requests.items():
            assert req.status not in (
                RequestStatus.FINISHED,
                RequestStatus.FAILED,
                RequestStatus.CANCELLED,
            ), f"{rid} ended but is still tracked"
            assert (rid in self.queue) == (req.status == RequestStatus.QUEUED), (
                f"{rid}: status {req.status} vs queue membership"
            )
            assert req.running == (req.route is not None), f"{rid}: route vs status"
        if self.router is None:
            return
        router = self.router
        assert list(router.queue) == queued, "the router's queue is not the core's"
        tracked = {rid for rid, r in self.requests.items() if r.status == RequestStatus.QUEUED}
        tracked |= {
            rid
            for rid, r in self.requests.items()
            if r.route is not None and r.route.plan_version == self.version
        }
        assert set(router.requests) == tracked, (
            f"router tracks {sorted(router.requests)}, the core {sorted(tracked)}"
        )
        for rep, state in router.replicas.items():
            decoding = {
                rid
                for rid, r in self.requests.items()
                if r.route is not None
                and r.route.plan_version == self.version
                and r.route.decoder == rep
            }
            assert set(state.decoding) == decoding, (
                f"replica {rep}: decoder slots {sorted(state.decoding)} vs requests "
                f"{sorted(decoding)}"
            )
            assert len(state.decoding) <= state.concurrency or state.next_role is not None, (
                f"replica {rep} over concurrency"
            )
            prefilling = {
                rid
                for rid, r in self.requests.items()
                if r.route is not None
                and r.route.plan_version == self.version
                and r.route.prefill == rep
                and r.status == RequestStatus.PREFILLING
            }
            assert set(state.prefilling) == prefilling, (
                f"replica {rep}: prefilling {sorted(state.prefilling)} vs {sorted(prefilling)}"
            )

    _handlers: Mapping[type, Callable[[FogCore, Any], None]] = {}


FogCore._handlers = {
    DeviceStateSeen: FogCore._on_state,
    DeviceProfileSeen: FogCore._on_profile,
    DeviceHeard: FogCore._on_heard,
    PlanSeen: FogCore._on_plan_seen,
    TokenArrived: FogCore._on_token,
    DeviceErrorArrived: FogCore._on_device_error,
    RequestArrived: FogCore._on_request,
    BadRequestArrived: FogCore._on_bad_request,
    CancelArrived: FogCore._on_cancel,
    PlanComputed: FogCore._on_plan_computed,
    DriftChecked: FogCore._on_drift_checked,
    Reconnected: FogCore._on_reconnected,
    Tick: FogCore._on_tick,
}


# --------------------------------------------------------------------------- helpers


def _replica_devices(r: Any) -> set[str]:
    return {s.device_id for s in r.stages}


def _devices(plan: Plan) -> set[str]:
    return {s.device_id for r in plan.replicas for s in r.stages}


def _renumbered(plan: Plan, version: int) -> Plan:
    return Plan(version, plan.method, plan.n_layers, list(plan.replicas), dict(plan.predicted))


def _same_layout(a: Plan, b: Plan) -> bool:
    """Same replicas, roles, concurrency and layer splits (the version aside)."""

    def key(p: Plan) -> list[tuple[Any, ...]]:
        return sorted(
            (
                r.role,
                r.concurrency,
                tuple((s.device_id, s.layer_start, s.layer_end, s.embed, s.head) for s in r.stages),
            )
            for r in p.replicas
        )

    return key(a) == key(b)


def describe_plan(plan: Plan) -> str:
    parts = []
    for r in plan.replicas:
        stages = ", ".join(
            f"{s.device_id}[{s.layer_start}:{s.layer_end}"
            f"{'+E' if s.embed else ''}{'+H' if s.head else ''}]"
            for s in r.stages
        )
        parts.append(f"R{r.replica_id} {r.role.upper()} c={r.concurrency}: {stages}")
    return "; ".join(parts)
