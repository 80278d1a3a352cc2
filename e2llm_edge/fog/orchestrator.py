"""The fog-level orchestrator's shell: MQTT in, `FogCore` decisions, MQTT out.

Everything it decides lives in `fog.core` (pure, tested in-process); this module only
turns bus messages into events, gives them the time, runs the planner in a thread when
asked, and publishes what the core returns.

It also holds the lease (`fog.lease`): the serving orchestrator renews it; one started
with `standby=True` waits and takes over (epoch + 1) when the holder's last-will fires or
its lease lapses. A new holder adopts the retained plan as it is (a version bump: devices
keep their weights and drop the requests of the old epoch); clients re-send what is
unfinished when they see the new epoch come online, with the tokens they already hold,
so every request ends with its full answer or an explicit error, never silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2llm_edge.errors import E2LLMError
from e2llm_edge.fog import core as c
from e2llm_edge.fog.lease import LeaseView
from e2llm_edge.fog.registry import Registry
from e2llm_edge.fog.textio import ChatTokenizer
from e2llm_edge.sysinfo import rss_bytes
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import BadMessage, Bus, BusConfig, Envelope, RateLimitedLog, Will
from onnx_export.manifest import Manifest
from planner import Inventory, ModelSpec, Plan, PlanInfeasible, Workload, make_plan
from planner.errors import PlannerError

log = logging.getLogger(__name__)

TICK_S = 0.25


@dataclass(frozen=True)
class OrchestratorConfig:
    """Settings of the orchestrator."""

    bus: BusConfig
    """How to reach the broker."""
    model_dir: Path
    """The exported model (tokenizer, manifest costs); only read."""
    inventory_path: Path | None = None
    """Optional inventory naming expected devices and their hardware figures / links."""
    expect_devices: int | None = None
    """Devices to wait for before the first plan (default: the inventory's count, else 1)."""
    fixed_plan: Path | None = None
    """A pinned plan (YAML, e.g. from `e2llm plan -o`) used instead of planning while all
    of its devices are available; planning takes over when one is lost."""
    settle_s: float = 1.5
    """After the device set changes, wait this long for more changes before re-planning."""
    method: str = "e2llm"
    """Planning method: e2llm, splitwise, pipeline or memprop."""
    seed: int = 0
    """Seed of the genetic algorithm (plans are reproducible)."""
    workload: Workload = field(default_factory=lambda: Workload(256, 128, 0.5))
    """Expected workload the plan is optimised for."""
    min_tokens_per_s: float = 15.0
    """Floor on per-request generation speed for decoder concurrency."""
    request_timeout: float = 60.0
    """Seconds without progress after which a request's attempt is abandoned (stuck stage)
    and the request re-queued; it fails once `max_retries` is exhausted."""
    heartbeat_timeout: float = 6.0
    """Seconds of silence after which a device of the plan is considered lost."""
    max_queue: int = 1024
    """Requests waiting beyond this are refused with an 'overloaded' error."""
    max_retries: int = 5
    """Faults (lost replica, stall, device error) a request survives before it fails;
    restarts for a plan switch or a broker reconnect are not faults."""
    drain_timeout: float = 10.0
    """Before switching to a plan that adds devices: seconds in-flight requests may run on
    to finish; the rest restart (seamlessly) under the new plan."""
    loss_drain_timeout: float = 1.0
    """The same drain bound when the switch follows a lost device (capacity is short)."""
    regroup_after: float = 30.0
    """After a loss, the replicas that lost no device serve on as they are; devices left
    without a replica wait this long before the whole cluster is planned anew (every
    device a new plan moves must reload its segments)."""
    replay_cache: int = 512
    """Finished requests remembered, to answer a client re-sending one after a reconnect."""
    orchestrator_id: str = "orchestrator"
    """Name of this orchestrator instance (unique among the fog node's orchestrators)."""
    standby: bool = False
    """Wait for the serving orchestrator's lease to lapse (or its last-will) and take over,
    instead of taking the lease at start."""
    lease_ttl_s: float = 3.0
    """A lease not renewed for this long lapses (a hung or cut-off orchestrator)."""
    lease_renew_s: float = 1.0
    """How often the holder renews its lease."""

    def core_config(self, expect: int) -> c.FogConfig:
        return c.FogConfig(
            orchestrator_id=self.orchestrator_id,
            expect_devices=expect,
            settle_s=self.settle_s,
            method=self.method,
            seed=self.seed,
            workload=self.workload,
            min_tokens_per_s=self.min_tokens_per_s,
            request_timeout=self.request_timeout,
            heartbeat_timeout=self.heartbeat_timeout,
            max_queue=self.max_queue,
            max_retries=self.max_retries,
            drain_timeout=self.drain_timeout,
            loss_drain_timeout=self.loss_drain_timeout,
            regroup_after=self.regroup_after,
            replay_cache=self.replay_cache,
        )


class Superseded(E2LLMError):
    """Another orchestrator holds a newer lease: this one stops serving."""


class Orchestrator:
    """`await Orchestrator(cfg).run()`: serves (or stands by) until cancelled."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.cfg = config
        self.manifest = Manifest.load(config.model_dir)
        self.tokenizer = ChatTokenizer(self.manifest)
        # Our embed and head segments each carry their own copy of a tied weight, so a
        # device holding both pays for both: tell the planner the truth about the files.
        md = self.manifest.to_dict()
        md["config"] = {**md["config"], "tie_word_embeddings": False}
        self.model = ModelSpec.from_manifest(md)
        self.inventory_file: dict[str, Any] = {}
        if config.inventory_path:
            self.inventory_file = yaml.safe_load(Path(config.inventory_path).read_text()) or {}
            # ids and memory are enough here: the devices announce their measured costs
            Inventory.from_dict(
                self.inventory_file, source=str(config.inventory_path), require_costs=False
            )
        self.pinned = (
            Plan.from_yaml(Path(config.fixed_plan).read_text()) if config.fixed_plan else None
        )
        n_inv = len(self.inventory_file.get("devices", []) or [])
        self.expect = config.expect_devices or n_inv or 1
        self.lease = LeaseView(config.orchestrator_id, ttl_s=config.lease_ttl_s)
        self.core: c.FogCore | None = None
        self.bus: Bus | None = None
        self.epoch = 0
        self.plan_ready = asyncio.Event()
        self._ratelog = RateLimitedLog(log)
        self._tasks: asyncio.TaskGroup | None = None
        self._order = asyncio.Lock()

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Stand by if asked, then serve; step down to standby when superseded."""
        standby = self.cfg.standby
        while True:
            if standby:
                await self._stand_by()
            try:
                await self._serve()
                return
            except* Superseded as group:
                log.warning("%s", group.exceptions[0])
            standby = True

    async def _stand_by(self) -> None:
        """Watch the lease without a last-will (a standby's death is nobody's concern)."""
        started = time.monotonic()
        bus_cfg = self.cfg.bus
        async with Bus(bus_cfg, publish_will_on_close=False) as bus:
            await bus.subscribe(t.ORCHESTRATOR_LEASE)
            await bus.subscribe(t.ORCHESTRATOR_STATE)
            log.info("%s: standing by", self.cfg.orchestrator_id)
            connects = bus.stats.connects
            while True:
                with contextlib.suppress(E2LLMError):
                    env = await bus.recv(timeout=TICK_S)
                    self._lease_message(env)
                if bus.stats.connects != connects:
                    # our own reconnect (a broker restart) says nothing of the holder
                    connects = bus.stats.connects
                    self.lease.reconnected(time.monotonic())
                if self.lease.vacant(
                    time.monotonic(), started=started, wait_s=2 * self.cfg.lease_ttl_s
                ):
                    log.warning(
                        "%s: taking over from %s (epoch %d)",
                        self.cfg.orchestrator_id,
                        self.lease.holder,
                        self.lease.epoch,
                    )
                    return

    def _lease_message(self, env: Envelope) -> None:
        if isinstance(env.msg, m.OrchestratorLease):
            self.lease.seen_lease(env.msg, time.monotonic())
        elif isinstance(env.msg, m.OrchestratorState):
            self.lease.seen_state(env.msg)

    async def _serve(self) -> None:
        will = Will(
            t.ORCHESTRATOR_STATE,
            m.OrchestratorState(orchestrator_id=self.cfg.orchestrator_id, status="offline"),
        )
        async with Bus(self.cfg.bus, will=will, on_bad_message=self._on_bad) as bus:
            self.bus = bus
            await bus.subscribe(t.ORCHESTRATOR_LEASE)
            # the retained lease (if any) arrives first: our epoch goes past it
            await self._read_retained_lease(bus)
            self.epoch = self.lease.next_epoch()
            self.lease.holder, self.lease.epoch = self.cfg.orchestrator_id, self.epoch
            now = time.monotonic()
            self.core = c.FogCore(
                self.cfg.core_config(self.expect),
                c.ModelInfo(
                    context_length=int(self.manifest.config["max_position"]),
                    vocab_size=int(self.manifest.config["vocab_size"]),
                    n_layers=int(self.manifest.config["n_layers"]),
                    eos_token_id=self.manifest.config.get("eos_token_id"),
                ),
                self.tokenizer,
                registry=Registry(self.inventory_file),
                epoch=self.epoch,
                pinned=self.pinned,
                started=now,
            )
            # subscribed before saying "online": clients re-send what is unfinished as soon
            # as they see our epoch, and nothing they send may fall on deaf ears
            for topic in (
                t.DEVICE_STATE,
                t.DEVICE_PROFILE,
                t.ORCHESTRATOR_INBOX,
                t.REQUEST,
                t.PLAN,
            ):
                await bus.subscribe(topic)
            await self._renew_lease()
            await bus.publish(
                t.ORCHESTRATOR_STATE,
                m.OrchestratorState(
                    orchestrator_id=self.cfg.orchestrator_id,
                    status="online",
                    epoch=self.epoch,
                    ts=time.time(),
                ),
            )
            log.info("%s serving, epoch %d", self.cfg.orchestrator_id, self.epoch)
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tasks = tg
                    tg.create_task(self._receive(bus))
                    tg.create_task(self._ticker(bus))
                    tg.create_task(self._lease_keeper())
            finally:
                self._tasks = None
                self.bus = None

    async def _read_retained_lease(self, bus: Bus) -> None:
        """Give the broker a moment to deliver the retained lease before taking the next
        epoch (an empty cluster has none: we wait at most this long)."""
        with contextlib.suppress(E2LLMError):
            env = await bus.recv(timeout=0.3)
            self._lease_message(env)

    async def _renew_lease(self) -> None:
        assert self.bus is not None
        await self.bus.publish(
            t.ORCHESTRATOR_LEASE,
            m.OrchestratorLease(
                holder=self.cfg.orchestrator_id, epoch=self.epoch, ttl_s=self.cfg.lease_ttl_s
            ),
        )

    async def _lease_keeper(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.lease_renew_s)
            if self.lease.superseded(self.epoch):
                raise Superseded(
                    f"{self.cfg.orchestrator_id}: {self.lease.holder} holds epoch "
                    f"{self.lease.epoch} > ours ({self.epoch}); stepping down"
                )
            with contextlib.suppress(E2LLMError):
                await self._renew_lease()

    # ------------------------------------------------------------------ inbound

    async def _receive(self, bus: Bus) -> None:
        async for env in bus:
            try:
                event = self._event_of(env)
            except Exception as exc:  # one bad message must not stop the orchestrator
                self._ratelog.warning(
                    f"event:{type(env.msg).__name__}",
                    "reading %s on %s failed: %s",
                    type(env.msg).__name__,
                    env.topic_str,
                    exc,
                )
                continue
            if event is not None:
                await self._feed(event)

    def _event_of(self, env: Envelope) -> c.Event | None:
        msg, ids = env.msg, env.ids
        if isinstance(msg, m.DeviceState):
            return c.DeviceStateSeen(ids["device_id"], msg, env.retained)
        if isinstance(msg, m.DeviceProfileMsg):
            return c.DeviceProfileSeen(ids["device_id"], msg)
        if isinstance(msg, m.PlanMsg):
            return c.PlanSeen(msg.plan, env.retained)
        if isinstance(msg, m.TokenOut):
            return c.TokenArrived(ids["device_id"], msg)
        if isinstance(msg, m.ErrorReport):
            return c.DeviceErrorArrived(ids["device_id"], msg)
        if isinstance(msg, m.Heartbeat):
            return c.DeviceHeard(ids["device_id"])
        if isinstance(msg, m.GenerateRequest):
            return c.RequestArrived(ids["client_id"], msg)
        if isinstance(msg, m.Release):
            return c.CancelArrived(ids["client_id"], msg)
        if isinstance(msg, m.OrchestratorLease | m.OrchestratorState):
            self._lease_message(env)
        return None

    async def _on_bad(self, bad: BadMessage) -> None:
        """A malformed request: answer the requester (awaited by the bus's own bad-message
        worker, so no task is left without an owner)."""
        if bad.topic is t.REQUEST and bad.ids:
            rid = getattr(bad.error, "request_id", None) or f"invalid-{uuid.uuid4().hex[:8]}"
            await self._feed(c.BadRequestArrived(bad.ids["client_id"], rid, str(bad.error)))

    async def _feed(self, event: c.Event) -> None:
        """One event through the core, its commands out, in order. Events come from several
        tasks (messages, ticks, the planner); the lock keeps each event's commands together
        and in the order the core decided them."""
        core = self.core
        if core is None:
            return
        async with self._order:
            for cmd in core.handle(event, time.monotonic()):
                await self._do(cmd)
        if core.phase == c.PlanPhase.SERVING:
            self.plan_ready.set()
        else:
            self.plan_ready.clear()

    # ------------------------------------------------------------------ outbound

    async def _do(self, cmd: c.Command) -> None:
        bus = self.bus
        assert bus is not None
        try:
            if isinstance(cmd, c.Send):
                await bus.publish(t.DEVICE_INBOX, cmd.msg, device_id=cmd.device_id, timeout=2.0)
            elif isinstance(cmd, c.Answer):
                await bus.publish(
                    t.RESPONSE, cmd.msg, client_id=cmd.client_id, request_id=cmd.msg.request_id
                )
            elif isinstance(cmd, c.PublishPlan):
                await bus.publish(
                    t.PLAN,
                    m.PlanMsg(plan=cmd.plan, epoch=self.epoch, plan_version=cmd.plan.version),
                )
            elif isinstance(cmd, c.Notify):
                await bus.publish(
                    t.REQUEST_EVENTS,
                    m.RequestEvent(
                        request_id=m.RequestId(cmd.request_id), event=cmd.kind, data=cmd.data
                    ),
                    request_id=cmd.request_id,
                )
            elif isinstance(cmd, c.PublishSummary):
                summary = dataclasses.replace(cmd.summary, rss_bytes=rss_bytes())
                await bus.publish(t.CLUSTER_TELEMETRY, m.ClusterTelemetry(summary=summary))
            elif isinstance(cmd, c.ComputePlan):
                self._start_planner(cmd)
            elif isinstance(cmd, c.Log):
                level = logging.WARNING if cmd.level == "warning" else logging.INFO
                if level == logging.WARNING:
                    self._ratelog.warning(cmd.key, "%s", cmd.text)
                else:
                    log.info("%s", cmd.text)
        except E2LLMError as exc:
            # the broker is down or slow: the answer's client re-sends after silence, the
            # devices time out what they hold; the core goes on
            self._ratelog.warning(
                f"do:{type(cmd).__name__}", "%s failed: %s", type(cmd).__name__, exc
            )

    def _start_planner(self, cmd: c.ComputePlan) -> None:
        """The GA runs in a thread; its answer comes back as an event. Owned by the serving
        TaskGroup; only one runs at a time (the core asks for one version at a time)."""

        async def run() -> None:
            try:
                plan = await asyncio.to_thread(
                    make_plan,
                    cmd.inventory,
                    self.model,
                    cmd.workload,
                    method=cmd.method,
                    seed=cmd.seed,
                    version=cmd.version,
                    min_tokens_per_s=cmd.min_tokens_per_s,
                )
                event = c.PlanComputed(cmd.version, plan)
            except PlanInfeasible as exc:
                event = c.PlanComputed(cmd.version, None, str(exc), infeasible=True)
            except (PlannerError, ValueError) as exc:
                event = c.PlanComputed(cmd.version, None, str(exc))
            await self._feed(event)

        assert self._tasks is not None
        self._tasks.create_task(run(), name="planner")

    # ------------------------------------------------------------------ ticker

    async def _ticker(self, bus: Bus) -> None:
        connects = bus.stats.connects
        while True:
            await asyncio.sleep(TICK_S)
            if bus.stats.connects != connects:
                connects = bus.stats.connects
                await self._feed(c.Reconnected())
            if bus.connected:  # silence from everyone is our own problem, not theirs
                await self._feed(c.Tick())

    def summary(self) -> m.ClusterSummary | None:
        return self.core.summary() if self.core is not None else None


describe_plan = c.describe_plan
