"""A whole cluster in one process: a `FogCore`, several `DeviceCore`s with a toy engine, and
a message network between them. No broker, no onnxruntime: the decisions of both cores
run exactly as in the real processes, only the model and the wire are stand-ins.

The toy engine computes something whose answer depends on every layer, every position and
every KV entry, so a request routed wrong, a KV cache handed over incompletely or a step
run at the wrong position changes the tokens: `reference` computes the same answer in one
piece, as the local path does for the real model.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from e2llm_edge.device import core as dc
from e2llm_edge.fog import core as fc
from e2llm_edge.wire import messages as m
from e2llm_edge.wire.messages import AttemptKey, DeviceStatus
from planner.plan import Plan

from .fogharness import EOS, VOCAB, CharCodec, profile

HIDDEN = 4


def _layer(x: np.ndarray, layer: int, past: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One toy layer: (1, T, H) in, (1, T, H) out and the T new cache entries (1, 1, T, 1)."""
    t = x.shape[1]
    new = (x[:, :, :1] * 0.5 + layer).reshape(1, 1, t, 1).astype(np.float32)
    allkv = np.concatenate([past, new], axis=2)
    # each position attends to everything cached up to itself
    csum = np.cumsum(allkv[0, 0, :, 0])[-t:]
    out = x + np.float32(1.0) + (csum.reshape(1, t, 1) * np.float32(0.01)).astype(np.float32)
    return out.astype(np.float32), new


def _head(x: np.ndarray) -> np.ndarray:
    """Logits (B, 1, VOCAB) whose argmax depends on the last hidden state."""
    b = x.shape[0]
    tok = (np.floor(np.abs(x[:, -1, 0]) * 37.0).astype(np.int64) % (VOCAB - 3)) + 3
    out = np.zeros((b, 1, VOCAB), np.float32)
    out[np.arange(b), 0, tok] = 1.0
    return out


def _embed(ids: np.ndarray) -> np.ndarray:
    h = np.zeros((ids.shape[0], ids.shape[1], HIDDEN), np.float32)
    h[..., 0] = (ids % 17).astype(np.float32) * 0.1
    return h


def reference(prompt: list[int], max_new: int, n_layers: int) -> list[int]:
    """Greedy tokens of the toy model in one piece (the local path of this world)."""
    caches = [np.zeros((1, 1, 0, 1), np.float32) for _ in range(n_layers)]
    ids = list(prompt)
    out: list[int] = []
    x = _embed(np.asarray([ids], np.int64))
    for _ in range(max_new):
        for layer in range(n_layers):
            x, new = _layer(x, layer, caches[layer])
            caches[layer] = np.concatenate([caches[layer], new], axis=2)
        tok = int(np.argmax(_head(x)[0, -1]))
        out.append(tok)
        if tok == EOS:
            break
        x = _embed(np.asarray([[tok]], np.int64))
    return out


class ToyEngine:
    """The engine's contract (`device.agent.Engine`) on toy math."""

    def __init__(self) -> None:
        self.layers: tuple[int, int] | None = None
        self.caches: dict[AttemptKey, dict[int, np.ndarray]] = {}

    def load(self, cmd: dc.Load) -> None:
        self.layers = cmd.layers
        self.caches.clear()

    def run(self, job: dc.Compute) -> dc.Computed:
        try:
            xs = []
            for r in job.rows:
                xs.append(_embed(r.ids) if r.ids is not None else np.asarray(r.hidden))
            if not job.layers:
                return dc.Computed(job.job, np.concatenate(xs, axis=0))
            assert self.layers is not None
            outs = []
            for r, x in zip(job.rows, xs, strict=True):
                if r.new_cache is not None:
                    self.caches[r.key] = {
                        i: np.zeros((1, 1, 0, 1), np.float32) for i in range(*self.layers)
                    }
                cache = self.caches[r.key]
                held = cache[self.layers[0]].shape[2]
                assert held == r.start, f"{r.key}: step at {r.start}, cache holds {held}"
                for i in range(*self.layers):
                    x, new = _layer(x, i, cache[i])
                    cache[i] = np.concatenate([cache[i], new], axis=2)
                outs.append(x)
            out = np.concatenate(outs, axis=0)
            if job.head:
                out = _head(out)
            kv = None
            if job.read_kv is not None:
                kv = {i: (0, c, c) for i, c in self.caches[job.read_kv].items()}
            return dc.Computed(job.job, out, kv)
        except (AssertionError, KeyError) as exc:
            return dc.Computed(job.job, None, error=f"{type(exc).__name__}: {exc}")

    def write_kv(self, cmd: dc.WriteKV) -> None:
        assert self.layers is not None
        cache = self.caches.setdefault(
            cmd.key, {i: np.zeros((1, 1, 0, 1), np.float32) for i in range(*self.layers)}
        )
        assert cache[cmd.layer].shape[2] == cmd.token_start
        cache[cmd.layer] = np.concatenate([cache[cmd.layer], cmd.k], axis=2)

    def free(self, key: AttemptKey) -> None:
        self.caches.pop(key, None)


@dataclass
class Device:
    core: dc.DeviceCore
    engine: ToyEngine = field(default_factory=ToyEngine)
    alive: bool = True
    loading: dc.Load | None = None


@dataclass
class World:
    """Cores connected by an in-memory network; `run` delivers until nothing moves."""

    plan: Plan
    max_batch: int = 4
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    now: float = 0.0

    def __post_init__(self) -> None:
        names = sorted({s.device_id for r in self.plan.replicas for s in r.stages})
        self.n_layers = self.plan.n_layers
        self.fog = fc.FogCore(
            fc.FogConfig(
                expect_devices=len(names),
                settle_s=0.5,
                request_timeout=30.0,
                heartbeat_timeout=5.0,
                max_retries=3,
            ),
            fc.ModelInfo(
                context_length=512, vocab_size=VOCAB, n_layers=self.n_layers, eos_token_id=EOS
            ),
            CharCodec(),
            pinned=self.plan,
        )
        self.devices = {
            n: Device(
                dc.DeviceCore(
                    dc.DeviceConfig(
                        device_id=n,
                        vocab_size=VOCAB,
                        max_position=512,
                        hidden_size=HIDDEN,
                        eos_token_id=EOS,
                        max_batch=self.max_batch,
                        request_timeout=30.0,
                        kv_wait_timeout=10.0,
                        stage_timeout=20.0,
                    )
                )
            )
            for n in names
        }
        self.net: deque[tuple[str, m.Message]] = deque()
        self.answers: dict[str, list[m.ResponseEvent]] = {}
        self.retained_plan: Plan | None = None
        for n in names:
            self._fog(fc.DeviceProfileSeen(n, profile(n)))
            self._device_state(n)

    # ------------------------------------------------------------------ plumbing

    def _fog(self, event: fc.Event) -> None:
        for cmd in self.fog.handle(event, self.now):
            if isinstance(cmd, fc.Send):
                self.net.append((cmd.device_id, cmd.msg))
            elif isinstance(cmd, fc.Answer):
                self.answers.setdefault(cmd.msg.request_id, []).append(cmd.msg)
            elif isinstance(cmd, fc.PublishPlan):
                self.retained_plan = cmd.plan
                for n in self.devices:
                    self.net.append((n, m.PlanMsg(plan=cmd.plan)))
            elif isinstance(cmd, fc.ComputePlan):
                have = {d.id for d in cmd.inventory.devices}
                gone = {s.device_id for r in self.plan.replicas for s in r.stages} - have
                left = self.plan.without(gone, cmd.version)
                self._later = fc.PlanComputed(
                    cmd.version, left, "devices missing", infeasible=left is None
                )
        self.fog.check_invariants()

    _later: fc.PlanComputed | None = None

    def _device_state(self, n: str) -> None:
        dev = self.devices[n]
        st = (
            dev.core.state(0.0, 0, 0.0)
            if dev.alive
            else m.DeviceState(device_id=m.DeviceId(n), status=DeviceStatus.OFFLINE)
        )
        self._fog(fc.DeviceStateSeen(n, st))

    def _do(self, n: str, cmds: list[dc.Command]) -> None:
        dev = self.devices[n]
        for cmd in cmds:
            if isinstance(cmd, dc.Send):
                self.net.append((cmd.device_id, cmd.msg))
            elif isinstance(cmd, dc.Report):
                self.net.append(("fog:" + n, cmd.msg))
            elif isinstance(cmd, dc.PublishState):
                self._device_state(n)
            elif isinstance(cmd, dc.Load):
                dev.loading = cmd
            elif isinstance(cmd, dc.Configure):
                dev.engine.caches.clear()
            elif isinstance(cmd, dc.WriteKV):
                try:
                    dev.engine.write_kv(cmd)
                except AssertionError as exc:
                    self._do(n, dev.core.engine_failed(cmd.key, str(exc)))
            elif isinstance(cmd, dc.FreeCache):
                dev.engine.free(cmd.key)
            elif isinstance(cmd, dc.DropAllCaches):
                dev.engine.caches.clear()

    def _deliver(self, dest: str, msg: m.Message) -> None:
        if dest.startswith("fog:"):
            src = dest[4:]
            if isinstance(msg, m.TokenOut):
                self._fog(fc.TokenArrived(src, msg))
            elif isinstance(msg, m.ErrorReport):
                self._fog(fc.DeviceErrorArrived(src, msg))
            return
        dev = self.devices[dest]
        if not dev.alive:
            return  # lost in the network, as messages to a dead device are
        if isinstance(msg, m.PlanMsg):
            self._do(dest, dev.core.plan(msg.plan, self.now))
        else:
            assert isinstance(msg, dc.Incoming)
            self._do(dest, dev.core.accept(msg, self.now))

    def step(self) -> bool:
        """One round (False: nothing moved): deliver everything in flight, in a shuffled
        order as a broker serving many clients may; else every device takes its next job
        at once and their results go out together, so work that arrives while a device is
        busy queues up behind it (and decode steps batch) as on real hardware."""
        if self._later is not None:
            later, self._later = self._later, None
            self._fog(later)
            return True
        if self.net:
            batch = list(self.net)
            self.net.clear()
            for i in range(len(batch) - 1):  # neighbours may swap: small reorderings only
                if self.rng.random() < 0.2:
                    batch[i], batch[i + 1] = batch[i + 1], batch[i]
            for dest, msg in batch:
                self._deliver(dest, msg)
            return True
        results: list[tuple[str, dc.Computed]] = []
        moved = False
        for n, dev in sorted(self.devices.items()):
            if not dev.alive:
                continue
            if dev.loading is not None:
                cmd, dev.loading = dev.loading, None
                dev.engine.load(cmd)
                self._do(n, dev.core.loaded(cmd.version, None, self.now))
                moved = True
                continue
            job, cmds = dev.core.next_job(self.now)
            self._do(n, cmds)
            if job is not None:
                results.append((n, dev.engine.run(job)))
        for n, res in results:
            self._do(n, self.devices[n].core.computed(res, self.now))
        return moved or bool(results) or bool(self.net)

    def run(self, limit: int = 100_000) -> None:
        for _ in range(limit):
            if not self.step():
                return
        raise AssertionError("the world never settles")

    def tick(self, dt: float = 0.5) -> None:
        self.now += dt
        self._fog(fc.Tick())
        for n, dev in self.devices.items():
            if dev.alive:  # what an agent's housekeeping sends: heartbeat, then its state
                self._fog(fc.DeviceHeard(n))
                self._do(n, dev.core.tick(self.now))
                self._device_state(n)

    def boot(self) -> None:
        for _ in range(10):
            self.tick()
            self.run()
        assert self.fog.phase == fc.PlanPhase.SERVING, self.fog.phase

    def submit(self, rid: str, prompt: str, max_new: int) -> None:
        self._fog(
            fc.RequestArrived(
                "cli",
                m.GenerateRequest(
                    request_id=m.RequestId(rid),
                    client_id=m.ClientId("cli"),
                    prompt=prompt,
                    raw=True,
                    max_new_tokens=max_new,
                ),
            )
        )

    def kill(self, n: str) -> None:
        self.devices[n].alive = False
        self._fog(
            fc.DeviceStateSeen(
                n, m.DeviceState(device_id=m.DeviceId(n), status=DeviceStatus.OFFLINE)
            )
        )

    def revive(self, n: str) -> None:
        """A reboot: a fresh agent with nothing loaded, which reads the retained plan."""
        cfg = self.devices[n].core.cfg
        self.devices[n] = Device(dc.DeviceCore(cfg, self.now))
        self._device_state(n)
        if self.retained_plan is not None:
            self.net.append((n, m.PlanMsg(plan=self.retained_plan)))

    def final(self, rid: str) -> list[m.ResponseEvent]:
        return [e for e in self.answers.get(rid, []) if e.event != "token"]

    def cached_attempts(self) -> dict[str, set[AttemptKey]]:
        return {
            n: set(d.engine.caches) | set(d.core.attempts)
            for n, d in self.devices.items()
            if d.alive and (d.engine.caches or d.core.attempts)
        }
