"""Re-planning on drift: the live mix, the decision, and plan switches in the simulator."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from planner import make_plan
from planner.drift import DriftConfig, DriftPlanner, MixEstimator, waiting_area
from planner.make import reassign
from planner.plan import Plan
from planner.pools import pool
from planner.sim import simulate
from planner.switch import Flip, Keep, Relayout, SwitchCost, SwitchDecision, reload_s, same_layout
from planner.workload import Phase, PhasedWorkload, Workload


def test_mix_estimator_follows_recent_requests_and_keeps_room_for_those_in_flight() -> None:
    m = MixEstimator(window_s=60.0, recent=5)
    for i in range(10):
        m.observe_arrival(float(i), f"a{i}", 100, 200)
    for i in range(10):
        m.observe_finish(10.0 + i, f"a{i}", 50)
    w = m.estimate(20.0)
    assert w is not None
    assert (w.mean_prompt_tokens, w.mean_output_tokens) == (100, 50)
    assert w.arrival_rate_rps == pytest.approx(10 / 20.0)
    for i in range(5):  # the mix changes: the last five arrivals are long prompts
        m.observe_arrival(20.0 + i, f"b{i}", 1000, 4000)
    w = m.estimate(25.0)
    assert w is not None and w.mean_prompt_tokens == 1000
    # still in flight: a decoder must be able to hold prompt + max_new_tokens
    assert w.peak_context_tokens >= 5000 and w.peak_prompt_tokens >= 1000
    assert m.counts(200.0) == (0, 0)  # everything aged out of the window


def test_waiting_area_by_hand() -> None:
    # 10 queued drain at 2 - 1 = 1/s: empty after 10 s, triangle 10 * 10 / 2
    assert waiting_area(2.0, 1.0, 10.0, 100.0, 0.0) == pytest.approx(50.0)
    # 5 s down first: 10 * 5 + 1 * 25 / 2 = 62.5, then 15 drain in 15 s: 112.5
    assert waiting_area(2.0, 1.0, 10.0, 100.0, 5.0) == pytest.approx(175.0)
    # overloaded: the queue grows at 0.5/s for 10 s
    assert waiting_area(0.5, 1.0, 0.0, 10.0, 0.0) == pytest.approx(25.0)


def observe(planner: DriftPlanner, w: Workload, start: float, n: int) -> float:
    t = start
    for i in range(n):
        t += 1.0 / w.arrival_rate_rps
        rid = f"{start}-{i}"
        planner.observe_arrival(t, rid, int(w.mean_prompt_tokens), int(w.mean_output_tokens))
        planner.observe_finish(t + 0.5, rid, int(w.mean_output_tokens))
    return t + 1.0


def test_a_prefill_heavy_shift_flips_roles_on_the_same_layouts() -> None:
    inv, model, floor = pool("paper")
    decode_heavy = Workload(256, 1024, 1.0)
    plan = make_plan(inv, model, decode_heavy, min_tokens_per_s=floor)
    dp = DriftPlanner(inv, model, designed_for=decode_heavy, min_tokens_per_s=floor)
    assert isinstance(dp.decide(0.0, plan, 0), Keep)  # nothing observed yet
    t = observe(dp, Workload(2048, 64, 1.0), 0.0, 40)
    d = dp.decide(t, plan, queued=20)
    assert isinstance(d, Flip), d
    assert same_layout(plan, d.plan)
    assert {r.replica_id for r in d.plan.replicas} == {r.replica_id for r in plan.replicas}
    before = sum(r.role == "prefill" for r in plan.replicas)
    assert sum(r.role in ("prefill", "mixed") for r in d.plan.replicas) > before
    assert reload_s(plan, d.plan, model, SwitchCost()) == 0.0  # nothing reloads
    assert isinstance(dp.decide(t + 1.0, d.plan, 20), Keep)  # cooling down


def test_reassign_keeps_every_device_on_its_layers() -> None:
    inv, model, floor = pool("paper")
    plan = make_plan(inv, model, Workload(576, 588, 1.0), min_tokens_per_s=floor)
    again = reassign(plan, inv, model, Workload(3000, 40, 1.0), min_tokens_per_s=floor)
    assert same_layout(plan, again) and again.version == plan.version + 1
    assert again.predicted["mixed_capacity_rps"] >= 0


def drifting() -> PhasedWorkload:
    return PhasedWorkload(
        (
            Phase(Workload(256, 1024, 1.0), 100, "long outputs"),
            Phase(Workload(2048, 64, 1.0), 100, "long prompts"),
        )
    )


def test_replanning_beats_the_static_plan_on_a_drifting_stream() -> None:
    inv, model, floor = pool("paper")
    ph = drifting()
    reqs = ph.sample_requests(np.random.default_rng(3))
    plan = make_plan(inv, model, ph.first, min_tokens_per_s=floor)
    static = simulate(plan, inv, model, ph.first, reqs)
    dp = DriftPlanner(
        inv, model, designed_for=ph.first, min_tokens_per_s=floor, config=DriftConfig()
    )
    moving = simulate(plan, inv, model, ph.first, reqs, replanner=dp)
    assert moving.n_completed == static.n_completed == len(reqs)
    assert moving.switches and all(" flip: " in s for s in moving.switches)
    assert moving.summary.waiting.mean < 0.5 * static.summary.waiting.mean


@dataclass
class Scripted:
    """A re-planner that asks for one re-layout at a given time (the simulator's side of
    a switch is what is tested here)."""

    at: float
    plan: Plan
    tick_s: float = 5.0
    done: bool = False
    seen: list[str] = field(default_factory=list)

    def observe_arrival(self, now: float, rid: str, prompt: int, max_new: int) -> None:
        self.seen.append(rid)

    def observe_finish(self, now: float, rid: str, output_tokens: int) -> None:
        pass

    def decide(self, now: float, plan: Plan, queued: int) -> SwitchDecision:
        if now >= self.at and not self.done:
            self.done = True
            return Relayout(self.plan, "scripted")
        return Keep()


def test_a_relayout_drains_restarts_and_reloads_before_serving_again() -> None:
    inv, model, floor = pool("paper")
    wl = Workload(576, 588, 1.0)
    reqs = wl.sample_requests(80, np.random.default_rng(5))
    a = make_plan(inv, model, wl, min_tokens_per_s=floor)
    b = make_plan(inv, model, wl, method="pipeline", min_tokens_per_s=floor, version=2)
    cost = SwitchCost(drain_timeout_s=2.0, load_mb_per_s=500.0, fixed_s=3.0)
    down = reload_s(a, b, model, cost)
    assert down > cost.fixed_s
    res = simulate(a, inv, model, wl, reqs, replanner=Scripted(30.0, b), switch=cost)
    assert res.n_completed == len(reqs)
    assert res.switches == ("30.0 relayout: scripted",)
    for rec in res.records:
        assert rec.output_tokens == next(
            r.output_tokens for r in reqs if str(r.id) == rec.request_id
        )
    # nothing is dispatched between the end of the drain and the end of the reload
    starts = [r.prefill_start_s for r in res.records]
    assert not any(32.0 < s < 32.0 + down - 1e-6 for s in starts)
    # requests cut off while decoding restarted, and waited (stalled) through the switch
    cut = [r for r in res.records if r.decode_start_s < 32.0 < r.finish_s]
    assert cut and all(r.decode_stall_s >= down for r in cut)
    assert all(r.waiting_s >= r.decode_stall_s for r in cut)


def test_after_a_prompt_shift_only_the_new_requests_outputs_count() -> None:
    m = MixEstimator(window_s=1000.0, recent=10)
    t = 0.0
    for i in range(10):  # old mix: short prompts, long outputs
        m.observe_arrival(t, f"o{i}", 100, 1000)
        m.observe_finish(t + 1, f"o{i}", 1000)
        t += 2
    for i in range(10):  # new mix: long prompts; five of them finish with 50 tokens
        m.observe_arrival(t, f"n{i}", 2000, 50)
        t += 2
    w = m.estimate(t)
    assert w is not None and w.mean_output_tokens == 1000  # no evidence yet
    for i in range(5):
        m.observe_finish(t + i, f"n{i}", 50)
    w = m.estimate(t + 5)
    assert w is not None and w.mean_output_tokens == 50
