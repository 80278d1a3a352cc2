"""The device agent's shell: MQTT in, `DeviceCore` decisions, the engine, MQTT out.

Every decision lives in `device.core` (pure, tested in-process). This module connects to
the broker, feeds the core what arrives (plans, inbox messages) and the engine's results,
runs the engine (`Engine`: onnxruntime sessions and KV caches) for the jobs the core picks,
and publishes what the core returns. It also measures the device once (`e2llm profile`)
and announces the profile, and sends heartbeats, state and telemetry.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from e2llm_edge.device import core as c
from e2llm_edge.device.fast_runner import (
    VariantEmbedder,
    VariantHead,
    check_variant,
    choose_variant,
    load_stage,
)
from e2llm_edge.device.probe import probe_message_path
from e2llm_edge.device.runner import Embedder, Head, Stage, StageCache, configure_threads
from e2llm_edge.errors import E2LLMError
from e2llm_edge.sysinfo import rss_bytes
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import BadMessage, Bus, BusConfig, Envelope, RateLimitedLog, Will
from e2llm_edge.wire.messages import AttemptKey, DeviceStatus
from onnx_export.errors import ExportError
from onnx_export.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentConfig:
    """Settings of one device agent."""

    device_id: str
    """This device's id (also its broker user name in a secured cluster)."""
    bus: BusConfig
    """How to reach the broker."""
    model_dir: Path
    """The exported model directory (manifest, segments); only read."""
    memory_mb: float
    """Memory budget announced to the planner for weights plus KV cache."""
    threads: int | None = None
    """onnxruntime threads (default: the CPUs this process may use)."""
    link: m.LinkSpec | None = None
    """Link figures announced to the planner."""
    profile_path: Path | None = None
    """Where the measured profile is cached (default: the cache directory)."""
    request_timeout: float = 120.0
    """Seconds without progress after which a request's state and KV cache are freed."""
    kv_wait_timeout: float = 30.0
    """Seconds a decode step may wait for its KV cache to arrive."""
    max_batch: int = 16
    """Largest decode batch run in one pass."""
    kv_window: int = 4
    """KV chunks of a handoff in flight at once (1: one acknowledged before the next)."""
    max_inbox: int = 4096
    """Inbox messages waiting beyond this are refused (each answered 'overloaded')."""
    variant: tuple[str, str] | None = None
    """(graph, precision) to run; default: the best the manifest holds and this
    onnxruntime supports (contrib/exact, else standard/fp32)."""
    kv_context: int = 1024
    """Tokens per pooled KV slot of a contrib decoder (longer requests get own buffers)."""
    telemetry_interval: float = 2.0
    """Seconds between telemetry and heartbeat messages."""
    stage_timeout: float = 30.0
    """Seconds the device may hold queued work without finishing any before it reports
    itself stuck."""


class Engine:
    """The sessions of this device's stage and the KV caches of the attempts it holds."""

    def __init__(self, manifest: Manifest, variant: tuple[str, str], cfg: AgentConfig) -> None:
        self.manifest, self.variant, self.cfg = manifest, variant, cfg
        self.stage: Stage | None = None
        self.embedder: Embedder | None = None
        self.head: Head | None = None
        self.caches: dict[AttemptKey, StageCache] = {}

    def load(self, cmd: c.Load) -> None:
        """Slow (seconds): called in a thread. Sessions of the old stage are dropped first."""
        self.stage = self.embedder = self.head = None
        self.caches.clear()
        n, v = self.cfg.threads, self.variant
        start, end = cmd.layers
        self.stage = load_stage(
            self.manifest,
            start,
            end,
            v,
            threads=n,
            max_batch=min(cmd.slots, self.cfg.max_batch),
            context=self.cfg.kv_context,
        )
        self.embedder = VariantEmbedder(self.manifest, v, threads=n) if cmd.embed else None
        self.head = VariantHead(self.manifest, v, threads=n) if cmd.head else None

    def configure(self, slots: int) -> None:
        """A role or concurrency change: same sessions, a KV pool of another size."""
        self.caches.clear()
        reconfigure = getattr(self.stage, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(min(slots, self.cfg.max_batch))

    def run(self, job: c.Compute) -> c.Computed:
        try:
            out = self._run(job)
            kv = None
            if job.read_kv is not None:
                cache = self.caches[job.read_kv]
                assert self.stage is not None
                kv = {i: cache.kv(i) for i in range(self.stage.start, self.stage.end)}
            return c.Computed(job.job, out, kv)
        except Exception as exc:  # onnxruntime or a shape error: this job fails, not the device
            return c.Computed(job.job, None, error=f"{type(exc).__name__}: {exc}")

    def _embed(self, row: c.Row) -> np.ndarray:
        if row.ids is None:
            assert row.hidden is not None
            return row.hidden
        if self.embedder is None:
            raise ExportError("this device does not hold the embedding")
        return self.embedder.run(row.ids)

    def _run(self, job: c.Compute) -> np.ndarray:
        xs = [self._embed(r) for r in job.rows]
        if not job.layers:
            return np.concatenate(xs, axis=0)
        stage = self.stage
        assert stage is not None
        for r in job.rows:
            if r.new_cache is not None:
                self.caches[r.key] = stage.new_cache(r.new_cache)
        caches = [self.caches[r.key] for r in job.rows]
        if len(job.rows) == 1 and xs[0].shape[1] > 1:
            out = stage.run(xs[0], job.rows[0].start, caches[0])
        else:
            out = stage.run_batch(np.concatenate(xs, axis=0), caches)
        if job.head:
            assert self.head is not None
            return self.head.run(np.ascontiguousarray(out[:, -1:, :]))
        return out

    def write_kv(self, cmd: c.WriteKV) -> None:
        cache = self.caches.get(cmd.key)
        if cache is None:
            assert self.stage is not None
            cache = self.caches[cmd.key] = self.stage.new_cache(cmd.capacity)
        cache.load(cmd.layer, cmd.k, cmd.v, cmd.token_start)

    def free(self, key: AttemptKey) -> None:
        cache = self.caches.pop(key, None)
        release = getattr(cache, "release", None)
        if release is not None:
            release()

    def drop_all(self) -> None:
        for key in list(self.caches):
            self.free(key)


class Agent:
    """One device: `await Agent(cfg).run()`."""

    def __init__(self, config: AgentConfig) -> None:
        self.cfg = config
        self.id = config.device_id
        self.manifest = Manifest.load(config.model_dir)
        self.variant = config.variant or choose_variant(self.manifest)
        check_variant(self.manifest, *self.variant)
        mc = self.manifest.config
        self.core = c.DeviceCore(
            c.DeviceConfig(
                device_id=config.device_id,
                vocab_size=int(mc["vocab_size"]),
                max_position=int(mc["max_position"]),
                hidden_size=int(mc["hidden_size"]),
                eos_token_id=mc.get("eos_token_id"),
                max_batch=config.max_batch,
                max_inbox=config.max_inbox,
                request_timeout=config.request_timeout,
                kv_wait_timeout=config.kv_wait_timeout,
                stage_timeout=config.stage_timeout,
            ),
            now=time.monotonic(),
        )
        self.engine = Engine(self.manifest, self.variant, config)
        self.profile: m.ProfileData | None = None
        self.bus: Bus | None = None
        self.wake = asyncio.Event()
        self._tasks: asyncio.TaskGroup | None = None
        self._rate_t0, self._rate_n = time.monotonic(), 0
        self._ratelog = RateLimitedLog(log)
        self._held: list[Envelope] = []
        """What arrived while the agent probed its message path, processed first."""

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        from e2llm_edge.device.profile import load_or_measure_profile, profile_data, profile_path

        path = self.cfg.profile_path or profile_path(
            self.manifest, configure_threads(self.cfg.threads), self.variant
        )
        prof = await asyncio.to_thread(
            load_or_measure_profile, self.manifest, self.cfg.threads, path, self.variant
        )
        self.profile = profile_data(prof)
        will = Will(t.DEVICE_STATE, self._state(DeviceStatus.OFFLINE), {"device_id": self.id})
        async with Bus(self.cfg.bus, will=will, on_bad_message=self._on_bad) as bus:
            self.bus = bus
            await bus.subscribe(t.DEVICE_INBOX, device_id=self.id)
            if not prof.get("pass_s"):
                self.profile = profile_data(await self._probe(bus, prof, path))
            await bus.subscribe(t.PLAN)
            await bus.publish(
                t.DEVICE_PROFILE,
                m.DeviceProfileMsg(
                    device_id=m.DeviceId(self.id),
                    memory_mb=self.cfg.memory_mb,
                    profile=self.profile,
                    link=self.cfg.link,
                    capabilities=m.Capabilities(
                        variants=list(self.manifest.variants()), running=self.variant
                    ),
                ),
                device_id=self.id,
            )
            await self._publish_state()
            async with asyncio.TaskGroup() as tg:
                self._tasks = tg
                tg.create_task(self._receive(bus))
                tg.create_task(self._worker())
                tg.create_task(self._housekeeping())

    async def _probe(self, bus: Bus, prof: dict[str, object], path: Path) -> dict[str, object]:
        """Measure this agent's cost per pass and per MB (`device.probe`) and cache it with
        the profile; a failed probe leaves them unmeasured (0), and says so."""
        from e2llm_edge.device.profile import save_profile, with_message_path

        def keep(env: Envelope) -> None:
            if len(self._held) < self.cfg.max_inbox:
                self._held.append(env)
            else:  # its sender times it out and retries, as for a message lost
                self._ratelog.warning("probe:held", "%s: inbox full while probing", self.id)

        try:
            found = await probe_message_path(bus, self.id, keep)
        except E2LLMError as exc:
            log.warning(
                "%s: could not probe the message path (%s): planning without it", self.id, exc
            )
            return prof
        log.info(
            "%s: message path %.2f ms per pass, %.1f ms per MB (CPU share %.2f)",
            self.id,
            found.pass_s * 1e3,
            found.io_s_per_mb * 1e3,
            found.cpu_share,
        )
        prof = with_message_path(prof, found.pass_s, found.io_s_per_mb, found.cpu_share)
        try:
            save_profile(path, prof)
        except OSError as exc:
            log.warning("%s: could not cache the profile at %s: %s", self.id, path, exc)
        return prof

    async def _receive(self, bus: Bus) -> None:
        held, self._held = self._held, []
        for env in held:
            await self._dispatch(env)
        async for env in bus:
            await self._dispatch(env)

    async def _dispatch(self, env: Envelope) -> None:
        now = time.monotonic()
        self.core.wall_clock = time.time()
        if isinstance(env.msg, m.PlanMsg):
            await self._do(self.core.plan(env.msg.plan, now))
        elif isinstance(env.msg, c.Incoming):
            await self._do(self.core.accept(env.msg, now))
        self.wake.set()

    async def _on_bad(self, bad: BadMessage) -> None:
        """The bus logged it; if it names a request, that request cannot go on here."""
        rid = getattr(bad.error, "request_id", None) if bad.topic is t.DEVICE_INBOX else None
        await self._do(self.core.reject_malformed(rid, f"on {bad.topic_str}: {bad.error}"))

    # ------------------------------------------------------------------ work

    async def _worker(self) -> None:
        while True:
            self.wake.clear()  # before looking: a message arriving from now on wakes us
            job, cmds = self.core.next_job(time.monotonic())
            await self._do(cmds)
            if job is None:
                await self.wake.wait()
                continue
            # Prefill (long) in a thread so the loop keeps serving its connection; a decode
            # step (a few ms) inline: a thread handoff costs two wake-ups per pipeline hop,
            # the slow part of a hop on small or virtualised CPUs (measured: 4 stages
            # 24.8 -> 27.9 and 22.5 -> 30.2 tok/s, A/B alternating).
            if job.threaded:
                result = await asyncio.to_thread(self.engine.run, job)
            else:
                result = self.engine.run(job)
            self.core.wall_clock = time.time()
            await self._do(self.core.computed(result, time.monotonic()))

    async def _do(self, cmds: list[c.Command]) -> None:
        """Execute the core's commands in order; a run of KV chunks goes out `kv_window`
        at a time (their order does not matter to the receiver, and waiting for the
        broker's acknowledgement of each before sending the next left the link idle)."""
        i = 0
        while i < len(cmds):
            j = i
            while j < len(cmds) and _is_kv_send(cmds[j]) and j - i < self.cfg.kv_window:
                j += 1
            window = cmds[i : max(j, i + 1)]
            results: list[BaseException | None] = []
            if len(window) == 1:  # the hot path (a decode step's sends): no task per message
                try:
                    await self._do_one(window[0])
                    results.append(None)
                except E2LLMError as exc:
                    results.append(exc)
            else:
                results = await asyncio.gather(
                    *(self._do_one(cmd) for cmd in window), return_exceptions=True
                )
            for cmd, res in zip(window, results, strict=True):
                if isinstance(res, E2LLMError):  # the broker is down: the request times out
                    self._ratelog.warning(
                        f"do:{type(cmd).__name__}",
                        "%s: %s failed: %s",
                        self.id,
                        type(cmd).__name__,
                        res,
                    )
                elif isinstance(res, BaseException):
                    raise res
            i += len(window)

    async def _do_one(self, cmd: c.Command) -> None:
        bus = self.bus
        assert bus is not None
        if isinstance(cmd, c.Send):
            await bus.publish(t.DEVICE_INBOX, cmd.msg, device_id=cmd.device_id)
        elif isinstance(cmd, c.Report):
            await bus.publish(t.ORCHESTRATOR_INBOX, cmd.msg, device_id=self.id)
        elif isinstance(cmd, c.PublishState):
            await self._publish_state()
        elif isinstance(cmd, c.Load):
            assert self._tasks is not None
            self._tasks.create_task(self._load(cmd), name="load")
        elif isinstance(cmd, c.Configure):
            self.engine.configure(cmd.slots)
        elif isinstance(cmd, c.WriteKV):
            try:
                self.engine.write_kv(cmd)
            except (ValueError, KeyError) as exc:
                await self._do(self.core.engine_failed(cmd.key, f"KV layer {cmd.layer}: {exc}"))
        elif isinstance(cmd, c.FreeCache):
            self.engine.free(cmd.key)
        elif isinstance(cmd, c.DropAllCaches):
            self.engine.drop_all()
        elif isinstance(cmd, c.Log):
            if cmd.level == "warning":
                self._ratelog.warning(cmd.key, "%s", cmd.text)
            else:
                log.info("%s", cmd.text)

    async def _load(self, cmd: c.Load) -> None:
        error = None
        try:
            await asyncio.to_thread(self.engine.load, cmd)
        except (ExportError, OSError, RuntimeError, ValueError) as exc:
            error = str(exc)
        except Exception as exc:  # onnxruntime's own errors: the device says so and waits
            error = f"{type(exc).__name__}: {exc}"
        await self._do(self.core.loaded(cmd.version, error, time.monotonic()))
        self.wake.set()

    # ------------------------------------------------------------------ reporting

    def _state(self, status: DeviceStatus | None = None) -> m.DeviceState:
        st = self.core.state(self._rate(), rss_bytes(), time.time())
        return st if status is None else dataclasses.replace(st, status=status)

    def _rate(self) -> float:
        now = time.monotonic()
        dt = now - self._rate_t0
        done = self.core.tokens_done
        rate = (done - self._rate_n) / dt if dt > 0 else 0.0
        if dt > 10:
            self._rate_t0, self._rate_n = now, done
        return rate

    async def _publish_state(self) -> None:
        assert self.bus is not None
        await self.bus.publish(t.DEVICE_STATE, self._state(), device_id=self.id)

    async def _housekeeping(self) -> None:
        """Timeouts, heartbeats, state and telemetry."""
        assert self.bus is not None
        while True:
            await asyncio.sleep(self.cfg.telemetry_interval)
            await self._do(self.core.tick(time.monotonic()))
            with contextlib.suppress(E2LLMError):
                await self.bus.publish(
                    t.ORCHESTRATOR_INBOX,
                    m.Heartbeat(device_id=m.DeviceId(self.id), ts=time.time()),
                    device_id=self.id,
                )
                await self._publish_state()
                await self.bus.publish(
                    t.DEVICE_TELEMETRY,
                    m.DeviceTelemetry(
                        device_id=m.DeviceId(self.id), counters=self.core.telemetry(rss_bytes())
                    ),
                    device_id=self.id,
                )
            self.wake.set()


def _is_kv_send(cmd: c.Command) -> bool:
    return isinstance(cmd, c.Send) and isinstance(cmd.msg, m.KVChunk)
