"""The orchestrator's decisions, in-process: every scenario is a sequence of events, every
check is on the commands that come back. No broker, no model, milliseconds per test."""

from __future__ import annotations

import dataclasses

import pytest

from e2llm_edge.fog import core as c
from e2llm_edge.wire import messages as m
from e2llm_edge.wire.messages import DeviceStatus, ErrorCode

from .fogharness import EOS, FogDriver, profile, three_replicas, two_by_two


def test_a_request_is_routed_streamed_and_finished() -> None:
    d = FogDriver(two_by_two())
    plan = d.boot()
    assert plan.version == 1 and d.core.phase == c.PlanPhase.SERVING
    d.submit("r1", max_new_tokens=3)
    (start,) = d.starts("r1")
    assert start.attempt == 0 and start.plan_version == 1 and start.decoder_replica == 1
    assert [w.device_id for w in d.work] == ["p0"]  # the embedding device of replica 0
    assert d.core.requests["r1"].status == c.RequestStatus.PREFILLING
    d.token("r1", 10, dev="p1")
    assert d.core.requests["r1"].status == c.RequestStatus.TRANSFERRING
    d.token("r1", 11)
    assert d.core.requests["r1"].status == c.RequestStatus.DECODING
    d.token("r1", 12, finished=True)
    (done,) = d.finals("r1")
    assert (
        done.event == "done" and done.token_ids == [10, 11, 12] and d.streamed("r1") == [10, 11, 12]
    )
    assert done.finish_reason == "length" and done.stats is not None and done.stats.new_tokens == 3
    assert "r1" not in d.core.requests and d.core.completed == 1


def test_waiting_time_counts_queueing_and_what_devices_report() -> None:
    d = FogDriver(two_by_two())
    d.boot()
    d.submit("a", max_new_tokens=3)
    d.submit("b", max_new_tokens=3)
    d.submit("c", max_new_tokens=3)  # replica 1 decodes 2 at once: c waits for a slot
    assert not d.starts("c")
    d.now += 1.0
    req = d.core.requests["a"]
    d.token("a", 5, dev="p1", timings=m.StepTimings(prefill_queued_s=0.25))
    d.token("a", 6, timings=m.StepTimings(kv_wait_s=0.125))
    # a later token that waited behind another prompt's prefill
    d.token("a", 7, finished=True, timings=m.StepTimings(decode_stall_s=0.5))
    assert req.waiting_s == pytest.approx(0.25 + 0.125 + 0.5)
    assert d.starts("b") and not d.starts("c"), "b took the prefill pipeline a left"
    wake = d.core.next_wakeup()
    assert wake is not None and d.now < wake <= d.now + 0.05 + 1e-9, "when b leaves stage 0"
    d.tick(0.25)  # b's predicted pass through the first stage is over
    assert d.starts("c"), "a finished: its decoder slot goes to c"
    assert d.core.requests["c"].waiting_s == pytest.approx(1.25)  # queued at the fog node


def test_lost_device_restarts_its_requests_on_survivors_and_rejoins_later() -> None:
    d = FogDriver(three_replicas(), devices=("p0", "p1", "a0", "a1", "b0", "b1"))
    d.cfg = dataclasses.replace(d.cfg, expect_devices=6)
    d.__post_init__()
    d.boot()
    d.submit("r1", max_new_tokens=4)
    first = d.starts("r1")[0]
    d.token("r1", 40, dev="p1")
    decoder = d.core.requests["r1"].route.decoder  # type: ignore[union-attr]
    victim = "a0" if decoder == 1 else "b0"
    d.state(victim, DeviceStatus.OFFLINE)
    req = d.core.requests["r1"]
    # restarted at once on the replicas left (the dead one excluded), from the prompt
    # plus the token already streamed
    assert req.attempt == 1 and req.retries == 1 and req.status == c.RequestStatus.PREFILLING
    assert req.route is not None and req.route.decoder != decoder
    released = [w for w in d.work if isinstance(w.msg, m.Release)]
    assert released and all(w.msg.attempt == 0 for w in released)
    assert victim not in {w.device_id for w in released}  # nobody talks to the dead
    again = d.starts("r1")[1]
    assert again.attempt == 1 and again.generated == [40]
    assert again.token_ids[: len(first.token_ids)] == first.token_ids
    d.tick()  # the replicas that lost nothing become the next plan, as they are
    assert not d.planning, "no GA: nothing reloads"
    assert d.core.phase == c.PlanPhase.DRAINING  # r1 runs: at most loss_drain_timeout
    d.now += d.cfg.loss_drain_timeout
    d.tick()
    survivors = d.published[-1]
    assert survivors.version == 2 and victim not in {
        s.device_id for r in survivors.replicas for s in r.stages
    }
    d.ready(survivors)
    last = d.starts("r1")[-1]
    assert last.attempt == 2 and last.plan_version == 2 and last.generated == [40]
    assert d.core.requests["r1"].retries == 1  # the switch was not the request's fault
    d.token("r1", 41, dev="p1", index=1)
    d.token("r1", 42, index=2)
    d.token("r1", 43, finished=True, index=3)
    assert d.streamed("r1") == [40, 41, 42, 43] and d.finals("r1")[0].event == "done"
    # the device comes back: the whole cluster is planned again (the pinned plan)
    d.state(victim, DeviceStatus.ONLINE)
    for _ in range(6):
        d.tick()
    assert d.published[-1].version == 3 and len(d.published[-1].replicas) == 3
    d.ready(d.published[-1])
    assert d.core.phase == c.PlanPhase.SERVING and d.core.recoveries


def test_a_plan_switch_drains_then_restarts_what_is_left() -> None:
    d = FogDriver(two_by_two(), pinned=False, auto_plan=False)
    d.boot()
    d.submit("r1", max_new_tokens=8)
    d.token("r1", 1, dev="p1")
    d.token("r1", 2)
    # a device joins; the planner proposes a different layout
    d.feed(
        c.DeviceProfileSeen(
            "x", m.DeviceProfileMsg(device_id=m.DeviceId("x"), memory_mb=1.0, profile=None)
        )
    )
    d.state("x", DeviceStatus.ONLINE)
    for _ in range(6):
        d.tick()
    new = two_by_two()
    new = dataclasses.replace(
        new, replicas=[new.replicas[0], dataclasses.replace(new.replicas[1], concurrency=1)]
    )
    d.answer(new)
    assert d.core.phase == c.PlanPhase.DRAINING and d.core.pending is not None
    d.submit("r2", max_new_tokens=2)
    assert not d.starts("r2"), "no new dispatch while draining"
    d.token("r1", 3)  # the running request goes on during the drain
    d.now += d.cfg.drain_timeout + 0.1
    d.tick()  # the drain is over: the plan switches, r1 restarts under it
    assert d.published[-1].version == 2 and d.core.phase == c.PlanPhase.LOADING
    r1 = d.core.requests["r1"]
    assert r1.attempt == 1 and r1.retries == 0 and r1.status == c.RequestStatus.QUEUED
    d.ready(d.published[-1])
    (s1,) = d.starts("r1")[1:]
    assert s1.plan_version == 2 and s1.generated == [1, 2, 3]
    assert not d.starts("r2")  # the new decoder runs one request at a time: r1 has it
    d.token("r1", 4, dev="p1", index=3)
    d.token("r1", 5, finished=True, index=4)
    assert d.streamed("r1") == [1, 2, 3, 4, 5]
    assert d.starts("r2")[0].plan_version == 2


def test_no_progress_requeues_and_late_tokens_of_the_old_attempt_are_ignored() -> None:
    d = FogDriver(two_by_two())
    d.boot()
    d.submit("r1", max_new_tokens=3)
    d.token("r1", 5, dev="p1")
    for _ in range(int(d.cfg.request_timeout / 0.25) + 4):
        d.tick()
    req = d.core.requests["r1"]
    assert req.attempt == 1 and req.retries == 1 and len(d.starts("r1")) == 2
    # the old attempt wakes up: its token must not reach the client
    d.feed(
        c.TokenArrived(
            "d1",
            m.TokenOut(
                request_id=m.RequestId("r1"), attempt=0, token_id=99, index=1, plan_version=1
            ),
        )
    )
    assert d.streamed("r1") == [5]
    d.token("r1", 6, dev="p1", index=1)
    d.token("r1", 7, finished=True, index=2)
    assert d.streamed("r1") == [5, 6, 7]


def test_cancel_during_kv_transfer_frees_everything() -> None:
    d = FogDriver(two_by_two())
    d.boot()
    d.submit("r1", max_new_tokens=8)
    d.token("r1", 5, dev="p1")
    assert d.core.requests["r1"].status == c.RequestStatus.TRANSFERRING
    d.feed(c.CancelArrived("intruder", m.Release(request_id=m.RequestId("r1"), reason="x")))
    assert "r1" in d.core.requests, "only the request's own client may cancel it"
    d.feed(c.CancelArrived("cli", m.Release(request_id=m.RequestId("r1"), reason="bye")))
    (final,) = d.finals("r1")
    assert final.error_code == ErrorCode.CANCELLED and final.token_ids == [5]
    released = {w.device_id for w in d.work if isinstance(w.msg, m.Release)}
    assert released == {"p0", "p1", "d0", "d1"}
    assert d.core.router is not None and not d.core.router.requests
    assert all(not x.decoding and not x.prefilling for x in d.core.router.replicas.values())


def test_devices_that_cannot_hold_the_model_fail_requests_fast() -> None:
    d = FogDriver(two_by_two(), pinned=False, auto_plan=False)
    for dev in d.devices:
        d.feed(c.DeviceProfileSeen(dev, profile(dev)))
    d.submit("early", max_new_tokens=2)
    for _ in range(6):
        d.tick()
    d.answer(None, "short by 300 MB")
    assert d.core.phase == c.PlanPhase.NO_PLAN
    (final,) = d.finals("early")
    assert final.error_code == ErrorCode.NO_PLAN and "short by 300 MB" in (final.error or "")
    d.submit("late")
    assert d.finals("late")[0].error_code == ErrorCode.NO_PLAN


def test_silent_device_is_lost() -> None:
    d = FogDriver(two_by_two())
    d.boot()
    d.silent.add("d1")
    for _ in range(int(d.cfg.heartbeat_timeout / 0.25) + 2):
        d.tick()
    assert "d1" in d.core.registry.lost
    assert d.core.phase != c.PlanPhase.SERVING  # no decoder left


def test_a_switch_with_requests_in_every_status_ends_each_exactly_once() -> None:
    d = FogDriver(three_replicas(), devices=("p0", "p1", "a0", "a1", "b0", "b1"))
    d.cfg = dataclasses.replace(d.cfg, expect_devices=6)
    d.__post_init__()
    d.boot()
    for i in range(6):
        d.submit(f"r{i}", max_new_tokens=3)
    running = [r for r in d.core.requests.values() if r.running]
    d.token(running[0].rid, 1, dev="p1")  # TRANSFERRING
    d.token(running[0].rid, 2)  # DECODING
    statuses = {r.status for r in d.core.requests.values()}
    assert {
        c.RequestStatus.QUEUED,
        c.RequestStatus.PREFILLING,
        c.RequestStatus.DECODING,
    } <= statuses
    d.state("a0", DeviceStatus.ERROR)  # one decoder replica is gone
    for _ in range(8):
        d.tick()
    d.state("a0", DeviceStatus.ONLINE)  # and back: a new plan, after a drain
    for _ in range(50):
        d.tick()
        if d.core.phase == c.PlanPhase.LOADING:
            d.ready(d.published[-1])
        live = [r for r in d.core.requests.values() if r.running]
        for r in live:
            d.token(r.rid, 9, finished=len(r.generated) == 2, dev="p1" if not r.generated else "a1")
        if not d.core.requests:
            break
    for i in range(6):
        finals = d.finals(f"r{i}")
        assert len(finals) == 1 and finals[0].event == "done", (i, finals)
        assert len(d.streamed(f"r{i}")) == 3


def test_losing_the_only_prefill_replica_fails_every_request_once_with_a_reason() -> None:
    d = FogDriver(two_by_two())
    d.boot()
    for i in range(4):
        d.submit(f"r{i}", max_new_tokens=3)
    d.token("r0", 1, dev="p1")
    d.state("p0", DeviceStatus.ERROR)
    for _ in range(4):
        d.tick()
    assert d.core.phase == c.PlanPhase.NO_PLAN
    for i in range(4):
        (final,) = d.finals(f"r{i}")
        assert final.error_code == ErrorCode.NO_PLAN and "p0" in (final.error or "")
    assert not d.core.requests and not d.core.queue


def test_a_takeover_adopts_the_retained_plan_without_planning() -> None:
    old = two_by_two(version=5)
    d = FogDriver(None, pinned=False, epoch=2, auto_plan=False)
    d.feed(c.PlanSeen(old, retained=True))
    for dev in d.devices:
        d.feed(c.DeviceProfileSeen(dev, profile(dev)))
        d.feed(
            c.DeviceStateSeen(
                dev,
                m.DeviceState(device_id=m.DeviceId(dev), status=DeviceStatus.READY, plan_version=5),
                retained=True,
            )
        )
    d.tick()
    assert not d.planning and d.published and d.published[-1].version == 6
    assert d.published[-1].replicas == old.replicas  # same layout: nobody reloads
    d.ready(d.published[-1])
    assert d.core.phase == c.PlanPhase.SERVING
    # a client re-sends its unfinished request with the tokens it holds: it continues
    d.submit("r1", max_new_tokens=4, resume=[21, 22])
    (start,) = d.starts("r1")
    assert start.generated == [21, 22]
    d.token("r1", 23, dev="p1", index=2)
    d.token("r1", 24, finished=True, index=3)
    (done,) = d.finals("r1")
    assert done.token_ids == [21, 22, 23, 24] and d.streamed("r1") == [23, 24]


def test_a_resumed_request_that_already_ended_is_answered_at_once() -> None:
    d = FogDriver(two_by_two())
    d.boot()
    d.submit("r1", max_new_tokens=4, resume=[5, EOS])
    assert d.finals("r1")[0].finish_reason == "stop" and not d.starts("r1")


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"prompt": "  "}, "empty prompt"),
        ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
        ({"max_new_tokens": 300}, "exceeds the context of 256 tokens"),
        ({"prompt": "x" * 250, "max_new_tokens": 10}, "exceeds the context of 256"),
        ({"temperature": -1.0}, "temperature must be in [0, 10]"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"prompt": None, "prompt_ids": [1, 9999]}, "token id 9999 is outside the vocabulary"),
        ({"prompt": None, "prompt_ids": []}, "empty prompt"),
        ({"prompt": None}, "give exactly one of prompt, messages or prompt_ids"),
    ],
)
def test_bad_requests_get_one_clear_error(kw: dict[str, object], needle: str) -> None:
    d = FogDriver(two_by_two())
    d.boot()
    args: dict[str, object] = {"prompt": "hello", "max_new_tokens": 4, **kw}
    prompt = args.pop("prompt")
    d.feed(
        c.RequestArrived(
            "cli",
            m.GenerateRequest(
                request_id=m.RequestId("bad"),
                client_id=m.ClientId("cli"),
                prompt=prompt,  # type: ignore[arg-type]
                **args,
            ),
        )
    )  # type: ignore[arg-type]
    (final,) = d.finals("bad")
    assert final.error_code == ErrorCode.BAD_REQUEST and needle in (final.error or ""), final.error
    assert not d.core.requests


def test_a_full_queue_says_overloaded() -> None:
    d = FogDriver(two_by_two())
    d.cfg = dataclasses.replace(d.cfg, max_queue=1)
    d.__post_init__()
    d.boot()
    for i in range(5):
        d.submit(f"r{i}")
    codes = [d.finals(f"r{i}")[0].error_code if d.finals(f"r{i}") else None for i in range(5)]
    # 1 prefilling (the next enters when the first stage is predicted free), 1 queued
    assert codes.count(ErrorCode.OVERLOADED) == 3


def test_a_resent_request_is_replayed_not_run_twice() -> None:
    d = FogDriver(two_by_two())
    d.boot()
    d.submit("r1", max_new_tokens=2)
    d.token("r1", 5, dev="p1")
    d.submit("r1", max_new_tokens=2)  # the client lost its connection and asks again
    assert len(d.starts("r1")) == 1 and d.streamed("r1") == [5, 5]
    d.token("r1", 6, finished=True)
    d.submit("r1", max_new_tokens=2)
    assert [f.event for f in d.finals("r1")] == ["done", "done"]
    assert d.core.completed == 1


def test_a_malformed_request_is_answered() -> None:
    d = FogDriver(two_by_two())
    d.boot()
    d.feed(c.BadRequestArrived("cli", "r9", "generate_request.max_new_tokens: expected int"))
    (final,) = d.finals("r9")
    assert final.error_code == ErrorCode.BAD_REQUEST and "expected int" in (final.error or "")


def test_broker_reconnect_restarts_attempts_and_waits_for_devices() -> None:
    d = FogDriver(two_by_two())
    d.boot()
    d.submit("r1", max_new_tokens=3)
    d.token("r1", 5, dev="p1")
    d.feed(c.Reconnected(), dt=1.0)
    assert d.core.phase == c.PlanPhase.LOADING and d.core.requests["r1"].attempt == 1
    assert d.core.requests["r1"].retries == 0  # not the request's fault
    d.tick()
    assert len(d.starts("r1")) == 1, "no dispatch before the devices are heard again"
    d.ready(d.published[-1])
    assert d.core.phase == c.PlanPhase.SERVING and len(d.starts("r1")) == 2


def test_devices_moved_on_by_another_orchestrator_stop_dispatch_without_burning_retries() -> None:
    """Split brain (a standby took over while we were cut off): a device refusing our
    plan version because it runs a newer one is no fault of the request; we stop
    dispatching instead of retrying into a cluster someone else steers."""
    d = FogDriver(two_by_two())
    d.boot()
    d.submit("r1", max_new_tokens=4)
    assert len(d.starts("r1")) == 1
    for _ in range(d.cfg.max_retries + 2):
        d.feed(
            c.DeviceErrorArrived(
                "p0",
                m.ErrorReport(
                    request_id=m.RequestId("r1"),
                    attempt=d.core.requests["r1"].attempt,
                    device_id=m.DeviceId("p0"),
                    code=ErrorCode.PLAN_VERSION,
                    message="message for plan v1, device p0 runs v2",
                    plan_version=2,
                ),
            )
        )
    req = d.core.requests["r1"]
    assert req.status == c.RequestStatus.QUEUED and req.retries == 0
    assert d.core.phase == c.PlanPhase.LOADING and not d.finals("r1")
    assert len(d.starts("r1")) == 1, "nothing dispatched into the other orchestrator's plan"
    # the same news from a live device state
    d2 = FogDriver(two_by_two())
    d2.boot()
    d2.submit("r2", max_new_tokens=4)
    d2.state("d0", DeviceStatus.READY, version=2)
    assert d2.core.phase == c.PlanPhase.LOADING
    assert d2.core.requests["r2"].status == c.RequestStatus.QUEUED


def test_wills_from_a_broker_shutting_down_are_not_device_losses() -> None:
    """A broker that stops publishes every client's last-will, then drops us: if our own
    reconnect follows within the grace, nobody was lost and nothing is re-planned; a will
    with the connection still up is a loss."""
    d = FogDriver(two_by_two())
    d.boot()
    published = len(d.published)
    for dev in ("p0", "d1"):
        d.feed(
            c.DeviceStateSeen(
                dev, m.DeviceState(device_id=m.DeviceId(dev), status=DeviceStatus.OFFLINE)
            )
        )
    d.feed(c.Reconnected(), 1.5)
    for _ in range(8):
        d.tick()
    assert not d.core.registry.lost and len(d.published) == published
    d.feed(
        c.DeviceStateSeen(
            "d1", m.DeviceState(device_id=m.DeviceId("d1"), status=DeviceStatus.OFFLINE)
        )
    )
    d.tick(0.1)
    assert "d1" not in d.core.registry.lost, "still within the grace"
    d.tick(d.cfg.will_grace_s)  # 0.1 + the grace since the will
    assert "d1" in d.core.registry.lost
