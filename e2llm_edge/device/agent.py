"""The device agent: runs its share of one replica and passes work along over MQTT.

A device reads the retained plan, loads only its segments (sha256 checked), and then
serves its inbox: prompts to embed, activations to advance through its layers, KV chunks
handed over from a PREFILL replica, decode steps. The last stage of a replica samples.
Decode steps of the requests in flight are batched: one pass per step for all of them.

Every request a device holds has a context (sampling, limits, the decoder replica) that
travels with the first message it sees for that request, and a deadline after which its
KV cache is freed. Failures of one request are reported to the orchestrator and never
stop the others; errors are logged rate-limited (the network chooses how many there are).
A worker that holds work but finishes nothing for `stage_timeout` reports status `error`
(stuck), which the orchestrator treats as a lost device; it reports `ready` again when it
moves.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from e2llm_edge.device.fast_runner import (
    VariantEmbedder,
    VariantHead,
    check_variant,
    choose_variant,
    load_stage,
)
from e2llm_edge.device.runner import Embedder, Head, Stage, StageCache
from e2llm_edge.device.sampling import Sampling, SamplingError, sample
from e2llm_edge.errors import CodecError, E2LLMError
from e2llm_edge.sysinfo import rss_bytes
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import BadMessage, Bus, BusConfig, Envelope, RateLimitedLog, Will
from onnx_export.errors import ExportError
from onnx_export.manifest import Manifest
from planner.plan import Plan, Replica
from planner.plan import Stage as PlanStage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one device agent."""

    device_id: str
    """This device's id (also its broker user name in a secured cluster)."""
    bus: BusConfig
    """How to reach the broker."""
    model_dir: Path
    """The exported model directory (manifest, segments)."""
    memory_mb: float
    """Memory budget announced to the planner for weights plus KV cache."""
    threads: int | None = None
    """onnxruntime threads (default: the CPUs this process may use)."""
    link: dict[str, float] | None = None
    """Link figures announced to the planner: bandwidth_mbps, latency_ms."""
    profile_path: Path | None = None
    """Where the measured profile is cached (default: next to the model)."""
    request_timeout: float = 120.0
    """Seconds without progress after which a request's state and KV cache are freed."""
    kv_wait_timeout: float = 30.0
    """Seconds a decode step may wait for its KV cache to arrive."""
    max_batch: int = 16
    """Largest decode batch run in one pass."""
    variant: tuple[str, str] | None = None
    """(graph, precision) to run; default: the best the manifest holds and this
    onnxruntime supports (contrib/exact, else standard/fp32)."""
    kv_context: int = 1024
    """Tokens per pooled KV slot of a contrib decoder (longer requests get own buffers)."""
    telemetry_interval: float = 2.0
    """Seconds between telemetry and heartbeat messages."""
    stage_timeout: float = 30.0
    """Seconds the worker may hold queued work without finishing any before this device
    reports itself stuck (status error)."""


@dataclass(frozen=True)
class Placement:
    """This device's part of the current plan."""

    version: int
    replica: Replica
    index: int
    plan: Plan

    @property
    def stage(self) -> PlanStage:
        return self.replica.stages[self.index]

    @property
    def is_last(self) -> bool:
        return self.index == len(self.replica.stages) - 1

    def next_device(self) -> str:
        return self.replica.stages[self.index + 1].device_id

    def replica_by_id(self, rid: int) -> Replica:
        for r in self.plan.replicas:
            if r.replica_id == rid:
                return r
        raise KeyError(rid)


def find_placement(plan: Plan, device_id: str) -> Placement | None:
    for r in plan.replicas:
        for i, s in enumerate(r.stages):
            if s.device_id == device_id:
                return Placement(plan.version, r, i, plan)
    return None


def embed_device(replica: Replica) -> str:
    return next(s.device_id for s in replica.stages if s.embed)


def layer_owner(replica: Replica, layer: int) -> str:
    return next(s.device_id for s in replica.stages if s.layer_start <= layer < s.layer_end)


@dataclass
class RequestContext:
    """What every device of a request's path needs to know about it."""

    sampling: Sampling
    max_new_tokens: int
    eos_token_id: int | None
    prompt_len: int
    index0: int
    decoder_replica: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "sampling": self.sampling.to_dict(),
            "max_new_tokens": self.max_new_tokens,
            "eos": self.eos_token_id,
            "prompt_len": self.prompt_len,
            "index0": self.index0,
            "decoder_replica": self.decoder_replica,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestContext:
        try:
            return cls(
                sampling=Sampling.from_dict(d["sampling"]),
                max_new_tokens=int(d["max_new_tokens"]),
                eos_token_id=None if d.get("eos") is None else int(d["eos"]),
                prompt_len=int(d["prompt_len"]),
                index0=int(d["index0"]),
                decoder_replica=int(d["decoder_replica"]),
            )
        except (KeyError, TypeError, ValueError, SamplingError) as exc:
            raise CodecError("context", f"invalid request context ({exc})") from exc

    @property
    def capacity(self) -> int:
        return self.prompt_len + self.max_new_tokens - self.index0


@dataclass
class RequestState:
    ctx: RequestContext
    cache: StageCache | None = None
    kv_ready: bool = False
    kv_layers_done: set[int] = field(default_factory=set)
    waiting: list[tuple[m.Message, float]] = field(default_factory=list)
    last_step: int = -1
    touched: float = field(default_factory=time.monotonic)
    prefilled_here: bool = False


class RequestFailed(E2LLMError):
    """Processing one request failed; reported to the orchestrator with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Agent:
    """One device. `async with Agent(cfg) as a: await a.run()`, or `await Agent(cfg).run()`."""

    def __init__(self, config: AgentConfig) -> None:
        self.cfg = config
        self.id = config.device_id
        self.manifest = Manifest.load(config.model_dir)
        self.variant = config.variant or choose_variant(self.manifest)
        check_variant(self.manifest, *self.variant)
        self.placement: Placement | None = None
        self.embedder: Embedder | None = None
        self.head: Head | None = None
        self.stage: Stage | None = None
        self.requests: dict[str, RequestState] = {}
        self.kv = m.KVAssembler()
        self.work: deque[m.Message] = deque()
        self.work_ready = asyncio.Event()
        self.status: str = "online"
        self.last_error: str | None = None
        self.tokens_done = 0
        self.pending_plan: Plan | None = None
        self.profile: dict[str, Any] = {}
        self.bus: Bus | None = None
        self._rate_t0, self._rate_n = time.monotonic(), 0
        self._ratelog = RateLimitedLog(log)
        self.worker_beat = time.monotonic()
        self.stuck = False
        self.counters: dict[str, float] = {
            "prefills": 0,
            "decode_steps": 0,
            "decode_batches": 0,
            "kv_chunks_in": 0,
            "kv_chunks_out": 0,
            "kv_bytes_in": 0,
            "kv_bytes_out": 0,
            "last_kv_send_s": 0.0,
            "last_kv_handoff_s": 0.0,
            "last_kv_wait_s": 0.0,
            "errors": 0,
        }

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        from e2llm_edge.device.profile import load_or_measure_profile

        self.profile = await asyncio.to_thread(
            load_or_measure_profile,
            self.manifest,
            self.cfg.threads,
            self.cfg.profile_path,
            self.variant,
        )
        will = Will(t.DEVICE_STATE, self._state_msg("offline"), {"device_id": self.id})
        async with Bus(self.cfg.bus, will=will, on_bad_message=self._on_bad) as bus:
            self.bus = bus
            await bus.subscribe(t.DEVICE_INBOX, device_id=self.id)
            await bus.subscribe(t.PLAN)
            await bus.publish(
                t.DEVICE_PROFILE,
                m.DeviceProfileMsg(
                    device_id=self.id,
                    memory_mb=self.cfg.memory_mb,
                    profile=self.profile,
                    link=self.cfg.link,
                    capabilities={
                        "variants": [list(v) for v in self.manifest.variants()],
                        "running": list(self.variant),
                    },
                ),
                device_id=self.id,
            )
            await self._publish_state()
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._receive(bus))
                tg.create_task(self._worker())
                tg.create_task(self._housekeeping())

    async def _receive(self, bus: Bus) -> None:
        async for env in bus:
            self._accept(env)

    def _accept(self, env: Envelope) -> None:
        msg = env.msg
        if isinstance(msg, m.PlanMsg):
            try:
                self.pending_plan = Plan.from_dict(msg.plan)
            except Exception as exc:  # planner validation names the field
                self._log_error(None, "bad_plan", f"plan rejected: {exc}")
                return
        else:
            self.work.append(msg)
        self.work_ready.set()

    async def _on_bad(self, bad: BadMessage) -> None:
        """The bus logged it; if it names a request, that request cannot go on here."""
        self.counters["errors"] += 1
        self.last_error = f"bad message on {bad.topic_str}: {bad.error}"
        rid = getattr(bad.error, "request_id", None)
        if rid and bad.topic is t.DEVICE_INBOX and self.bus is not None:
            await self._fail(rid, "bad_message", f"malformed message: {bad.error}")

    # ------------------------------------------------------------------ plan

    async def _apply_plan(self, plan: Plan) -> None:
        place = find_placement(plan, self.id)
        old = self.placement
        if old is not None and plan.version <= old.version and self.status == "ready":
            # the retained plan again (our reconnect, or the orchestrator re-publishing
            # it after a broker restart), or an older one: keep the requests running
            await self._publish_state()
            return
        if place is None:
            self.placement = None
            self.embedder = self.head = self.stage = None
            self._drop_all("plan_changed")
            self.status = "online"
            await self._publish_state()
            return
        same = (
            old is not None
            and old.stage.layer_start == place.stage.layer_start
            and old.stage.layer_end == place.stage.layer_end
            and old.stage.embed == place.stage.embed
            and old.stage.head == place.stage.head
            and old.replica.role == place.replica.role
            and old.replica.concurrency == place.replica.concurrency
        )
        if not same:
            self.status = "loading"
            await self._publish_state()
            try:
                # the orchestrator may have added range segments for this plan
                self.manifest = Manifest.load(self.cfg.model_dir)
                await asyncio.to_thread(self._load, place.stage, place.replica)
            except ExportError as exc:
                self.status = "error"
                self.last_error = str(exc)
                self._log_error(None, "load_failed", str(exc))
                await self._publish_state()
                return
        # Requests of an older plan may not continue under a different one.
        self._drop_all("plan_changed")
        self.placement = place
        self.status = "ready"
        await self._publish_state()
        log.info(
            "%s: plan v%d, replica %d (%s) stage %d layers [%d, %d)%s%s",
            self.id,
            place.version,
            place.replica.replica_id,
            place.replica.role,
            place.index,
            place.stage.layer_start,
            place.stage.layer_end,
            " +embed" if place.stage.embed else "",
            " +head" if place.stage.head else "",
        )

    def _load(self, st: PlanStage, replica: Replica) -> None:
        v, n = self.variant, self.cfg.threads
        # decoders batch their requests in one pool of KV slots (contrib graph)
        slots = min(replica.concurrency, self.cfg.max_batch) if replica.role != "prefill" else 0
        self.stage = load_stage(
            self.manifest,
            st.layer_start,
            st.layer_end,
            v,
            threads=n,
            max_batch=slots,
            context=self.cfg.kv_context,
        )
        self.embedder = VariantEmbedder(self.manifest, v, threads=n) if st.embed else None
        self.head = VariantHead(self.manifest, v, threads=n) if st.head else None

    def _drop_all(self, reason: str) -> None:
        for rid in list(self.requests):
            self._free(rid)

    # ------------------------------------------------------------------ work loop

    async def _worker(self) -> None:
        while True:
            self._beat()
            await self.work_ready.wait()
            self.work_ready.clear()
            if self.pending_plan is not None:
                plan, self.pending_plan = self.pending_plan, None
                try:
                    await self._apply_plan(plan)
                except Exception as exc:  # a bad plan must not take the device down
                    log.exception("%s: applying plan v%d failed", self.id, plan.version)
                    self.status, self.last_error = "error", f"plan v{plan.version}: {exc}"
                    with contextlib.suppress(E2LLMError):
                        await self._publish_state()
            while self.work:
                msg = self.work.popleft()
                if self._is_decode(msg):
                    batch = [msg]
                    while (
                        self.work
                        and len(batch) < self.cfg.max_batch
                        and self._is_decode(self.work[0])
                    ):
                        batch.append(self.work.popleft())
                    await self._guard_batch(batch)
                else:
                    await self._guard(msg)
                self._beat()
                if self.pending_plan is not None:
                    self.work_ready.set()
                    break

    def _beat(self) -> None:
        self.worker_beat = time.monotonic()
        if self.stuck:
            self.stuck = False
            log.warning("%s: worker moving again", self.id)
            if self.status == "error" and self.placement is not None:
                self.status = "ready"

    @staticmethod
    def _is_decode(msg: m.Message) -> bool:
        return isinstance(msg, m.DecodeStep) or (
            isinstance(msg, m.Activation) and msg.phase == "decode"
        )

    async def _guard(self, msg: m.Message) -> None:
        rid = getattr(msg, "request_id", None)
        try:
            await self._handle(msg)
        except (RequestFailed, CodecError, SamplingError, ValueError) as exc:
            code = exc.code if isinstance(exc, RequestFailed) else "bad_request"
            await self._fail(rid, code, str(exc))
        except Exception as exc:
            self._ratelog.warning(
                f"internal:{type(msg).__name__}:{type(exc).__name__}",
                "%s: %s failed: %s: %s",
                self.id,
                type(msg).__name__,
                type(exc).__name__,
                exc,
            )
            await self._fail(rid, "internal", f"{type(exc).__name__}: {exc}")

    async def _guard_batch(self, batch: list[m.Message]) -> None:
        try:
            await self._decode_batch(batch)
        except Exception as exc:
            self._ratelog.warning(
                f"batch:{type(exc).__name__}",
                "%s: decode batch failed: %s: %s",
                self.id,
                type(exc).__name__,
                exc,
            )
            for msg in batch:
                await self._fail(
                    getattr(msg, "request_id", None), "internal", f"{type(exc).__name__}: {exc}"
                )

    def _check_plan(self, msg: m.Message) -> Placement:
        place = self.placement
        if place is None or self.status != "ready":
            raise RequestFailed("not_ready", f"device {self.id} holds no stage of a plan")
        if msg.plan_version != place.version:
            raise RequestFailed(
                "plan_version",
                f"message for plan v{msg.plan_version}, device {self.id} runs v{place.version}",
            )
        return place

    async def _handle(self, msg: m.Message) -> None:
        if isinstance(msg, m.Release):
            self._free(msg.request_id)
            return
        place = self._check_plan(msg)
        if isinstance(msg, m.PrefillStart):
            await self._prefill_start(place, msg)
        elif isinstance(msg, m.Activation):
            await self._prefill_activation(place, msg)
        elif isinstance(msg, m.KVChunk):
            await self._kv_chunk(place, msg)
        elif isinstance(msg, m.DecodeStep) and place.index != 0:
            await self._embed_for_stage0(place, msg)
        else:
            raise RequestFailed("bad_kind", f"{type(msg).__name__} is not for a device inbox")

    # ------------------------------------------------------------------ prefill

    async def _prefill_start(self, place: Placement, msg: m.PrefillStart) -> None:
        if self.embedder is None:
            raise RequestFailed("misrouted", f"device {self.id} does not hold the embedding")
        if not msg.token_ids:
            raise RequestFailed("bad_request", "prefill with no tokens")
        vocab = int(self.manifest.config["vocab_size"])
        if min(msg.token_ids) < 0 or max(msg.token_ids) >= vocab:
            raise RequestFailed("bad_request", f"token ids must be in [0, {vocab})")
        ctx = RequestContext(
            sampling=Sampling.from_dict(msg.sampling),
            max_new_tokens=msg.max_new_tokens,
            eos_token_id=self.manifest.config.get("eos_token_id"),
            prompt_len=len(msg.token_ids),
            index0=len(msg.generated),
            decoder_replica=msg.decoder_replica,
        )
        self._check_context(place, ctx)
        ids = np.asarray([msg.token_ids], np.int64)
        hidden = await asyncio.to_thread(self.embedder.run, ids)
        act = m.Activation(
            request_id=msg.request_id,
            phase="prefill",
            hidden=hidden,
            position_start=0,
            step=0,
            context=ctx.to_dict(),
            plan_version=place.version,
        )
        if place.index == 0:
            await self._prefill_activation(place, act)
        else:  # embedding next to the head: hand the hidden states to stage 0
            await self._send(place.replica.stages[0].device_id, act)

    async def _embed_for_stage0(self, place: Placement, msg: m.DecodeStep) -> None:
        if self.embedder is None:
            raise RequestFailed("misrouted", f"device {self.id} does not hold the embedding")
        hidden = await asyncio.to_thread(self.embedder.run, np.asarray([[msg.token_id]], np.int64))
        await self._send(
            place.replica.stages[0].device_id,
            m.Activation(
                request_id=msg.request_id,
                phase="decode",
                hidden=hidden,
                position_start=msg.position,
                step=msg.step,
                context=msg.context,
                plan_version=place.version,
                seq=msg.step,
            ),
        )

    async def _prefill_activation(self, place: Placement, msg: m.Activation) -> None:
        if msg.phase != "prefill":
            raise RequestFailed("bad_request", "decode activation outside a batch")
        assert self.stage is not None
        ctx = RequestContext.from_dict(msg.context)
        if msg.request_id in self.requests and self.requests[msg.request_id].prefilled_here:
            return  # QoS 1 redelivery
        self._check_context(place, ctx)
        if msg.hidden.shape[0] != 1 or msg.hidden.shape[1] != ctx.prompt_len:
            raise RequestFailed(
                "bad_request",
                f"prefill activation of shape "
                f"{list(msg.hidden.shape)} for a {ctx.prompt_len}-token prompt",
            )
        st = RequestState(ctx=ctx, cache=self.stage.new_cache(ctx.capacity), prefilled_here=True)
        self.requests[msg.request_id] = st
        assert st.cache is not None
        hidden = await asyncio.to_thread(self.stage.run, msg.hidden, 0, st.cache)
        self.counters["prefills"] += 1
        decoder = place.replica_by_id(ctx.decoder_replica)
        handoff = decoder.replica_id != place.replica.replica_id
        if not place.is_last:
            await self._send(
                place.next_device(),
                m.Activation(
                    request_id=msg.request_id,
                    phase="prefill",
                    hidden=hidden,
                    position_start=0,
                    step=0,
                    context=msg.context,
                    plan_version=place.version,
                ),
            )
        if handoff:
            await self._hand_over_kv(place, decoder, msg.request_id, st)
        if place.is_last:
            await self._sample_and_continue(
                place, msg.request_id, st, hidden, index=ctx.index0, handoff_to=decoder
            )
        if handoff:
            self._free(msg.request_id)

    async def _hand_over_kv(
        self, place: Placement, decoder: Replica, rid: str, st: RequestState
    ) -> None:
        """Send this stage's KV cache, layer by layer, to the decoder devices holding them."""
        assert st.cache is not None and self.stage is not None
        t0 = time.time()
        ctx = {**st.ctx.to_dict(), "kv_t0": t0}  # wall clock: the receiver times the handoff
        for layer in range(self.stage.start, self.stage.end):
            k, v = st.cache.kv(layer)
            target = layer_owner(decoder, layer)
            for chunk in m.kv_chunks(
                rid,
                layer,
                np.ascontiguousarray(k),
                np.ascontiguousarray(v),
                plan_version=place.version,
            ):
                await self._send(target, dataclasses.replace(chunk, context=ctx))
                self.counters["kv_chunks_out"] += 1
                self.counters["kv_bytes_out"] += chunk.key.nbytes + chunk.value.nbytes
        self.counters["last_kv_send_s"] = round(time.time() - t0, 6)

    # ------------------------------------------------------------------ KV receive

    async def _kv_chunk(self, place: Placement, msg: m.KVChunk) -> None:
        assert self.stage is not None
        if not self.stage.start <= msg.layer < self.stage.end:
            raise RequestFailed(
                "misrouted",
                f"KV for layer {msg.layer}, device {self.id} holds "
                f"[{self.stage.start}, {self.stage.end})",
            )
        st = self.requests.get(msg.request_id)
        if st is None:
            ctx = RequestContext.from_dict(msg.context)
            self._check_context(place, ctx)
            st = RequestState(ctx=ctx, cache=self.stage.new_cache(ctx.capacity))
            self.requests[msg.request_id] = st
        st.touched = time.monotonic()
        self.counters["kv_chunks_in"] += 1
        if msg.layer in st.kv_layers_done:
            return  # redelivery of a layer already loaded
        if self.kv.add(msg):
            start, k, v = self.kv.take(msg.request_id, msg.layer)
            assert st.cache is not None
            st.cache.load(msg.layer, k, v, start)
            st.kv_layers_done.add(msg.layer)
            self.counters["kv_bytes_in"] += k.nbytes + v.nbytes
            if len(st.kv_layers_done) == self.stage.end - self.stage.start:
                st.kv_ready = True
                if "kv_t0" in msg.context:
                    self.counters["last_kv_handoff_s"] = round(
                        time.time() - float(msg.context["kv_t0"]), 6
                    )
                waiting, st.waiting = st.waiting, []
                # What the handoff cost the request: how long its first step waited for
                # the KV here (0 when the KV was in before the step).
                self.counters["last_kv_wait_s"] = (
                    round(time.monotonic() - min(t for _, t in waiting), 6) if waiting else 0.0
                )
                for w, _ in waiting:
                    self.work.appendleft(w)
                if waiting:
                    self.work_ready.set()

    # ------------------------------------------------------------------ decode

    async def _decode_batch(self, batch: list[m.Message]) -> None:
        place0 = self.placement
        if place0 is not None and place0.index != 0:
            # embedding next to the head: this device embeds the token, stage 0 runs it
            for step_msg in [x for x in batch if isinstance(x, m.DecodeStep)]:
                await self._guard(step_msg)
            batch = [x for x in batch if not isinstance(x, m.DecodeStep)]
        ready: list[tuple[m.Message, RequestState]] = []
        for msg in batch:
            try:
                place = self._check_plan(msg)
                st = self._decode_state(msg)
            except (RequestFailed, CodecError, SamplingError) as exc:
                code = exc.code if isinstance(exc, RequestFailed) else "bad_request"
                await self._fail(getattr(msg, "request_id", None), code, str(exc))
                continue
            if st is None:
                continue  # duplicate
            if not st.kv_ready:
                st.waiting.append((msg, time.monotonic()))
                continue
            ready.append((msg, st))
        if not ready:
            return
        place = self._check_plan(ready[0][0])
        # Inline on the loop's thread, not asyncio.to_thread: a decode step is a few ms, and
        # the handoff to a worker and back costs two thread wake-ups per pipeline hop, the
        # slow part of a hop on small or virtualised CPUs (measured: 4 stages 24.8 -> 27.9
        # and 22.5 -> 30.2 tok/s, A/B alternating). Prefill, which is long, still goes to a
        # thread so the loop keeps serving its connection meanwhile.
        hidden = self._decode_pass(ready)
        self.counters["decode_steps"] += len(ready)
        self.counters["decode_batches"] += 1
        for (msg, st), h in zip(ready, hidden, strict=True):
            assert isinstance(msg, m.DecodeStep | m.Activation)
            rid, step = msg.request_id, msg.step
            st.last_step = step
            st.touched = time.monotonic()
            if place.is_last:
                await self._sample_and_continue(
                    place, rid, st, h[None], index=step, handoff_to=None
                )
            else:
                await self._send(
                    place.next_device(),
                    m.Activation(
                        request_id=rid,
                        phase="decode",
                        hidden=h[None],
                        step=step,
                        position_start=_position(msg),
                        context=st.ctx.to_dict() if step == st.ctx.index0 + 1 else {},
                        plan_version=place.version,
                        seq=step,
                    ),
                )

    def _decode_state(self, msg: m.Message) -> RequestState | None:
        assert isinstance(msg, m.DecodeStep | m.Activation)
        rid, step, ctx_d = msg.request_id, msg.step, msg.context
        st = self.requests.get(rid)
        if st is None:
            if not ctx_d:
                raise RequestFailed(
                    "unknown_request",
                    f"device {self.id} has no state for request {rid} (released or timed out)",
                )
            assert self.stage is not None and self.placement is not None
            ctx = RequestContext.from_dict(ctx_d)
            self._check_context(self.placement, ctx)
            st = RequestState(ctx=ctx, cache=self.stage.new_cache(ctx.capacity))
            # a mixed replica never hands KV over; its cache comes from its own prefill
            self.requests[rid] = st
        if step <= st.last_step:
            return None
        if st.prefilled_here:
            st.kv_ready = True
        return st

    def _decode_pass(self, ready: list[tuple[m.Message, RequestState]]) -> np.ndarray:
        """One batched step: embed tokens (or stack hidden states) and run the layers."""
        assert self.stage is not None
        rows: list[np.ndarray] = []
        caches: list[StageCache] = []
        for msg, st in ready:
            assert isinstance(msg, m.DecodeStep | m.Activation) and st.cache is not None
            if st.cache.length != _position(msg):
                raise RequestFailed(
                    "position",
                    f"request {msg.request_id}: step at position "
                    f"{_position(msg)}, cache holds {st.cache.length} tokens",
                )
            if isinstance(msg, m.DecodeStep):
                if self.embedder is None:
                    raise RequestFailed("misrouted", f"device {self.id} cannot embed")
                rows.append(self.embedder.run(np.asarray([[msg.token_id]], np.int64)))
            else:
                rows.append(msg.hidden)
            caches.append(st.cache)
        return self.stage.run_batch(np.concatenate(rows, axis=0), caches)

    async def _sample_and_continue(
        self,
        place: Placement,
        rid: str,
        st: RequestState,
        hidden: np.ndarray,
        index: int,
        handoff_to: Replica | None,
    ) -> None:
        assert self.head is not None
        logits = self.head.run(hidden[:, -1:, :])  # one row: inline, as decode steps
        ctx = st.ctx
        token = sample(logits[0, -1], ctx.sampling, index)
        finished = token == ctx.eos_token_id or index >= ctx.max_new_tokens - 1
        reason = ("stop" if token == ctx.eos_token_id else "length") if finished else None
        self.tokens_done += 1
        out = m.TokenOut(
            request_id=rid,
            token_id=token,
            index=index,
            finished=finished,
            finish_reason=reason,
            plan_version=place.version,
            seq=index,
        )
        decoder = handoff_to or place.replica
        if finished:
            await self._send_orchestrator(out)
            for s in decoder.stages:
                if s.device_id != self.id:
                    await self._send(
                        s.device_id,
                        m.Release(request_id=rid, reason=reason or "", plan_version=place.version),
                    )
            self._free(rid)
            return
        step = index + 1
        step_msg = m.DecodeStep(
            request_id=rid,
            token_id=token,
            position=ctx.prompt_len + (index - ctx.index0),
            step=step,
            context=ctx.to_dict() if index == ctx.index0 else {},
            plan_version=place.version,
            seq=step,
        )
        # The next step goes first: the token's way to the client is off the critical path.
        await self._send(embed_device(decoder), step_msg)
        await self._send_orchestrator(out)

    # ------------------------------------------------------------------ plumbing

    def _check_context(self, place: Placement, ctx: RequestContext) -> None:
        """A context from the network decides how much KV memory we allocate: bound it."""
        limit = int(self.manifest.config["max_position"])
        if not (
            ctx.prompt_len >= 1
            and ctx.max_new_tokens >= 1
            and 0 <= ctx.index0 < ctx.max_new_tokens
            and ctx.prompt_len - ctx.index0 >= 1
            and ctx.capacity <= limit
        ):
            raise RequestFailed(
                "bad_request",
                f"request context out of range: prompt "
                f"{ctx.prompt_len}, max_new_tokens {ctx.max_new_tokens}, "
                f"index0 {ctx.index0}, context {limit}",
            )
        try:
            decoder = place.replica_by_id(ctx.decoder_replica)
        except KeyError:
            raise RequestFailed(
                "bad_request", f"plan v{place.version} has no replica {ctx.decoder_replica}"
            ) from None
        if decoder.role == "prefill":
            raise RequestFailed("bad_request", f"replica {ctx.decoder_replica} does not decode")

    async def _send(self, device_id: str, msg: m.Message) -> None:
        assert self.bus is not None
        if device_id == self.id and not isinstance(msg, m.KVChunk):
            self.work.append(msg)
            self.work_ready.set()
            return
        await self.bus.publish(t.DEVICE_INBOX, msg, device_id=device_id)

    async def _send_orchestrator(self, msg: m.Message) -> None:
        assert self.bus is not None
        await self.bus.publish(t.ORCHESTRATOR_INBOX, msg, device_id=self.id)

    def _free(self, rid: str) -> None:
        self.requests.pop(rid, None)
        self.kv.discard(rid)

    async def _fail(self, rid: str | None, code: str, message: str) -> None:
        self.counters["errors"] += 1
        self._log_error(rid, code, message)
        if rid is not None:
            self._free(rid)
        with contextlib.suppress(E2LLMError):
            await self._send_orchestrator(
                m.ErrorReport(
                    device_id=self.id,
                    request_id=rid,
                    code=code,
                    message=message,
                    plan_version=self.placement.version if self.placement else 0,
                )
            )

    def _log_error(self, rid: str | None, code: str, message: str) -> None:
        self.last_error = f"{code}: {message}"
        self._ratelog.warning(f"fail:{code}", "%s: request %s: %s: %s", self.id, rid, code, message)

    def _state_msg(self, status: str) -> m.DeviceState:
        p = self.placement
        return m.DeviceState(
            device_id=self.id,
            status=status,  # type: ignore[arg-type]
            plan_version=p.version if p else 0,
            role=p.replica.role if p else None,
            replica_id=p.replica.replica_id if p else None,
            layers=(p.stage.layer_start, p.stage.layer_end) if p else None,
            queue_depth=len(self.work),
            in_flight=len(self.requests),
            tokens_per_s=self._rate(),
            mem_bytes=rss_bytes(),
            last_error=self.last_error,
            ts=time.time(),
        )

    def _rate(self) -> float:
        now = time.monotonic()
        dt = now - self._rate_t0
        rate = (self.tokens_done - self._rate_n) / dt if dt > 0 else 0.0
        if dt > 10:
            self._rate_t0, self._rate_n = now, self.tokens_done
        return rate

    async def _publish_state(self) -> None:
        assert self.bus is not None
        await self.bus.publish(t.DEVICE_STATE, self._state_msg(self.status), device_id=self.id)

    async def _housekeeping(self) -> None:
        """Telemetry, heartbeats, and freeing requests that made no progress in time."""
        assert self.bus is not None
        while True:
            await asyncio.sleep(self.cfg.telemetry_interval)
            now = time.monotonic()
            if (
                self.work
                and not self.stuck
                and now - self.worker_beat > self.cfg.stage_timeout
                and self.status == "ready"
            ):
                self.stuck, self.status = True, "error"
                self.last_error = (
                    f"stuck: {len(self.work)} message(s) waiting, nothing done "
                    f"for {now - self.worker_beat:.0f} s"
                )
                log.warning("%s: %s", self.id, self.last_error)
            for rid, st in list(self.requests.items()):
                if now - st.touched > self.cfg.request_timeout:
                    log.info("%s: freeing idle request %s", self.id, rid)
                    self._free(rid)
                    continue
                for w, since in list(st.waiting):
                    if now - since > self.cfg.kv_wait_timeout:
                        st.waiting.remove((w, since))
                        await self._fail(
                            rid,
                            "kv_timeout",
                            f"KV cache for {rid} incomplete after {self.cfg.kv_wait_timeout:.0f} s",
                        )
                        break
            with contextlib.suppress(E2LLMError):
                await self._send_orchestrator(m.Heartbeat(device_id=self.id, ts=time.time()))
                await self._publish_state()
                await self.bus.publish(
                    t.DEVICE_TELEMETRY,
                    m.Telemetry(
                        source=self.id,
                        data={
                            **self.counters,
                            "requests": len(self.requests),
                            "kv_pending_bytes": self.kv.pending_bytes(),
                            "status": self.status,
                        },
                    ),
                    device_id=self.id,
                )


def _position(msg: m.DecodeStep | m.Activation) -> int:
    return msg.position if isinstance(msg, m.DecodeStep) else msg.position_start
