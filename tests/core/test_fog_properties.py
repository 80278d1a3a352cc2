"""Random event sequences against the orchestrator's core (hypothesis stateful testing).

After every step: the core's own invariants hold (each request in exactly one place,
decoder slots and prefill counts match the requests that hold them, no replica over its
concurrency), no request has been answered twice, and work only went to devices of the
current plan's live replicas under its version. At the end, with every device back and
the devices doing their part, every request submitted has ended exactly once: with its
answer or an explicit error."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from e2llm_edge.fog import core as c
from e2llm_edge.wire import messages as m
from e2llm_edge.wire.messages import DeviceStatus, ErrorCode

from .fogharness import FogDriver, three_replicas

DEVICES = ("p0", "p1", "a0", "a1", "b0", "b1")


class FogMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.d = FogDriver(three_replicas(), devices=DEVICES)
        self.d.cfg = dataclasses.replace(
            self.d.cfg, expect_devices=6, max_queue=6, max_retries=2, request_timeout=8.0
        )
        self.d.__post_init__()
        self.d.boot()
        self.n = 0
        self.checked = 0

    # ------------------------------------------------------------------ the outside world

    @rule(prompt=st.text(min_size=1, max_size=20).filter(str.strip), new=st.integers(1, 5))
    def submit(self, prompt: str, new: int) -> None:
        self.d.submit(f"r{self.n}", prompt=prompt, max_new_tokens=new)
        self.n += 1

    @precondition(lambda self: any(r.running for r in self.d.core.requests.values()))
    @rule(data=st.data(), finish=st.booleans())
    def token(self, data: st.DataObject, finish: bool) -> None:
        live = sorted(r.rid for r in self.d.core.requests.values() if r.running)
        rid = data.draw(st.sampled_from(live))
        req = self.d.core.requests[rid]
        done = finish or len(req.generated) + 1 >= req.max_new_tokens
        self.d.token(rid, 7, finished=done, dev="p1")

    @precondition(lambda self: any(r.running for r in self.d.core.requests.values()))
    @rule(data=st.data())
    def late_token(self, data: st.DataObject) -> None:
        """A token of an abandoned attempt, or a duplicate: must change nothing visible."""
        live = sorted(r.rid for r in self.d.core.requests.values() if r.running)
        rid = data.draw(st.sampled_from(live))
        req = self.d.core.requests[rid]
        before = list(req.generated)
        self.d.token(rid, 99, attempt=req.attempt + 1)
        if req.generated:
            self.d.token(rid, 98, index=len(req.generated) - 1)
        assert self.d.core.requests[rid].generated == before

    @precondition(lambda self: any(r.running for r in self.d.core.requests.values()))
    @rule(data=st.data())
    def device_error(self, data: st.DataObject) -> None:
        live = sorted(r.rid for r in self.d.core.requests.values() if r.running)
        rid = data.draw(st.sampled_from(live))
        req = self.d.core.requests[rid]
        self.d.feed(
            c.DeviceErrorArrived(
                "a1",
                m.ErrorReport(
                    request_id=m.RequestId(rid),
                    attempt=req.attempt,
                    device_id=m.DeviceId("a1"),
                    code=ErrorCode.INTERNAL,
                    message="boom",
                ),
            )
        )

    @precondition(lambda self: bool(self.d.core.requests))
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(sorted(self.d.core.requests)))
        self.d.feed(c.CancelArrived("cli", m.Release(request_id=m.RequestId(rid), reason="x")))

    @rule(dev=st.sampled_from(DEVICES), how=st.sampled_from(["offline", "error", "silent"]))
    def lose(self, dev: str, how: str) -> None:
        if how == "silent":
            self.d.silent.add(dev)
        else:
            self.d.state(dev, DeviceStatus.OFFLINE if how == "offline" else DeviceStatus.ERROR)

    @rule(dev=st.sampled_from(DEVICES))
    def come_back(self, dev: str) -> None:
        self.d.silent.discard(dev)
        self.d.state(dev, DeviceStatus.ONLINE)

    @rule()
    def devices_load_the_plan(self) -> None:
        if self.d.published:
            plan = self.d.published[-1]
            up = {x for x in DEVICES if x not in self.d.down and x not in self.d.silent}
            self.d.ready(plan, up)

    @rule(dt=st.sampled_from([0.25, 1.0, 3.0, 7.0]))
    def time_passes(self, dt: float) -> None:
        self.d.tick(dt)

    @rule()
    def broker_reconnect(self) -> None:
        self.d.feed(c.Reconnected(), dt=0.1)

    # ------------------------------------------------------------------ what must hold

    @invariant()
    def answered_at_most_once_and_work_goes_where_it_may(self) -> None:
        for rid, events in self.d.answers.items():
            assert sum(e.event != "token" for e in events) <= 1, (rid, events)
        core = self.d.core
        for send in self.d.work[self.checked :]:
            if isinstance(send.msg, m.PrefillStart):
                assert core.plan is not None
                assert send.msg.plan_version == core.version
                live = {
                    s.device_id
                    for r in core.plan.replicas
                    if r.replica_id not in core.dead
                    for s in r.stages
                }
                assert send.device_id in live, (send.device_id, live)
                assert send.device_id not in core.registry.lost
                assert send.msg.decoder_replica not in core.dead
        self.checked = len(self.d.work)

    def teardown(self) -> None:
        """Every device back and doing its part: every request ends, exactly once."""
        d = self.d
        d.silent.clear()
        for dev in DEVICES:
            d.state(dev, DeviceStatus.ONLINE)
        for _ in range(400):
            d.tick(0.5)
            if d.published:
                d.ready(d.published[-1])
            for r in [r for r in d.core.requests.values() if r.running]:
                d.token(r.rid, 7, finished=len(r.generated) + 1 >= r.max_new_tokens, dev="p1")
            if not d.core.requests:
                break
        assert not d.core.requests, {r.rid: r.status for r in d.core.requests.values()}
        for i in range(self.n):
            finals = d.finals(f"r{i}")
            assert len(finals) == 1, (i, finals)
            if finals[0].event == "done":
                assert d.streamed(f"r{i}") == finals[0].token_ids
        assert all(not x.decoding and not x.prefills for x in d.core.loads.values())


FogMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFogCore = FogMachine.TestCase
