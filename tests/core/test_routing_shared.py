"""The runtime orchestrator routes with the simulator's router: fed the same events at the
same times, the fog core dispatches the same requests to the same replicas and decoders,
at the same moments, as the simulator does (issue 14, one routing policy)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from e2llm_edge.fog import core as c
from e2llm_edge.fog.registry import Registry
from e2llm_edge.wire import messages as m
from e2llm_edge.wire.messages import DeviceStatus
from planner import Plan, make_plan
from planner.routing import Dispatch
from planner.sim import cluster
from planner.sim.paper import paper_inventory, paper_model
from planner.workload import Request, Workload
from tests.core.fogharness import VOCAB, CharCodec, profile
from tests.core.routing_log import Recording


def serving_core(plan: Plan, workload: Workload, policy: Any) -> c.FogCore:
    """A fog core serving `plan` (pinned) from time 0, its devices ready, no timeouts in
    the way of a long replay."""
    devices = sorted(s.device_id for r in plan.replicas for s in r.stages)
    cfg = c.FogConfig(
        expect_devices=len(devices),
        settle_s=0.0,
        workload=workload,
        request_timeout=1e9,
        heartbeat_timeout=1e9,
        max_queue=100_000,
        routing=policy,
    )
    core = c.FogCore(
        cfg,
        c.ModelInfo(context_length=1 << 16, vocab_size=VOCAB, n_layers=plan.n_layers),
        CharCodec(),
        registry=Registry(),
        pinned=plan,
    )
    for d in devices:
        core.handle(c.DeviceProfileSeen(d, profile(d)), 0.0)
        state = m.DeviceState(device_id=m.DeviceId(d), status=DeviceStatus.ONLINE)
        core.handle(c.DeviceStateSeen(d, state), 0.0)
    core.handle(c.Tick(), 0.0)
    assert core.plan is not None
    for d in devices:
        state = m.DeviceState(
            device_id=m.DeviceId(d), status=DeviceStatus.READY, plan_version=core.version
        )
        core.handle(c.DeviceStateSeen(d, state), 0.0)
    assert core.phase == c.PlanPhase.SERVING, core.phase
    return core


@pytest.mark.parametrize("policy", ["time", "count"])
def test_the_runtime_decides_what_the_simulator_decides(
    monkeypatch: pytest.MonkeyPatch, policy: Any
) -> None:
    inv, model = paper_inventory(), paper_model()
    wl = Workload(576, 588, 1.0)
    plan = make_plan(inv, model, wl)
    rng = np.random.default_rng(5)
    # at least 3 tokens each: the runtime learns of the KV's arrival from the second token,
    # so a request must not end with it; at most 60, so the replay below stays short;
    # arriving 5x faster than planned for, so requests queue
    reqs = [
        Request(r.id, r.arrival_s, r.prompt_tokens, min(max(3, r.output_tokens), 60))
        for r in wl.sample_requests(80, rng)
    ]
    reqs = [Request(r.id, r.arrival_s / 5, r.prompt_tokens, r.output_tokens) for r in reqs]
    Recording.log = []
    monkeypatch.setattr(cluster, "Router", Recording)
    res = cluster.simulate(plan, inv, model, wl, reqs, routing=policy, bind="dispatch")
    assert res.n_completed == len(reqs)
    sim = [
        (now, d.request_id, d.replica_id, d.decoder)
        for name, (now, *_), out in Recording.log
        if name == "decide"
        for d in out
    ]
    assert all(isinstance(d, Dispatch) for name, _, out in Recording.log for d in out or [])

    core = serving_core(plan, wl, policy)
    embeds = {next(s.device_id for s in r.stages if s.embed): r.replica_id for r in plan.replicas}
    lasts = {r.replica_id: r.stages[-1].device_id for r in plan.replicas}
    outputs = {str(r.id): r.output_tokens for r in reqs}
    runtime: list[tuple[float, str, int, int]] = []

    def feed(event: c.Event, now: float, *, check: bool = True) -> None:
        for cmd in core.handle(event, now):
            if isinstance(cmd, c.Send) and isinstance(cmd.msg, m.PrefillStart):
                runtime.append(
                    (now, cmd.msg.request_id, embeds[cmd.device_id], cmd.msg.decoder_replica)
                )
        if check:
            core.check_invariants()

    def token(rid: str, now: float, *, last: bool = False, check: bool = True) -> None:
        req = core.requests[rid]
        assert req.route is not None
        dev = lasts[req.route.prefill if not req.generated else req.route.decoder]
        msg = m.TokenOut(
            request_id=m.RequestId(rid),
            attempt=req.attempt,
            token_id=7,
            index=len(req.generated),
            finished=last,
            finish_reason="length" if last else None,
            plan_version=req.route.plan_version,
        )
        feed(c.TokenArrived(dev, msg), now, check=check)

    for name, args, _ in Recording.log:
        if name == "arrive":
            rid, prompt, max_new, now = args
            msg = m.GenerateRequest(
                request_id=m.RequestId(rid),
                client_id=m.ClientId("cli"),
                prompt_ids=[3] * prompt,
                max_new_tokens=max_new,
            )
            feed(c.RequestArrived("cli", msg), now)
        elif name in ("prefill_done", "kv_moved"):
            rid, now = args
            token(rid, now)
        elif name == "finish":
            rid, now = args
            while len(core.requests[rid].generated) < outputs[rid] - 1:
                token(rid, now, check=False)  # the decode steps the simulator did not log
            token(rid, now, last=True)
        else:
            feed(c.Tick(), args[0])

    assert len(sim) == len(reqs)
    arrivals = {str(r.id): r.arrival_s for r in reqs}
    assert sum(t > arrivals[rid] + 1.0 for t, rid, _, _ in sim) > 10, "some had to wait"
    assert len({(p, d) for _, _, p, d in sim}) > 2, "several routes taken"
    assert runtime == sim
    assert core.completed == len(reqs) and not core.requests
