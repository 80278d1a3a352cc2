"""Drive a `FogCore` in-process: no broker, no model, no processes.

`FogDriver` plays the devices' side by feeding events and reading commands back; its text
codec maps characters to token ids one to one (the core never looks inside text).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from e2llm_edge.fog import core as c
from e2llm_edge.fog.registry import Registry
from e2llm_edge.wire import messages as m
from e2llm_edge.wire.messages import DeviceStatus
from planner.drift import DriftPlanner
from planner.plan import Plan, Replica, Stage

VOCAB = 512
EOS = 2


class CharCodec:
    """Token id = code point (mod VOCAB, never EOS); enough for the core, which only counts."""

    def encode_prompt(self, prompt: str, raw: bool = False) -> list[int]:
        return [3 + ord(ch) % (VOCAB - 3) for ch in prompt]

    def encode_messages(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode_prompt("".join(f"<{x['role']}>{x['content']}" for x in messages))

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(97 + i % 26) for i in ids if i != EOS)


def stage(dev: str, a: int, b: int, embed: bool, head: bool) -> Stage:
    return Stage(dev, a, b, embed, head, 0.05, 0.01)


def two_by_two(version: int = 1, concurrency: int = 2) -> Plan:
    """A PREFILL replica (p0, p1) and a DECODER replica (d0, d1) of an 8-layer model."""
    return Plan(
        version,
        "pinned",
        8,
        [
            Replica(
                0, "prefill", 1, [stage("p0", 0, 4, True, False), stage("p1", 4, 8, False, True)]
            ),
            Replica(
                1,
                "decoder",
                concurrency,
                [stage("d0", 0, 4, True, False), stage("d1", 4, 8, False, True)],
            ),
        ],
    )


def three_replicas(version: int = 1) -> Plan:
    """One PREFILL replica and two DECODER replicas of two devices each."""
    return Plan(
        version,
        "pinned",
        8,
        [
            Replica(
                0, "prefill", 1, [stage("p0", 0, 4, True, False), stage("p1", 4, 8, False, True)]
            ),
            Replica(
                1, "decoder", 2, [stage("a0", 0, 4, True, False), stage("a1", 4, 8, False, True)]
            ),
            Replica(
                2, "decoder", 2, [stage("b0", 0, 4, True, False), stage("b1", 4, 8, False, True)]
            ),
        ],
    )


def profile(dev: str, memory_mb: float = 2000.0) -> m.DeviceProfileMsg:
    return m.DeviceProfileMsg(
        device_id=m.DeviceId(dev),
        memory_mb=memory_mb,
        profile=m.ProfileData(
            prefill_tokens=[16, 64, 256, 1024],
            layer_prefill_s=[0.001, 0.003, 0.01, 0.04],
            layer_decode_s=[0.0005, 0.0006, 0.0007, 0.0008],
            embed_s=1e-6,
            head_prefill_s=0.002,
            head_decode_s=[0.002, 0.0022, 0.0024, 0.0026],
        ),
    )


@dataclass
class FogDriver:
    """A core, a clock, and what it has said so far."""

    plan: Plan | None = None
    devices: tuple[str, ...] = ("p0", "p1", "d0", "d1")
    cfg: c.FogConfig = field(
        default_factory=lambda: c.FogConfig(
            expect_devices=4,
            settle_s=1.0,
            request_timeout=20.0,
            heartbeat_timeout=6.0,
            drain_timeout=5.0,
            loss_drain_timeout=1.0,
            regroup_after=30.0,
            max_retries=3,
        )
    )
    now: float = 0.0
    epoch: int = 1
    pinned: bool = True
    """True: `plan` is pinned (no planning); False: the driver answers `ComputePlan` with it."""
    auto_plan: bool = True
    """Answer planning requests with `planner` (False: the test answers them)."""
    drift: DriftPlanner | None = None
    """The core's drift planner (None: no re-planning on drift)."""

    def __post_init__(self) -> None:
        self.core = c.FogCore(
            self.cfg,
            c.ModelInfo(context_length=256, vocab_size=VOCAB, n_layers=8, eos_token_id=EOS),
            CharCodec(),
            registry=Registry(),
            epoch=self.epoch,
            pinned=self.plan if self.pinned else None,
            drift=self.drift,
        )
        self.log: list[c.Command] = []
        self.down: set[str] = set()
        self.unanswered: c.ComputePlan | None = None
        self.silent: set[str] = set()
        self.published: list[Plan] = []
        self.answers: dict[str, list[m.ResponseEvent]] = {}
        self.work: list[c.Send] = []
        self.planning: list[c.ComputePlan] = []

    # ------------------------------------------------------------------ plumbing

    def feed(self, event: c.Event, dt: float = 0.0) -> list[c.Command]:
        self.now += dt
        if self.auto_plan and self.unanswered is not None:
            ask, self.unanswered = self.unanswered, None
            self.feed(self.planner(ask))
        cmds = self.core.handle(event, self.now)
        self.core.check_invariants()
        for cmd in cmds:
            self.log.append(cmd)
            if isinstance(cmd, c.PublishPlan):
                self.published.append(cmd.plan)
            elif isinstance(cmd, c.Answer):
                self.answers.setdefault(cmd.msg.request_id, []).append(cmd.msg)
            elif isinstance(cmd, c.Send):
                self.work.append(cmd)
            elif isinstance(cmd, c.ComputePlan):
                self.planning.append(cmd)
                self.unanswered = cmd
        return cmds

    def planner(self, ask: c.ComputePlan) -> c.PlanComputed:
        """A stand-in planner (answering one event later, as the real one in its thread):
        `plan` without the replicas that lost a device, or infeasible."""
        assert self.plan is not None
        have = {d.id for d in ask.inventory.devices}
        gone = {s.device_id for r in self.plan.replicas for s in r.stages} - have
        left = self.plan.without(gone, ask.version)
        if left is None:
            return c.PlanComputed(ask.version, None, f"{sorted(gone)} missing", infeasible=True)
        return c.PlanComputed(ask.version, left)

    def answer(self, plan: Plan | None, error: str = "too little memory") -> list[c.Command]:
        """Answer the last planning request with `plan` (None: infeasible)."""
        ask = self.planning[-1]
        if plan is None:
            return self.feed(c.PlanComputed(ask.version, None, error, infeasible=True))
        return self.feed(c.PlanComputed(ask.version, renumber(plan, ask.version)))

    def tick(self, dt: float = 0.25) -> list[c.Command]:
        """Time passes; every device that is up sends its heartbeat (unless `silent`)."""
        out = self.feed(c.Tick(), dt)
        for dev in sorted(self.core.registry.devices):
            if dev not in self.down and dev not in self.silent:
                self.feed(c.DeviceHeard(dev))
        return out

    def state(self, dev: str, status: DeviceStatus, version: int = 0) -> list[c.Command]:
        if status in (DeviceStatus.OFFLINE, DeviceStatus.ERROR, DeviceStatus.STUCK):
            self.down.add(dev)
        else:
            self.down.discard(dev)
        out = self.feed(
            c.DeviceStateSeen(
                dev, m.DeviceState(device_id=m.DeviceId(dev), status=status, plan_version=version)
            )
        )
        if status == DeviceStatus.OFFLINE:  # a last-will counts once the grace has passed
            out += self.feed(c.Tick(), self.cfg.will_grace_s + 0.01)
        return out

    def ready(self, plan: Plan, devices: set[str] | None = None) -> None:
        for s in sorted(d for r in plan.replicas for d in (x.device_id for x in r.stages)):
            if devices is None or s in devices:
                self.state(s, DeviceStatus.READY, plan.version)

    def boot(self) -> Plan:
        """Devices announce themselves; the first plan is published and every device loads
        it: the core serves."""
        for d in self.devices:
            self.feed(c.DeviceProfileSeen(d, profile(d)))
            self.state(d, DeviceStatus.ONLINE)
        for _ in range(8):
            self.tick()
            if self.planning and self.plan is not None and not self.published:
                self.answer(self.plan)
        assert self.published, "no plan published"
        plan = self.published[-1]
        self.ready(plan)
        assert self.core.phase == c.PlanPhase.SERVING, self.core.phase
        return plan

    def submit(
        self,
        rid: str,
        prompt: str = "hello",
        max_new_tokens: int = 4,
        client: str = "cli",
        **kw: object,
    ) -> list[c.Command]:
        return self.feed(
            c.RequestArrived(
                client,
                m.GenerateRequest(
                    request_id=m.RequestId(rid),
                    client_id=m.ClientId(client),
                    prompt=prompt,
                    max_new_tokens=max_new_tokens,
                    **kw,  # type: ignore[arg-type]
                ),
            )
        )

    def starts(self, rid: str) -> list[m.PrefillStart]:
        return [
            w.msg
            for w in self.work
            if isinstance(w.msg, m.PrefillStart) and w.msg.request_id == rid
        ]

    def token(
        self,
        rid: str,
        token: int = 7,
        *,
        finished: bool = False,
        dev: str = "d1",
        attempt: int | None = None,
        index: int | None = None,
        timings: m.StepTimings | None = None,
    ) -> list[c.Command]:
        req = self.core.requests[rid]
        route = req.route
        assert route is not None, f"{rid} is not running"
        return self.feed(
            c.TokenArrived(
                dev,
                m.TokenOut(
                    request_id=m.RequestId(rid),
                    attempt=req.attempt if attempt is None else attempt,
                    token_id=token,
                    index=len(req.generated) if index is None else index,
                    finished=finished,
                    finish_reason="length" if finished else None,
                    timings=timings,
                    plan_version=route.plan_version,
                ),
            )
        )

    def finals(self, rid: str) -> list[m.ResponseEvent]:
        return [e for e in self.answers.get(rid, []) if e.event != "token"]

    def streamed(self, rid: str) -> list[int]:
        return [t for e in self.answers.get(rid, []) if e.event == "token" for t in e.token_ids]


def renumber(plan: Plan, version: int) -> Plan:
    return Plan(version, plan.method, plan.n_layers, list(plan.replicas), dict(plan.predicted))
