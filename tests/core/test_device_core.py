"""The device agent's decisions, in-process: one `DeviceCore` fed messages, and whole
clusters of cores (`world.World`) whose answers must equal the one-piece computation."""

from __future__ import annotations

import numpy as np
import pytest

from e2llm_edge.device import core as dc
from e2llm_edge.wire import messages as m
from e2llm_edge.wire.messages import AttemptKey, DeviceStatus, ErrorCode
from planner.plan import Plan, Replica

from .fogharness import CharCodec, stage, three_replicas, two_by_two
from .world import HIDDEN, World, reference


def prompt_ids(text: str) -> list[int]:
    return CharCodec().encode_prompt(text, raw=True)


def answer(w: World, rid: str) -> m.ResponseEvent:
    (final,) = w.final(rid)
    return final


# --------------------------------------------------------------------------- whole clusters


def test_pipelined_prefill_kv_handoff_and_decode_match_the_one_piece_answer() -> None:
    w = World(two_by_two())
    w.boot()
    w.submit("r1", "the quick brown fox", 12)
    w.run()
    done = answer(w, "r1")
    assert done.event == "done", done
    assert done.token_ids == reference(prompt_ids("the quick brown fox"), 12, 8)
    assert not w.cached_attempts(), "every device freed the request"


def test_the_last_prefill_stage_sends_the_first_token_before_its_kv() -> None:
    """On a slow uplink the first token and the decoder's first step would otherwise queue
    behind the stage's KV; a one-token answer sends no KV at all (no decoder needs it)."""
    w = World(two_by_two())
    w.boot()
    sent: list[tuple[str, type]] = []
    do = w._do

    def record(n: str, cmds: list[dc.Command]) -> None:
        for cmd in cmds:
            if isinstance(cmd, dc.Send | dc.Report):
                sent.append((n, type(cmd.msg)))
        do(n, cmds)

    w._do = record  # type: ignore[method-assign]
    w.submit("r1", "first token first", 5)
    w.run()
    assert answer(w, "r1").token_ids == reference(prompt_ids("first token first"), 5, 8)
    from_p1 = [kind for n, kind in sent if n == "p1"]
    first_kv = from_p1.index(m.KVChunk)
    assert m.DecodeStep in from_p1[:first_kv] and m.TokenOut in from_p1[:first_kv]
    assert m.KVChunk in [kind for n, kind in sent if n == "p0"]

    sent.clear()
    w.submit("r2", "one token", 1)
    w.run()
    assert answer(w, "r2").token_ids == reference(prompt_ids("one token"), 1, 8)
    assert ("p1", m.KVChunk) not in sent
    assert not w.cached_attempts(), "every device freed the request"


def test_batched_decoders_and_concurrent_requests_each_get_their_own_answer() -> None:
    wide = three_replicas()
    wide = Plan(
        1,
        wide.method,
        8,
        [wide.replicas[0]]
        + [Replica(r.replica_id, "decoder", 4, r.stages) for r in wide.replicas[1:]],
    )
    w = World(wide, max_batch=4)  # 4 requests per decoder, over 2 stages: 2 per pass
    w.boot()
    prompts = {f"r{i}": "abcdefghij"[: 3 + i] * (i + 1) for i in range(7)}
    for rid, text in prompts.items():
        w.submit(rid, text, 6 + len(text) % 5)
    w.run()
    batches = sum(d.core.counters["decode_batches"] for d in w.devices.values())
    steps = sum(d.core.counters["decode_steps"] for d in w.devices.values())
    assert batches < steps, "decode steps of several requests ran in one pass"
    for rid, text in prompts.items():
        assert answer(w, rid).token_ids == reference(prompt_ids(text), 6 + len(text) % 5, 8), rid
    assert not w.cached_attempts()


def embed_last(concurrency: int) -> Plan:
    """Two replicas of two stages whose embedding sits on the last stage, by the head."""
    return Plan(
        1,
        "pinned",
        8,
        [
            Replica(
                0, "prefill", 1, [stage("p0", 0, 4, False, False), stage("p1", 4, 8, True, True)]
            ),
            Replica(
                1,
                "decoder",
                concurrency,
                [stage("d0", 0, 4, False, False), stage("d1", 4, 8, True, True)],
            ),
        ],
    )


def test_embedding_on_the_last_stage_feeds_stage_zero() -> None:
    w = World(embed_last(2))
    w.boot()
    w.submit("r1", "embedding next to the head", 9)
    w.run()
    assert answer(w, "r1").token_ids == reference(prompt_ids("embedding next to the head"), 9, 8)


def test_a_decoder_embedding_next_to_its_head_keeps_its_micro_batches_whole() -> None:
    """The last stage embeds its sampled tokens together and sends them to stage 0 as one
    `DecodeBatch`; stage 0 runs them as one batch. Answers stay those of the one-piece
    model."""
    w = World(embed_last(4))
    w.boot()
    sizes: dict[str, list[int]] = {"d0": [], "d1": []}
    do = w._do

    def record(n: str, cmds: list[dc.Command]) -> None:
        for cmd in cmds:
            if n in sizes and isinstance(cmd, dc.Send) and not isinstance(cmd.msg, m.Release):
                batch = cmd.msg
                sizes[n].append(len(batch.steps) if isinstance(batch, m.DecodeBatch) else 1)
        do(n, cmds)

    w._do = record  # type: ignore[method-assign]
    prompts = {f"r{i}": "batched " * (i + 1) for i in range(4)}
    for rid, text in prompts.items():
        w.submit(rid, text, 12)
    w.run()
    for rid, text in prompts.items():
        assert answer(w, rid).token_ids == reference(prompt_ids(text), 12, 8), rid
    assert max(sizes["d0"]) == 2 and max(sizes["d1"]) == 2, sizes  # micro-batches of 2
    assert w.devices["d0"].core.counters["decode_batches"] < sum(sizes["d0"])
    assert not w.cached_attempts()


def test_a_device_lost_mid_stream_the_answer_continues_unchanged() -> None:
    w = World(three_replicas())
    w.boot()
    w.submit("r1", "a long enough prompt", 20)
    for _ in range(60):
        w.step()
    route = w.fog.requests["r1"].route
    assert route is not None
    victim = "a0" if route.decoder == 1 else "b0"
    w.kill(victim)
    for _ in range(30):
        w.tick()
        w.run()
        if not w.fog.requests:
            break
    done = answer(w, "r1")
    assert done.event == "done" and done.stats is not None and done.stats.restarts >= 1
    assert done.token_ids == reference(prompt_ids("a long enough prompt"), 20, 8)
    streamed = [t for e in w.answers["r1"] if e.event == "token" for t in e.token_ids]
    assert streamed == done.token_ids, "no token repeated or skipped"


# --------------------------------------------------------------------------- one core


def ready_core(concurrency: int = 2, **kw: object) -> tuple[dc.DeviceCore, Plan]:
    plan = two_by_two(concurrency=concurrency)
    core = dc.DeviceCore(
        dc.DeviceConfig(
            device_id="d0",
            vocab_size=512,
            max_position=256,
            hidden_size=HIDDEN,
            eos_token_id=2,
            **kw,
        )
    )  # type: ignore[arg-type]
    cmds = core.plan(plan, 0.0)
    (load,) = [x for x in cmds if isinstance(x, dc.Load)]
    assert load.layers == (0, 4) and load.embed and not load.head and load.slots == concurrency
    core.loaded(plan.version, None, 0.0)
    assert core.status == DeviceStatus.READY
    return core, plan


def ctx(prompt_len: int = 3, max_new: int = 4) -> m.RequestContext:
    return m.RequestContext(
        sampling=m.Sampling(),
        max_new_tokens=max_new,
        eos_token_id=2,
        prompt_len=prompt_len,
        index0=0,
        decoder_replica=1,
    )


def step(rid: str, step_: int, position: int, *, with_ctx: bool = False) -> m.DecodeStep:
    return m.DecodeStep(
        request_id=m.RequestId(rid),
        attempt=0,
        token_id=5,
        position=position,
        step=step_,
        context=ctx() if with_ctx else None,
        plan_version=1,
    )


def chunk(rid: str, layer: int, n: int = 3) -> m.KVChunk:
    kv = np.zeros((1, 1, n, 1), np.float32)
    return m.KVChunk(
        request_id=m.RequestId(rid),
        attempt=0,
        layer=layer,
        token_start=0,
        n_tokens_total=n,
        key=kv,
        value=kv,
        chunk=0,
        n_chunks=1,
        context=ctx(),
        plan_version=1,
    )


def errors(cmds: list[dc.Command]) -> list[m.ErrorReport]:
    return [c.msg for c in cmds if isinstance(c, dc.Report) and isinstance(c.msg, m.ErrorReport)]


def test_a_decode_step_waits_for_its_kv_then_runs() -> None:
    core, _ = ready_core()
    core.accept(step("r1", 1, 3, with_ctx=True), 0.0)
    job, _ = core.next_job(0.0)
    assert job is None and core.attempts[AttemptKey("r1", 0)].waiting, "parked: no KV yet"
    writes = []
    for layer in range(4):
        writes += [x for x in core.accept(chunk("r1", layer), 0.5) if isinstance(x, dc.WriteKV)]
    assert [w.layer for w in writes] == [0, 1, 2, 3]
    job, _ = core.next_job(0.5)
    assert job is not None and len(job.rows) == 1 and job.rows[0].start == 3
    assert core.counters["last_kv_wait_s"] == pytest.approx(0.5)


def test_kv_that_never_arrives_fails_the_request_with_kv_timeout() -> None:
    core, _ = ready_core(kv_wait_timeout=5.0)
    core.accept(step("r1", 1, 3, with_ctx=True), 0.0)
    core.accept(chunk("r1", 0), 0.0)  # one layer of four
    core.next_job(0.0)
    (err,) = errors(core.tick(6.0))
    assert err.code == ErrorCode.KV_TIMEOUT and err.attempt == 0
    assert AttemptKey("r1", 0) not in core.attempts


def kv_and_step(core: dc.DeviceCore, rid: str) -> None:
    for layer in range(4):
        core.accept(chunk(rid, layer), 0.0)
    core.accept(step(rid, 1, 3, with_ctx=True), 0.0)


def test_consecutive_decode_steps_run_as_one_micro_batch_and_leave_as_one_message() -> None:
    # 3 requests held over 2 stages: micro-batches of 2, so both stages have one to work on
    core, _ = ready_core(concurrency=4)
    for rid in ("a", "b", "c"):
        kv_and_step(core, rid)
    job, _ = core.next_job(0.0)
    assert job is not None and [r.key.request_id for r in job.rows] == ["a", "b"]
    out = np.zeros((2, 1, HIDDEN), np.float32)
    (send,) = [x for x in core.computed(dc.Computed(job.job, out), 0.0) if isinstance(x, dc.Send)]
    assert send.device_id == "d1" and isinstance(send.msg, m.DecodeBatch)
    assert [s.request_id for s in send.msg.steps] == ["a", "b"]
    assert all(isinstance(s, m.Activation) and s.context is not None for s in send.msg.steps)
    job2, _ = core.next_job(0.0)
    assert job2 is not None and [r.key.request_id for r in job2.rows] == ["c"]
    out = np.zeros((1, 1, HIDDEN), np.float32)
    (send,) = [x for x in core.computed(dc.Computed(job2.job, out), 0.0) if isinstance(x, dc.Send)]
    assert isinstance(send.msg, m.Activation), "a batch of one travels as itself"


def test_the_configured_max_batch_still_caps_a_micro_batch() -> None:
    core, _ = ready_core(concurrency=4, max_batch=1)
    for rid in ("a", "b", "c"):
        kv_and_step(core, rid)
    job, _ = core.next_job(0.0)
    assert job is not None and [r.key.request_id for r in job.rows] == ["a"]


def test_a_decode_batch_received_runs_as_one_batch() -> None:
    core, _ = ready_core(concurrency=4)
    for rid in ("a", "b", "c", "d"):  # 4 requests held on 2 stages: micro-batches of 2
        for layer in range(4):
            core.accept(chunk(rid, layer), 0.0)
    batch = m.DecodeBatch(steps=(step("a", 1, 3, with_ctx=True), step("b", 1, 3, with_ctx=True)))
    core.accept(batch, 0.0)
    job, _ = core.next_job(0.0)
    assert job is not None and [r.key.request_id for r in job.rows] == ["a", "b"]


def test_a_full_inbox_answers_overloaded() -> None:
    core, _ = ready_core(max_inbox=2)
    for i in range(2):
        assert not errors(core.accept(step(f"r{i}", 1, 3, with_ctx=True), 0.0))
    (err,) = errors(core.accept(step("r9", 1, 3, with_ctx=True), 0.0))
    assert err.code == ErrorCode.OVERLOADED and err.request_id == "r9"
    assert core.counters["rejected"] == 1 and len(core.inbox) == 2


def test_release_frees_the_cache_and_drops_queued_work() -> None:
    core, _ = ready_core()
    for layer in range(4):
        core.accept(chunk("r1", layer), 0.0)
    core.accept(step("r1", 1, 3), 0.0)
    cmds = core.accept(m.Release(request_id=m.RequestId("r1"), attempt=0, reason="done"), 0.0)
    assert dc.FreeCache(AttemptKey("r1", 0)) in cmds
    assert not core.inbox and not core.attempts and core.counters["released"] == 1
    assert core.next_job(0.0)[0] is None


def test_messages_of_another_plan_version_or_before_loading_are_refused() -> None:
    core = dc.DeviceCore(
        dc.DeviceConfig(
            device_id="d0", vocab_size=512, max_position=256, hidden_size=HIDDEN, eos_token_id=2
        )
    )
    (err,) = errors(core.accept(chunk("r1", 0), 0.0))
    assert err.code == ErrorCode.NOT_READY
    core, _ = ready_core()
    stale = m.KVChunk(**{**chunk("r1", 0).__dict__, "plan_version": 7})
    (err,) = errors(core.accept(stale, 0.0))
    assert err.code == ErrorCode.PLAN_VERSION


def test_a_context_asking_for_too_much_memory_is_refused() -> None:
    core, _ = ready_core()
    big = m.RequestContext(
        sampling=m.Sampling(),
        max_new_tokens=400,
        eos_token_id=2,
        prompt_len=100,
        index0=0,
        decoder_replica=1,
    )
    msg = m.KVChunk(**{**chunk("r1", 0).__dict__, "context": big})
    (err,) = errors(core.accept(msg, 0.0))
    assert err.code == ErrorCode.BAD_REQUEST and "500 tokens" in err.message
    assert not core.attempts


def test_a_role_flip_keeps_the_weights() -> None:
    core, plan = ready_core()
    flipped = Plan(
        2,
        plan.method,
        plan.n_layers,
        [
            Replica(0, "decoder", 3, plan.replicas[0].stages),
            Replica(1, "prefill", 1, plan.replicas[1].stages),
        ],
    )
    cmds = core.plan(flipped, 1.0)
    assert not [x for x in cmds if isinstance(x, dc.Load)], "same layers: no reload"
    assert core.telemetry(0).loads == 1
    assert dc.Configure(0) in cmds  # a prefill replica keeps no decode pool
    assert core.status == DeviceStatus.READY and core.placement is not None
    assert core.placement.replica.role == "prefill" and core.placement.version == 2
    moved = Plan(
        3,
        plan.method,
        plan.n_layers,
        [
            Replica(
                0, "prefill", 1, [stage("d0", 0, 5, True, False), stage("p1", 5, 8, False, True)]
            ),
            Replica(
                1, "decoder", 2, [stage("p0", 0, 4, True, False), stage("d1", 4, 8, False, True)]
            ),
        ],
    )
    cmds = core.plan(moved, 2.0)
    assert [x.layers for x in cmds if isinstance(x, dc.Load)] == [(0, 5)]
    assert core.status == DeviceStatus.LOADING


def test_a_device_holding_work_without_progress_reports_itself_stuck() -> None:
    core, _ = ready_core(stage_timeout=10.0)
    for layer in range(4):
        core.accept(chunk("r1", layer), 0.0)
    core.accept(step("r1", 1, 3), 0.0)
    job, _ = core.next_job(0.0)  # the engine takes it... and never answers
    core.accept(step("r1", 2, 4), 1.0)
    cmds = core.tick(12.0)
    assert core.status == DeviceStatus.STUCK and dc.PublishState() in cmds
    assert job is not None
    core.computed(dc.Computed(job.job, np.zeros((1, 1, HIDDEN), np.float32)), 13.0)
    core.tick(13.5)
    assert core.status == DeviceStatus.READY


def test_a_malformed_message_naming_a_request_reports_it() -> None:
    core, _ = ready_core()
    for layer in range(2):
        core.accept(chunk("r1", layer), 0.0)
    (report,) = [
        c for c in core.reject_malformed("r1", "kv_chunk.key: dtype") if isinstance(c, dc.Report)
    ]
    assert isinstance(report.msg, m.ErrorReport) and report.msg.attempt is None
    assert report.msg.code == ErrorCode.BAD_MESSAGE and not core.attempts


def test_a_decode_step_held_up_by_another_prompts_prefill_reports_the_stall() -> None:
    """On a mixed replica, a decode step that arrives while the device prefills another
    prompt waits for it: the step carries that wait on (`Activation.stalled_s`) so the
    orchestrator counts it as waiting, as the standard metrics define it."""
    plan = Plan(
        1,
        "pinned",
        8,
        [Replica(0, "mixed", 2, [stage("m0", 0, 4, True, False), stage("m1", 4, 8, False, True)])],
    )
    core = dc.DeviceCore(
        dc.DeviceConfig(
            device_id="m0", vocab_size=512, max_position=256, hidden_size=HIDDEN, eos_token_id=2
        )
    )
    core.plan(plan, 0.0)
    core.loaded(1, None, 0.0)

    def start(rid: str) -> m.PrefillStart:
        return m.PrefillStart(
            request_id=m.RequestId(rid),
            attempt=0,
            token_ids=[5, 6, 7],
            decoder_replica=0,
            sampling=m.Sampling(),
            max_new_tokens=8,
            plan_version=1,
        )

    def run(at: float, t_done: float, rows: int, tokens: int) -> list[m.Activation]:
        job, _ = core.next_job(at)
        assert job is not None
        out = np.zeros((rows, tokens, HIDDEN), np.float32)
        cmds = core.computed(dc.Computed(job.job, out), t_done)
        return [c.msg for c in cmds if isinstance(c, dc.Send) and isinstance(c.msg, m.Activation)]

    core.accept(start("r0"), 0.0)
    run(0.0, 0.1, 1, 3)
    core.accept(step("r0", 1, 3), 0.2)
    (first,) = run(0.2, 0.25, 1, 1)
    assert first.stalled_s == 0.0 and first.context is not None
    core.accept(start("r1"), 1.0)
    job, _ = core.next_job(1.0)  # r1's prefill runs from 1.0 ...
    assert job is not None
    core.accept(step("r0", 2, 4), 1.5)  # ... r0's next step arrives at 1.5 and waits
    assert core.next_job(1.5)[0] is None
    core.computed(dc.Computed(job.job, np.zeros((1, 3, HIDDEN), np.float32)), 2.0)
    (held,) = run(2.0, 2.05, 1, 1)
    assert held.request_id == "r0" and held.stalled_s == pytest.approx(0.5)
    core.accept(step("r0", 3, 5), 2.3)  # nothing in the way
    (free,) = run(2.3, 2.35, 1, 1)
    assert free.stalled_s == 0.0


def test_fewer_requests_than_slots_make_smaller_micro_batches() -> None:
    """Two requests held on two stages: one each in flight, not one batch of two that
    leaves a stage idle while it travels (the planner's micro_batch(n, k) for n held)."""
    core, _ = ready_core(concurrency=4)
    for rid in ("a", "b"):
        kv_and_step(core, rid)
    job, _ = core.next_job(0.0)
    assert job is not None and [r.key.request_id for r in job.rows] == ["a"]
