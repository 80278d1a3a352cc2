"""The fog-level orchestrator: registry, planning, routing, and the answer to every request.

It keeps the device registry from retained state and profile messages, asks `planner`
for a plan when the device set changes, publishes it (retained), and waits until every
device of the plan reports ready for that version. Requests are tokenized here, routed by
join-the-shortest-queue on estimated waiting time to a PREFILL replica, and given a
DECODER replica with a free slot; tokens come back from the devices and are streamed to
the client. Every request ends with `done` or an `error` event: a lost device or a stuck
stage sends its requests back to the queue (re-prefilled from prompt plus the tokens
already streamed) or fails them with a reason, never leaves them silent.

Healing: each dispatch of a request is an *attempt* with its own id on the devices
(`<request id>@<attempt>`), so late messages of an abandoned attempt are ignored and never
mix with the live one. A lost device kills only its replicas: their requests restart on the
others at once (degraded plan) while a new plan is computed; any plan switch first drains
(no new dispatch, in-flight requests may finish, bounded by a timeout) and restarts the
rest seamlessly. A reconnect to the broker restarts every attempt in flight (messages may
have been lost) and waits until each device is heard live again before dispatching.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2llm_edge.device.sampling import Sampling, SamplingError
from e2llm_edge.errors import E2LLMError
from e2llm_edge.fog.router import ReplicaLoad, choose_decoder, choose_prefill
from e2llm_edge.fog.textio import ChatTokenizer, StreamDecoder
from e2llm_edge.sysinfo import rss_bytes
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import BadMessage, Bus, BusConfig, Envelope, RateLimitedLog, Will
from onnx_export.errors import ExportError
from onnx_export.export import export_model
from onnx_export.manifest import Manifest
from planner import Inventory, ModelSpec, Plan, PlanInfeasible, Workload, make_plan
from planner.errors import InventoryError, PlannerError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OrchestratorConfig:
    """Settings of the orchestrator."""

    bus: BusConfig
    """How to reach the broker."""
    model_dir: Path
    """The exported model (tokenizer, manifest costs)."""
    inventory_path: Path | None = None
    """Optional inventory naming expected devices and their hardware figures / links."""
    expect_devices: int | None = None
    """Devices to wait for before the first plan (default: the inventory's count, else 1)."""
    export_ranges: bool = True
    """Before publishing a plan, write the layer-range segments its stages need (the fog node
    holds the source model) so every device runs its layers as one session. Skipped when
    recovering from a lost device, to keep recovery fast."""
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
    without a replica wait this long (a device that only rebooted is back by then and
    rejoins with the same switch) before the whole cluster is planned anew, because every
    device a new plan moves must reload its segments."""
    replay_cache: int = 512
    """Finished requests remembered, to answer a client re-sending one after a reconnect."""
    orchestrator_id: str = "orchestrator"
    """Broker user name / id of this orchestrator."""


@dataclass
class Track:
    """One request from arrival to its last event."""

    rid: str
    client_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    decoder: StreamDecoder
    arrived: float = field(default_factory=time.monotonic)
    generated: list[int] = field(default_factory=list)
    prefill_replica: int | None = None
    decoder_replica: int | None = None
    plan_version: int = 0
    dispatched: float | None = None
    first_token: float | None = None
    prefill_done: bool = False
    progress: float = field(default_factory=time.monotonic)
    retries: int = 0
    first_dispatch: float | None = None
    attempt: int = 0
    restarts: int = 0
    texts: list[str] = field(default_factory=list)

    @property
    def wire_id(self) -> str:
        """The request id the devices see for the current attempt."""
        return f"{self.rid}@{self.attempt}"


def split_wire_id(wire: str) -> tuple[str, int]:
    """(request id, attempt) of a device-side request id; attempt -1 if not one of ours."""
    rid, sep, att = wire.rpartition("@")
    if not sep or not att.isdigit():
        return wire, -1
    return rid, int(att)


@dataclass
class Replay:
    """What a finished request sent its client, to send again on a re-submission."""

    client_id: str
    generated: list[int]
    texts: list[str]
    final: m.ResponseEvent


@dataclass
class DeviceEntry:
    state: m.DeviceState | None = None
    profile: m.DeviceProfileMsg | None = None
    last_seen: float = 0.0
    live_at: float = 0.0
    """When a live (not retained) message from the device last arrived."""


class Orchestrator:
    def __init__(self, config: OrchestratorConfig) -> None:
        self.cfg = config
        self.manifest = Manifest.load(config.model_dir)
        self.tokenizer = ChatTokenizer(self.manifest)
        # Our embed and head segments each carry their own copy of a tied weight, so a
        # device holding both pays for both: tell the planner the truth about the files.
        md = self.manifest.to_dict()
        md["config"] = {**md["config"], "tie_word_embeddings": False}
        self.model = ModelSpec.from_manifest(md)
        self.context_length = int(self.manifest.config["max_position"])
        self.inventory_file: dict[str, Any] = {}
        if config.inventory_path:
            self.inventory_file = yaml.safe_load(Path(config.inventory_path).read_text()) or {}
            Inventory.from_dict(self.inventory_file, source=str(config.inventory_path))
        n_inv = len(self.inventory_file.get("devices", []))
        self.expect = config.expect_devices or n_inv or 1
        self.devices: dict[str, DeviceEntry] = {}
        self.plan: Plan | None = None
        self.version = 0
        self.serving = False
        self.plan_error: str | None = None
        self.requests: dict[str, Track] = {}
        self.queue: deque[str] = deque()
        self.loads: dict[int, ReplicaLoad] = {}
        self.bus: Bus | None = None
        self.replan_at: float | None = None
        self.planning = False
        self.lost: set[str] = set()
        self.completed = 0
        self.failed = 0
        self.waits: deque[float] = deque(maxlen=256)
        self.ttfts: deque[float] = deque(maxlen=256)
        self.tokens_out = 0
        self.started = time.monotonic()
        self.plan_ready = asyncio.Event()
        self.dead: set[int] = set()
        """Replicas of the current plan that lost a device (no dispatch to them)."""
        self.pending: Plan | None = None
        self.drain_until = 0.0
        self.ever_planned = False
        self.confirm_after = 0.0
        self.connects_seen = 0
        self.finished: OrderedDict[str, Replay] = OrderedDict()
        self.recovering_since: float | None = None
        self.recoveries: deque[float] = deque(maxlen=64)
        self.restarted = 0
        self._ratelog = RateLimitedLog(log)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        will = Will(
            t.ORCHESTRATOR_STATE,
            m.OrchestratorState(orchestrator_id=self.cfg.orchestrator_id, status="offline"),
        )
        async with Bus(self.cfg.bus, will=will, on_bad_message=self._on_bad) as bus:
            self.bus = bus
            for topic in (
                t.DEVICE_STATE,
                t.DEVICE_PROFILE,
                t.ORCHESTRATOR_INBOX,
                t.REQUEST,
                t.PLAN,
            ):
                await bus.subscribe(topic)
            await bus.publish(
                t.ORCHESTRATOR_STATE,
                m.OrchestratorState(
                    orchestrator_id=self.cfg.orchestrator_id, status="online", ts=time.time()
                ),
            )
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(bus))
                tg.create_task(self._ticker())

    async def _receive(self, bus: Bus) -> None:
        async for env in bus:
            try:
                await self._on_message(env)
            except Exception as exc:  # one bad message must not stop the orchestrator
                self._ratelog.warning(
                    f"handle:{type(env.msg).__name__}:{type(exc).__name__}",
                    "handling %s on %s failed: %s: %s",
                    type(env.msg).__name__,
                    env.topic_str,
                    type(exc).__name__,
                    exc,
                )

    async def _on_bad(self, bad: BadMessage) -> None:
        """A malformed message: answer the requester if the topic names one (awaited by the
        bus's own bad-message worker, so no task is left without an owner)."""
        if bad.topic is t.REQUEST and bad.ids and self.bus is not None:
            rid = getattr(bad.error, "request_id", None) or f"invalid-{uuid.uuid4().hex[:8]}"
            await self._reply_error_raw(
                bad.ids["client_id"], rid, "bad_request", f"malformed request: {bad.error}"
            )

    async def _reply_error_raw(self, client: str, rid: str, code: str, text: str) -> None:
        assert self.bus is not None
        with contextlib.suppress(E2LLMError):
            await self.bus.publish(
                t.RESPONSE,
                m.ResponseEvent(request_id=rid, event="error", error_code=code, error=text),
                client_id=client,
                request_id=rid,
            )

    # ------------------------------------------------------------------ inbound

    async def _on_message(self, env: Envelope) -> None:
        msg = env.msg
        now = time.monotonic()
        if isinstance(msg, m.DeviceState):
            await self._device_state(env.ids["device_id"], msg, now, env.retained)
        elif isinstance(msg, m.DeviceProfileMsg):
            entry = self.devices.setdefault(env.ids["device_id"], DeviceEntry())
            known = entry.profile is not None
            entry.profile, entry.last_seen = msg, now
            if not known:
                self._schedule_replan("device profile from " + env.ids["device_id"])
        elif isinstance(msg, m.PlanMsg):
            if env.retained and self.plan is None:
                # a plan retained from an earlier orchestrator: continue its numbering
                self.version = max(self.version, int(msg.plan.get("version", 0)))
        elif isinstance(msg, m.Heartbeat | m.TokenOut | m.ErrorReport):
            dev = env.ids["device_id"]
            known_dev = self.devices.get(dev)  # unknown senders must not grow the registry
            if known_dev is not None:
                known_dev.last_seen = known_dev.live_at = now
            if isinstance(msg, m.TokenOut):
                await self._token(dev, msg)
            elif isinstance(msg, m.ErrorReport):
                await self._device_error(dev, msg)
        elif isinstance(msg, m.GenerateRequest):
            await self._new_request(env.ids["client_id"], msg)
        elif isinstance(msg, m.Release):
            await self._cancel(env.ids["client_id"], msg)

    async def _device_state(
        self, dev: str, msg: m.DeviceState, now: float, retained: bool = False
    ) -> None:
        entry = self.devices.setdefault(dev, DeviceEntry())
        entry.state, entry.last_seen = msg, now
        if not retained:
            entry.live_at = now
        watched = dev in self._watched_devices()
        if msg.status == "offline":
            if watched:
                await self._device_lost(dev, "went offline")
            return
        if msg.status == "error":
            if watched:
                await self._device_lost(dev, f"reported error: {msg.last_error}")
            return
        if dev in self.lost:
            self.lost.discard(dev)
            self._schedule_replan(f"device {dev} is back")
        await self._check_serving()

    async def _check_serving(self) -> None:
        """Start serving a plan once every device of its live replicas is ready for it."""
        if self.plan is None or self.serving or not self._can_serve() or not self._all_ready():
            return
        self.serving = True
        self.plan_ready.set()
        now = time.monotonic()
        if self.recovering_since is not None and not self.dead:
            self.recoveries.append(now - self.recovering_since)
            log.info(
                "plan v%d serving, %.2f s after the device loss",
                self.version,
                now - self.recovering_since,
            )
            self.recovering_since = None
        else:
            log.info("plan v%d serving", self.version)
        await self._summary()
        await self._dispatch()

    # ------------------------------------------------------------------ planning

    def plan_devices(self) -> set[str]:
        assert self.plan is not None
        return {s.device_id for r in self.plan.replicas for s in r.stages}

    def _live_devices(self) -> set[str]:
        """Devices of the current plan's replicas that lost none of theirs."""
        if self.plan is None:
            return set()
        return {
            s.device_id
            for r in self.plan.replicas
            if r.replica_id not in self.dead
            for s in r.stages
        }

    def _dead_devices(self) -> set[str]:
        """Every device of the current plan's dead replicas (lost, or their partners)."""
        if self.plan is None:
            return set()
        return {
            s.device_id for r in self.plan.replicas if r.replica_id in self.dead for s in r.stages
        }

    def _watched_devices(self) -> set[str]:
        devs = self.plan_devices() if self.plan is not None else set()
        if self.pending is not None:
            devs |= {s.device_id for r in self.pending.replicas for s in r.stages}
        return devs

    def _can_serve(self) -> bool:
        """The live replicas can still prefill and decode."""
        if self.plan is None:
            return False
        return self.plan.without(self._dead_devices(), self.version) is not None

    def _all_ready(self) -> bool:
        assert self.plan is not None
        for d in self._live_devices():
            e = self.devices.get(d, DeviceEntry())
            st = e.state
            if st is None or st.status != "ready" or st.plan_version != self.version:
                return False
            if e.live_at < self.confirm_after:
                return False  # not heard since our reconnect: its subscription may be gone
        return True

    def _schedule_replan(self, why: str) -> None:
        log.info("re-plan scheduled: %s", why)
        self.replan_at = time.monotonic() + self.cfg.settle_s

    def _available(self) -> list[str]:
        return sorted(
            d
            for d, e in self.devices.items()
            if e.profile is not None
            and d not in self.lost
            and (e.state is None or e.state.status not in ("offline",))
        )

    def build_inventory(self, device_ids: list[str]) -> Inventory:
        """Live profiles over the inventory file's figures for the same device."""
        by_id = {d["id"]: d for d in self.inventory_file.get("devices", [])}
        devices = []
        for d in device_ids:
            prof = self.devices[d].profile
            assert prof is not None
            entry: dict[str, Any] = dict(by_id.get(d, {"id": d}))
            entry["id"] = d
            entry["memory_mb"] = prof.memory_mb or entry.get("memory_mb")
            if prof.profile:
                entry["profile"] = {k: v for k, v in prof.profile.items() if k != "measured"}
            if prof.link:
                entry["link"] = prof.link
            devices.append(entry)
        defaults = self.inventory_file.get(
            "link_defaults", {"bandwidth_mbps": 1000.0, "latency_ms": 0.5}
        )
        usable = []
        for entry in devices:
            # one device announcing a bad profile must not stop planning for the others
            try:
                Inventory.from_dict(
                    {"link_defaults": defaults, "devices": [entry]}, source="live registry"
                )
                usable.append(entry)
            except InventoryError as exc:
                self._ratelog.warning(f"profile:{entry['id']}", "left out of the plan: %s", exc)
        return Inventory.from_dict(
            {"link_defaults": defaults, "devices": usable}, source="live registry"
        )

    async def _maybe_plan(self) -> None:
        if self.pending is not None:
            await self._maybe_switch()
            return
        if self.replan_at is None or time.monotonic() < self.replan_at or self.planning:
            return
        avail = self._available()
        if not self.ever_planned and len(avail) < self.expect:
            return  # wait for the devices the operator said to expect
        if not avail:
            return
        self.replan_at = None
        self.planning = True
        survivors = False
        try:
            version = self.version + 1
            plan = self._pinned_plan(avail, version)
            if plan is None and self.plan is not None and self.dead:
                plan = self.plan.without(self._dead_devices(), version)
                survivors = plan is not None
            if plan is None:
                inv = self.build_inventory(avail)
                plan = await asyncio.to_thread(
                    make_plan,
                    inv,
                    self.model,
                    self.cfg.workload,
                    method=self.cfg.method,
                    seed=self.cfg.seed,
                    version=version,
                    min_tokens_per_s=self.cfg.min_tokens_per_s,
                )
        except PlanInfeasible as exc:
            grace_end = self.confirm_after + self.cfg.heartbeat_timeout
            if self.confirm_after > 0 and time.monotonic() < grace_end:
                # just back on the broker: devices not heard again yet (or stale retained
                # "offline" states) are not proof the model cannot be held; look again later
                log.info("no plan with %s right after a reconnect; retrying", avail)
                self.replan_at = grace_end
                return
            self.plan_error = f"no plan can hold the model with devices {avail}: {exc}"
            log.warning("%s", self.plan_error)
            await self._retire_plan()
            await self._fail_queue("no_plan", self.plan_error)
            return
        except PlannerError as exc:
            self.plan_error = f"planning failed: {exc}"
            log.warning("%s", self.plan_error)
            return
        finally:
            self.planning = False
        if survivors:
            log.info("plan v%d: the replicas that lost no device, as they are", version)
            if set(avail) - {d.device_id for r in plan.replicas for d in r.stages}:
                self.replan_at = time.monotonic() + self.cfg.regroup_after
        elif not self.dead and not self.lost:
            await asyncio.to_thread(self._export_ranges, plan)
        self.ever_planned = True
        if any(s.device_id in self.lost for r in plan.replicas for s in r.stages):
            self.replan_at = time.monotonic()  # a device went away while we planned
            return
        if self.plan is not None and not self.dead and _same_layout(plan, self.plan):
            log.info("re-plan keeps the layout of plan v%d; nothing to switch", self.version)
            return
        self.pending = plan
        running = sum(tr.dispatched is not None for tr in self.requests.values())
        bound = (
            self.cfg.loss_drain_timeout
            if self.dead or self.plan is None
            else self.cfg.drain_timeout
        )
        self.drain_until = time.monotonic() + bound
        if running:
            log.info(
                "draining %d request(s) for up to %.1f s before plan v%d",
                running,
                bound,
                plan.version,
            )
        await self._maybe_switch()

    async def _maybe_switch(self) -> None:
        """Install the pending plan once the drain is over (nothing running, or timed out)."""
        if self.pending is None:
            return
        running = any(tr.dispatched is not None for tr in self.requests.values())
        if running and time.monotonic() < self.drain_until:
            return
        plan, self.pending = self.pending, None
        await self._install(plan)

    def _export_ranges(self, plan: Plan) -> None:
        """Add the plan's multi-layer ranges to the model directory, for every variant it
        holds (an unchanged export is a no-op). Devices re-read the manifest per plan."""
        if not self.cfg.export_ranges:
            return
        have = {
            (s.layer_start, s.layer_end, s.graph, s.precision)
            for s in self.manifest.segments
            if s.kind == "layers"
        }
        spans = sorted(
            {
                (s.layer_start, s.layer_end)
                for r in plan.replicas
                for s in r.stages
                if s.layer_end - s.layer_start > 1
            }
        )
        src = Path(str(self.manifest.source.get("path", "")))
        for graph, precision in self.manifest.variants():
            missing = [f"{a}-{b}" for a, b in spans if (a, b, graph, precision) not in have]
            if not missing:
                continue
            if not src.exists():
                log.info("source model %s not here: devices run layer by layer", src)
                return
            try:
                export_model(
                    src,
                    self.manifest.directory,
                    ranges=",".join(missing),
                    progress=False,
                    graph_name=graph,
                    precision=precision,
                )
                log.info(
                    "exported %s ranges %s for plan v%d",
                    f"{graph}/{precision}",
                    ",".join(missing),
                    plan.version,
                )
            except (ExportError, OSError) as exc:
                log.warning("could not export ranges for plan v%d: %s", plan.version, exc)
                return
        self.manifest = Manifest.load(self.manifest.directory)

    def _pinned_plan(self, avail: list[str], version: int) -> Plan | None:
        if self.cfg.fixed_plan is None:
            return None
        d = yaml.safe_load(Path(self.cfg.fixed_plan).read_text())
        d["version"] = version
        plan = Plan.from_dict(d)
        missing = {s.device_id for r in plan.replicas for s in r.stages} - set(avail)
        return None if missing else plan

    async def _install(self, plan: Plan) -> None:
        """Publish a new plan; requests still in flight (the drain is over) restart under it."""
        assert self.bus is not None
        self.plan_error = None
        await self._requeue(
            lambda tr: True, f"plan v{plan.version} replaces v{self.version}", fault=False
        )
        self.plan, self.version, self.serving = plan, plan.version, False
        self.dead = set()
        self.plan_ready.clear()
        self.loads = {
            r.replica_id: ReplicaLoad.for_replica(r, self.cfg.workload) for r in plan.replicas
        }
        await self.bus.publish(t.PLAN, m.PlanMsg(plan=plan.to_dict(), plan_version=plan.version))
        log.info("published plan v%d: %s", plan.version, describe_plan(plan))

    async def _retire_plan(self) -> None:
        await self._requeue(lambda tr: True, "plan withdrawn", fault=False)
        self.plan, self.serving, self.dead, self.pending = None, False, set(), None
        self.plan_ready.clear()

    async def _device_lost(self, dev: str, why: str) -> None:
        """Stop using the replicas holding `dev`; their requests restart on the others."""
        if dev in self.lost:
            return
        log.warning("device %s lost: %s", dev, why)
        self.lost.add(dev)
        if self.recovering_since is None:
            self.recovering_since = time.monotonic()
        if self.pending is not None and dev in {
            s.device_id for r in self.pending.replicas for s in r.stages
        }:
            log.info("pending plan v%d needs %s: dropped", self.pending.version, dev)
            self.pending = None
        if self.plan is not None:
            hit = {
                r.replica_id for r in self.plan.replicas if dev in {s.device_id for s in r.stages}
            }
            self.dead |= hit
            await self._requeue(
                lambda tr: tr.prefill_replica in hit or tr.decoder_replica in hit,
                f"device {dev} {why}",
                fault=True,
            )
            if not self._can_serve():
                self.serving = False
                self.plan_ready.clear()
        self._schedule_replan(f"device {dev} lost")
        self.replan_at = time.monotonic()  # losing capacity: re-plan at once
        await self._dispatch()

    # ------------------------------------------------------------------ requests

    async def _new_request(self, client: str, req: m.GenerateRequest) -> None:
        rid = req.request_id
        try:
            t.check_id(rid, "request_id")
        except E2LLMError as exc:  # no topic can carry an answer to it
            self._ratelog.warning("bad_rid", "request from %s dropped: %s", client, exc)
            return
        if rid in self.requests or rid in self.finished:
            # QoS 1 redelivery, or a client re-sending after a reconnect: send it again
            # what it may have missed (it drops the indices it already holds)
            await self._replay(client, rid)
            return
        try:
            if (req.prompt is None) == (req.prompt_ids is None):
                raise ValueError("give exactly one of prompt or prompt_ids")
            if req.prompt is not None:
                if not req.prompt.strip():
                    raise ValueError("empty prompt")
                ids = self.tokenizer.encode_prompt(req.prompt, raw=req.raw)
            else:
                ids = list(req.prompt_ids or [])
                vocab = int(self.manifest.config["vocab_size"])
                if not ids or min(ids) < 0 or max(ids) >= vocab:
                    raise ValueError(f"prompt_ids must be non-empty ids in [0, {vocab})")
            if not 1 <= req.max_new_tokens <= self.context_length:
                raise ValueError(
                    f"max_new_tokens must be in [1, {self.context_length}], "
                    f"got {req.max_new_tokens}"
                )
            if len(ids) + req.max_new_tokens > self.context_length:
                raise ValueError(
                    f"prompt of {len(ids)} tokens + max_new_tokens "
                    f"{req.max_new_tokens} exceeds the context of "
                    f"{self.context_length} tokens"
                )
            sampling = Sampling(
                temperature=req.temperature,
                top_p=req.top_p,
                seed=0 if req.seed is None else req.seed,
            )
        except (ValueError, SamplingError) as exc:
            await self._reply_error_raw(client, rid, "bad_request", str(exc))
            return
        if self.plan is None and self.plan_error is not None:
            await self._reply_error_raw(client, rid, "no_plan", self.plan_error)
            return
        if len(self.queue) >= self.cfg.max_queue:
            await self._reply_error_raw(
                client, rid, "overloaded", f"{len(self.queue)} requests already waiting"
            )
            return
        tr = Track(
            rid=rid,
            client_id=client,
            prompt_ids=ids,
            max_new_tokens=req.max_new_tokens,
            sampling=sampling,
            decoder=StreamDecoder(self.tokenizer),
        )
        self.requests[rid] = tr
        self.queue.append(rid)
        await self._event(rid, "queued", {"prompt_tokens": len(ids)})
        await self._dispatch()

    async def _replay(self, client: str, rid: str) -> None:
        assert self.bus is not None
        tr = self.requests.get(rid)
        done = self.finished.get(rid)
        src = tr if tr is not None else done
        if src is None or src.client_id != client:
            return
        for i, (tok, text) in enumerate(zip(src.generated, src.texts, strict=True)):
            await self.bus.publish(
                t.RESPONSE,
                m.ResponseEvent(request_id=rid, event="token", token_ids=[tok], text=text, index=i),
                client_id=client,
                request_id=rid,
            )
        if done is not None:
            await self.bus.publish(t.RESPONSE, done.final, client_id=client, request_id=rid)

    def _remember(self, tr: Track, final: m.ResponseEvent) -> None:
        self.finished[tr.rid] = Replay(tr.client_id, list(tr.generated), list(tr.texts), final)
        while len(self.finished) > self.cfg.replay_cache:
            self.finished.popitem(last=False)

    async def _dispatch(self) -> None:
        """Start queued requests while a PREFILL replica and a DECODER slot are free."""
        if not self.serving or self.plan is None or self.pending is not None:
            return
        while self.queue:
            rid = self.queue[0]
            tr = self.requests.get(rid)
            if tr is None:
                self.queue.popleft()
                continue
            prompt = tr.prompt_ids + tr.generated
            p = choose_prefill(self.plan, self.loads, len(prompt), exclude=self.dead)
            d = choose_decoder(self.plan, self.loads, p, exclude=self.dead)
            if p is None or d is None:
                return
            self.queue.popleft()
            await self._start(tr, p, d, prompt)

    async def _start(self, tr: Track, p: int, d: int, prompt: list[int]) -> None:
        assert self.plan is not None and self.bus is not None
        now = time.monotonic()
        tr.prefill_replica, tr.decoder_replica, tr.plan_version = p, d, self.version
        tr.dispatched, tr.progress, tr.prefill_done = now, now, False
        if tr.first_dispatch is None:
            tr.first_dispatch = now
            self.waits.append(now - tr.arrived)
        self.loads[p].start_prefill(len(prompt))
        self.loads[d].start_decode(tr.rid)
        replica = self.plan.replica(p)
        embed_dev = next(s.device_id for s in replica.stages if s.embed)
        await self.bus.publish(
            t.DEVICE_INBOX,
            m.PrefillStart(
                request_id=tr.wire_id,
                token_ids=prompt,
                decoder_replica=d,
                sampling=tr.sampling.to_dict(),
                max_new_tokens=tr.max_new_tokens,
                generated=list(tr.generated),
                plan_version=self.version,
            ),
            device_id=embed_dev,
        )
        await self._event(
            tr.rid,
            "routed",
            {
                "prefill_replica": p,
                "decoder_replica": d,
                "plan_version": self.version,
                "retry": tr.retries,
                "attempt": tr.attempt,
            },
        )

    async def _token(self, dev: str, msg: m.TokenOut) -> None:
        rid, attempt = split_wire_id(msg.request_id)
        tr = self.requests.get(rid)
        if (
            tr is None
            or attempt != tr.attempt
            or msg.plan_version != tr.plan_version
            or tr.dispatched is None
        ):
            return  # late token of a finished, failed or abandoned attempt
        if msg.index != len(tr.generated):
            if msg.index > len(tr.generated):
                log.warning(
                    "request %s: token %d arrived, expected %d",
                    tr.rid,
                    msg.index,
                    len(tr.generated),
                )
            return  # duplicate (QoS 1 redelivery) or gap
        now = time.monotonic()
        tr.progress = now
        if not tr.prefill_done:
            tr.prefill_done = True
            assert tr.prefill_replica is not None
            self.loads[tr.prefill_replica].finish_prefill(len(tr.prompt_ids) + len(tr.generated))
            if tr.first_token is None:
                tr.first_token = now
                self.ttfts.append(now - tr.arrived)
                await self._event(tr.rid, "first_token", {"ttft_s": round(now - tr.arrived, 4)})
        tr.generated.append(msg.token_id)
        text = tr.decoder.push(msg.token_id)
        tr.texts.append(text)
        self.tokens_out += 1
        assert self.bus is not None
        await self.bus.publish(
            t.RESPONSE,
            m.ResponseEvent(
                request_id=tr.rid,
                event="token",
                token_ids=[msg.token_id],
                text=text,
                index=msg.index,
            ),
            client_id=tr.client_id,
            request_id=tr.rid,
        )
        if msg.finished:
            await self._finish(tr, msg.finish_reason or "stop")
        else:
            await self._dispatch()

    async def _finish(self, tr: Track, reason: str) -> None:
        assert self.bus is not None
        self._release_slots(tr)
        self.requests.pop(tr.rid, None)
        self.completed += 1
        now = time.monotonic()
        first = tr.first_token or now
        n = len(tr.generated)
        stats = {
            "prompt_ids": tr.prompt_ids,
            "prompt_tokens": len(tr.prompt_ids),
            "new_tokens": n,
            "queue_wait_s": round((tr.first_dispatch or now) - tr.arrived, 4),
            "ttft_s": round(first - tr.arrived, 4),
            "total_s": round(now - tr.arrived, 4),
            "decode_tokens_per_s": round((n - 1) / (now - first), 2)
            if n > 1 and now > first
            else 0.0,
            "prefill_replica": tr.prefill_replica,
            "decoder_replica": tr.decoder_replica,
            "plan_version": tr.plan_version,
            "retries": tr.retries,
            "restarts": tr.restarts,
        }
        final = m.ResponseEvent(
            request_id=tr.rid,
            event="done",
            token_ids=list(tr.generated),
            text=self.tokenizer.decode(tr.generated),
            index=n,
            finish_reason=reason,
            stats=stats,
        )
        self._remember(tr, final)
        await self.bus.publish(t.RESPONSE, final, client_id=tr.client_id, request_id=tr.rid)
        await self._event(tr.rid, "done", {k: v for k, v in stats.items() if k != "prompt_ids"})
        await self._maybe_switch()
        await self._dispatch()

    async def fail(self, tr: Track, code: str, text: str) -> None:
        """End a request with an error event; its devices drop their state."""
        assert self.bus is not None
        self._release_slots(tr)
        self.requests.pop(tr.rid, None)
        with contextlib.suppress(ValueError):
            self.queue.remove(tr.rid)
        self.failed += 1
        await self._release_on_devices(tr)
        final = m.ResponseEvent(
            request_id=tr.rid,
            event="error",
            error_code=code,
            error=text,
            token_ids=list(tr.generated),
            index=len(tr.generated),
        )
        self._remember(tr, final)
        with contextlib.suppress(E2LLMError):
            await self.bus.publish(t.RESPONSE, final, client_id=tr.client_id, request_id=tr.rid)
        await self._event(tr.rid, "failed", {"code": code})
        await self._maybe_switch()
        await self._dispatch()

    def _release_slots(self, tr: Track) -> None:
        if (
            tr.prefill_replica is not None
            and not tr.prefill_done
            and tr.prefill_replica in self.loads
            and tr.dispatched is not None
        ):
            self.loads[tr.prefill_replica].finish_prefill(len(tr.prompt_ids) + len(tr.generated))
        if tr.decoder_replica is not None and tr.decoder_replica in self.loads:
            self.loads[tr.decoder_replica].finish_decode(tr.rid)
        tr.dispatched = None

    async def _release_on_devices(self, tr: Track) -> None:
        """Best effort: the devices of the current attempt free its state now (they would
        anyway after their request timeout)."""
        if self.plan is None or self.bus is None or tr.plan_version != self.version:
            return
        devs = set()
        for rep in (tr.prefill_replica, tr.decoder_replica):
            if rep is not None:
                with contextlib.suppress(KeyError):
                    devs |= {s.device_id for s in self.plan.replica(rep).stages}
        for dev in devs - self.lost:
            with contextlib.suppress(E2LLMError):
                await self.bus.publish(
                    t.DEVICE_INBOX,
                    m.Release(
                        request_id=tr.wire_id, reason="orchestrator", plan_version=self.version
                    ),
                    device_id=dev,
                    timeout=2.0,
                )

    async def _requeue(self, which: Callable[[Track], bool], why: str, *, fault: bool) -> None:
        """Running requests picked by `which` abandon their attempt and go back to the
        front of the queue; they continue from the tokens already streamed. A fault counts
        against `max_retries`."""
        running = [tr for tr in self.requests.values() if tr.dispatched is not None and which(tr)]
        for tr in sorted(running, key=lambda x: x.arrived, reverse=True):
            await self._release_on_devices(tr)
            self._release_slots(tr)
            tr.restarts += 1
            self.restarted += 1
            if fault:
                tr.retries += 1
                if tr.retries > self.cfg.max_retries:
                    await self.fail(
                        tr,
                        "retries_exhausted",
                        f"{why}; gave up after {self.cfg.max_retries} faults",
                    )
                    continue
            tr.attempt += 1
            tr.prefill_replica = tr.decoder_replica = None
            self.queue.appendleft(tr.rid)
            await self._event(
                tr.rid, "requeued", {"reason": why, "generated": len(tr.generated), "fault": fault}
            )

    async def _fail_queue(self, code: str, text: str) -> None:
        for rid in list(self.queue):
            tr = self.requests.get(rid)
            if tr is not None:
                await self.fail(tr, code, text)

    async def _device_error(self, dev: str, msg: m.ErrorReport) -> None:
        """A device could not go on with the live attempt: retry it (bounded)."""
        if not msg.request_id:
            return
        rid, attempt = split_wire_id(msg.request_id)
        tr = self.requests.get(rid)
        if tr is None or attempt != tr.attempt or tr.dispatched is None:
            return  # about an abandoned attempt, or not ours
        if tr.retries >= self.cfg.max_retries:
            await self.fail(tr, msg.code, f"device {dev}: {msg.message}")
            return
        await self._requeue_one(tr, f"device {dev}: {msg.code}: {msg.message}")
        await self._dispatch()

    async def _requeue_one(self, tr: Track, why: str) -> None:
        await self._requeue(lambda x: x is tr, why, fault=True)

    async def _cancel(self, client: str, msg: m.Release) -> None:
        tr = self.requests.get(msg.request_id)
        if tr is not None and tr.client_id == client:
            await self.fail(tr, "cancelled", msg.reason or "cancelled by the client")

    async def _event(self, rid: str, event: str, data: dict[str, Any]) -> None:
        assert self.bus is not None
        with contextlib.suppress(E2LLMError):
            await self.bus.publish(
                t.REQUEST_EVENTS,
                m.RequestEvent(request_id=rid, event=event, data=data),
                request_id=rid,
            )

    # ------------------------------------------------------------------ ticker

    async def _ticker(self) -> None:
        last_summary = 0.0
        while True:
            await asyncio.sleep(0.25)
            try:
                await self._tick()
                if time.monotonic() - last_summary > 2.0:
                    last_summary = time.monotonic()
                    await self._summary()
            except E2LLMError as exc:  # e.g. the broker is down: try again next tick
                self._ratelog.warning("tick", "ticker: %s", exc)

    async def _tick(self) -> None:
        assert self.bus is not None
        now = time.monotonic()
        if self.bus.stats.connects != self.connects_seen:
            again = self.connects_seen > 0
            self.connects_seen = self.bus.stats.connects
            if again:
                await self._reconnected()
        if not self.bus.connected:
            return  # silence from everyone is our own problem, not theirs
        for dev in self._watched_devices() - self.lost:
            seen = self.devices.get(dev, DeviceEntry()).last_seen
            if now - seen > self.cfg.heartbeat_timeout:
                await self._device_lost(dev, f"silent for {now - seen:.1f} s")
        for tr in list(self.requests.values()):
            if tr.dispatched is not None and now - tr.progress > self.cfg.request_timeout:
                await self._requeue_one(tr, f"no progress for {self.cfg.request_timeout:.0f} s")
            elif (
                tr.dispatched is None
                and self.plan is None
                and self.plan_error
                and now - tr.arrived > self.cfg.request_timeout
            ):
                await self.fail(tr, "no_plan", self.plan_error)
        await self._maybe_plan()
        await self._dispatch()

    async def _reconnected(self) -> None:
        """Back on the broker: messages in flight may be lost, subscriptions of devices may
        not be back yet. Restart the attempts, and dispatch again once each device of the
        plan has been heard live (its state is re-published on its own reconnect and every
        heartbeat interval)."""
        now = time.monotonic()
        log.warning("reconnected to the broker: restarting requests in flight")
        self.confirm_after = now
        for e in self.devices.values():
            e.last_seen = now
        if self.plan is not None:
            self.serving = False
            self.plan_ready.clear()
        await self._requeue(lambda tr: True, "broker connection lost", fault=False)

    def summary(self) -> dict[str, Any]:
        up = time.monotonic() - self.started
        return {
            "plan_version": self.version,
            "serving": self.serving,
            "plan_error": self.plan_error,
            "devices": {
                d: (e.state.status if e.state else "unknown")
                for d, e in sorted(self.devices.items())
            },
            "replicas": [
                {
                    "id": r.replica_id,
                    "role": r.role,
                    "concurrency": r.concurrency,
                    "devices": [s.device_id for s in r.stages],
                    "prefill_queue_tokens": self.loads[r.replica_id].prefill_tokens
                    if r.replica_id in self.loads
                    else 0,
                    "decoding": len(self.loads[r.replica_id].decoding)
                    if r.replica_id in self.loads
                    else 0,
                }
                for r in (self.plan.replicas if self.plan else [])
            ],
            "queued": len(self.queue),
            "in_flight": len(self.requests) - len(self.queue),
            "completed": self.completed,
            "failed": self.failed,
            "dead_replicas": sorted(self.dead),
            "draining": self.pending is not None,
            "restarted": self.restarted,
            "last_recovery_s": round(self.recoveries[-1], 3) if self.recoveries else None,
            "rss_bytes": rss_bytes(),
            "mean_wait_s": round(sum(self.waits) / len(self.waits), 4) if self.waits else None,
            "mean_ttft_s": round(sum(self.ttfts) / len(self.ttfts), 4) if self.ttfts else None,
            "tokens_out": self.tokens_out,
            "uptime_s": round(up, 1),
        }

    async def _summary(self) -> None:
        assert self.bus is not None
        with contextlib.suppress(E2LLMError):
            await self.bus.publish(
                t.CLUSTER_TELEMETRY,
                m.Telemetry(source=self.cfg.orchestrator_id, data=self.summary()),
            )


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
