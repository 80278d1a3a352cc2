"""The one routing policy: hand-computed decisions, memory, flips, and the simulator
driving exactly this code."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from planner import make_plan
from planner.plan import Plan, Replica, Role, Stage, Timing
from planner.routing import BUFFER, Bind, Dispatch, Phase, Reject, Router
from planner.sim import cluster
from planner.sim.paper import paper_inventory, paper_model
from planner.workload import Workload
from tests.core.routing_log import Recording


def replica(
    rid: int,
    role: Role,
    *,
    per_100: float = 1.0,
    concurrency: int = 1,
    cycles: tuple[float, ...] = (0.1,),
    budget: float = 10_000.0,
    stages: int = 1,
) -> Replica:
    """A replica whose prefill takes `per_100` s per 100 prompt tokens (split evenly over
    `stages`) and whose decode cycle at n requests is cycles[n-1]."""
    per_stage = per_100 / stages
    return Replica(
        rid,
        role,
        concurrency,
        [Stage(f"d{rid}-{i}", i, i + 1, i == 0, i == stages - 1, 0.0, 0.0) for i in range(stages)],
        Timing(
            prefill_tokens=(100, 200),
            prefill_stage_s=((per_stage,) * stages, (2 * per_stage,) * stages),
            decode_cycle_s=cycles,
            kv_budget_tokens=budget,
        ),
    )


def plan_of(*replicas: Replica) -> Plan:
    """The replicas in one plan; each one's last stage holds the layers up to the deepest
    replica's depth, so every replica covers the whole model as a plan must."""
    n = max(len(r.stages) for r in replicas)
    whole = [
        dataclasses.replace(
            r, stages=[*r.stages[:-1], dataclasses.replace(r.stages[-1], layer_end=n)]
        )
        for r in replicas
    ]
    return Plan(1, "test", n, whole, {"mean_output_tokens": 11.0})


def two_prefill_two_decoders(**kw: Any) -> Plan:
    return plan_of(
        replica(0, "prefill", per_100=1.0),
        replica(1, "prefill", per_100=2.0),
        replica(2, "decoder", concurrency=2, cycles=(0.1, 0.12), **kw),
        replica(3, "decoder", concurrency=1, cycles=(0.2,), **kw),
    )


def test_time_policy_waits_for_the_faster_replica_and_lets_others_pass() -> None:
    r = Router(two_prefill_two_decoders(), "time")
    for rid in ("a", "b", "c"):
        r.arrive(rid, 100, 10, 0.0)
    # a: fast replica done at 1 (slow: 2). b: fast again at 2 (its stage frees at 1),
    # equal to the slow one's 2, lower id wins: b waits for the fast replica. c: fast at
    # 3, slow at 2: c takes the slow replica now, overtaking b, who did not want it.
    assert r.decide(0.0) == [Dispatch("a", 0), Dispatch("c", 1)]
    assert r.next_wakeup() == pytest.approx(1.0)
    assert r.decide(0.5) == []
    assert r.decide(1.0) == [Dispatch("b", 0)]
    assert r.phase("b") is Phase.PREFILLING


def test_count_and_tokens_policies_are_work_conserving() -> None:
    for policy in ("count", "tokens"):
        r = Router(two_prefill_two_decoders(), policy)  # type: ignore[arg-type]
        for rid in ("a", "b", "c"):
            r.arrive(rid, 100, 10, 0.0)
        # a to the first replica; its first stage is busy until 1, so b goes to the free
        # slow one; c waits for a first stage to free and a wake-up is asked for then
        assert r.decide(0.0) == [Dispatch("a", 0), Dispatch("b", 1)]
        assert r.next_wakeup() == pytest.approx(1.0)
        assert r.decide(1.0) == [Dispatch("c", 0)]


def test_decoder_is_bound_after_prefill_by_each_policy() -> None:
    picks = {}
    for policy in ("time", "count", "tokens"):
        r = Router(two_prefill_two_decoders(), policy)  # type: ignore[arg-type]
        for rid in ("a", "b"):
            r.arrive(rid, 100, 10, 0.0)
        r.decide(0.0)
        r.prefill_done("a", 1.0)
        assert r.phase("a") is Phase.READY
        first = [d for d in r.decide(1.0) if isinstance(d, Bind)]
        done = 2.0 if r.phase("b") is Phase.PREFILLING and policy == "time" else 1.5
        r.prefill_done("b", done)
        second = [d for d in r.decide(done) if isinstance(d, Bind)]
        picks[policy] = (first, second)
    # time: the faster decoder (0.1 s, then 0.12 s at two) both times; count: fewest
    # bound, so the second goes to the empty one; tokens: least reserved KV
    assert picks["time"] == ([Bind("a", 2)], [Bind("b", 2)])
    assert picks["count"] == ([Bind("a", 2)], [Bind("b", 3)])
    assert picks["tokens"] == ([Bind("a", 2)], [Bind("b", 3)])


def test_decoder_slots_and_kv_budgets_bound_admission() -> None:
    # decoders hold 250 KV tokens: one request of 100 + 100 each
    r = Router(two_prefill_two_decoders(budget=250.0), "time")
    for i in range(4):
        r.arrive(str(i), 100, 100, 0.0)
    r.decide(0.0)
    t = 0.0
    binds = []
    for rid in ("0", "1", "2"):
        while r.phase(rid) is Phase.QUEUED:
            t = max(t, r.next_wakeup() or t)
            r.decide(t)
        t += 3.0
        r.prefill_done(rid, t)
        binds += r.decide(t)
    assert [b for b in binds if isinstance(b, Bind)] == [Bind("0", 2), Bind("1", 3)]
    assert r.phase("2") is Phase.READY  # no decoder has memory left
    r.kv_moved("0", t)
    r.finish("0", t + 1)
    assert Bind("2", 2) in r.decide(t + 1)


def test_prompts_no_replica_can_hold_are_rejected_with_the_figures() -> None:
    r = Router(two_prefill_two_decoders(budget=500.0), "time")
    r.arrive("big", 400, 200, 0.0)
    r.arrive("ok", 100, 10, 0.0)
    out = r.decide(0.0)
    assert isinstance(out[0], Reject) and out[0].request_id == "big"
    assert "600" in out[0].reason and "500" in out[0].reason
    assert out[1] == Dispatch("ok", 0)
    assert "big" not in r.requests


def test_prefill_runs_ahead_of_full_decoders_only_by_a_margin() -> None:
    # one decoder with one slot, one single-stage prefill replica
    plan = plan_of(replica(0, "prefill"), replica(1, "decoder", concurrency=1))
    r = Router(plan, "count")
    for i in range(10):
        r.arrive(str(i), 100, 10, 0.0)
    t, dispatched = 0.0, []
    for _ in range(10):
        dispatched += [d for d in r.decide(t) if isinstance(d, Dispatch)]
        t += 1.0
        for d in dispatched:
            if r.phase(d.request_id) is Phase.PREFILLING:
                r.prefill_done(d.request_id, t)
                break
    # the free slot (taken by the first prefilled request and never freed), RUN_AHEAD 1
    # prefilled request per decoder, and the BUFFER prompts the pipeline holds
    assert len(dispatched) == 1 + 1 + BUFFER * 1


def test_flip_drains_old_work_then_takes_the_new_role() -> None:
    plan = two_prefill_two_decoders()
    r = Router(plan, "time")
    r.arrive("a", 100, 10, 0.0)
    r.decide(0.0)
    r.prefill_done("a", 1.0)
    assert r.decide(1.0) == [Bind("a", 2)]
    flipped = plan_of(
        plan.replicas[0],
        plan.replicas[1],
        replica(2, "prefill", per_100=0.5),
        plan.replicas[3],
    )
    r.reconfigure(flipped)
    assert r.take_flipped() == []  # still decoding "a"
    r.arrive("b", 100, 10, 1.0)
    assert all(d.replica_id != 2 for d in r.decide(1.0) if isinstance(d, Dispatch | Bind))
    r.kv_moved("a", 1.5)
    r.finish("a", 5.0)
    assert r.take_flipped() == [2]
    assert r.replicas[2].role == "prefill"
    r.arrive("c", 100, 10, 5.0)
    assert Dispatch("c", 2) in r.decide(5.0)  # the new, fastest prefill replica


def test_prefill_replica_flipped_to_decoder_decodes_its_held_kv_in_place() -> None:
    plan = plan_of(replica(0, "prefill"), replica(1, "decoder", concurrency=1))
    r = Router(plan, "time")
    r.arrive("a", 100, 10, 0.0)
    r.arrive("b", 100, 10, 0.0)
    r.decide(0.0)
    r.decide(1.0)
    r.prefill_done("a", 1.0)
    r.decide(1.0)  # a takes the only decoder slot
    r.prefill_done("b", 2.0)
    assert r.decide(2.0) == []  # b's KV waits on replica 0
    both = plan_of(replica(0, "decoder", concurrency=2, cycles=(0.1, 0.1)), plan.replicas[1])
    r.reconfigure(both)
    assert r.take_flipped() == [0]  # held KV does not hold the flip back
    assert r.decide(2.0) == [Bind("b", 0)]  # decoded where its KV already is
    assert "b" not in r.replicas[0].held and "b" in r.replicas[0].decoding


def test_mixed_replica_prefills_one_prompt_at_a_time_and_decodes_in_place() -> None:
    plan = plan_of(replica(0, "mixed", concurrency=2, cycles=(0.1, 0.1)))
    r = Router(plan, "time")
    for rid in ("a", "b", "c"):
        r.arrive(rid, 100, 10, 0.0)
    assert r.decide(0.0) == [Dispatch("a", 0)]
    r.prefill_done("a", 1.0)
    assert r.phase("a") is Phase.DECODING
    assert r.decide(1.0) == [Dispatch("b", 0)]
    r.prefill_done("b", 2.0)
    assert r.decide(2.0) == []  # both slots decoding
    r.finish("a", 3.0)
    assert r.decide(3.0) == [Dispatch("c", 0)]


def test_same_events_same_decisions() -> None:
    def run() -> list[Any]:
        r = Router(two_prefill_two_decoders(), "time")
        out: list[Any] = []
        for i in range(6):
            r.arrive(str(i), 50 + 30 * i, 10, 0.1 * i)
            out += r.decide(0.1 * i)
        return out

    assert run() == run()


def test_simulator_drives_the_same_router_a_runtime_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Replaying the simulator's calls into a fresh router, as an orchestrator would
    make them, gives the same decisions: what is simulated is this policy."""
    inv, model = paper_inventory(), paper_model()
    wl = Workload(576, 588, 1.5)
    plan = make_plan(inv, model, wl)
    Recording.log = []
    monkeypatch.setattr(cluster, "Router", Recording)
    reqs = wl.sample_requests(60, np.random.default_rng(2))
    res = cluster.simulate(plan, inv, model, wl, reqs)
    assert res.n_completed == 60
    log = Recording.log
    assert sum(1 for name, _, out in log if name == "decide" and out) > 60
    fresh = Router(plan, "time")
    for name, args, out in log:
        if name == "decide":
            assert fresh.decide(*args) == out
        else:
            getattr(fresh, name)(*args)
    assert fresh.requests == {} and fresh.queued == 0


class RouterMachine(RuleBasedStateMachine):
    """Random event sequences: slots and memory are never exceeded on admission, every
    request ends exactly once, nothing leaks."""

    def __init__(self) -> None:
        super().__init__()
        plan = plan_of(
            replica(0, "prefill", stages=2, budget=900.0),
            replica(1, "prefill", per_100=3.0),
            replica(2, "decoder", concurrency=3, cycles=(0.1, 0.1, 0.1), budget=1200.0),
            replica(3, "decoder", concurrency=1, budget=700.0),
        )
        self.router = Router(plan, "time")
        self.now = 0.0
        self.n = 0
        self.ended: set[str] = set()

    def _apply(self) -> None:
        for d in self.router.decide(self.now):
            if isinstance(d, Reject):
                assert d.request_id not in self.ended
                self.ended.add(d.request_id)

    @rule(prompt=st.integers(1, 800), new=st.integers(1, 300), dt=st.floats(0, 2))
    def arrive(self, prompt: int, new: int, dt: float) -> None:
        self.now += dt
        self.router.arrive(str(self.n), prompt, new, self.now)
        self.n += 1
        self._apply()

    def _in(self, phase: Phase) -> list[str]:
        return sorted(k for k, v in self.router.requests.items() if v.phase is phase)

    @precondition(lambda self: self._in(Phase.PREFILLING))
    @rule(data=st.data())
    def prefilled(self, data: st.DataObject) -> None:
        self.now += 0.5
        self.router.prefill_done(data.draw(st.sampled_from(self._in(Phase.PREFILLING))), self.now)
        self._apply()

    @precondition(lambda self: self._in(Phase.MOVING))
    @rule(data=st.data())
    def moved(self, data: st.DataObject) -> None:
        self.router.kv_moved(data.draw(st.sampled_from(self._in(Phase.MOVING))), self.now)
        self._apply()

    @precondition(lambda self: self._in(Phase.DECODING) or self._in(Phase.READY))
    @rule(data=st.data())
    def finished(self, data: st.DataObject) -> None:
        rid = data.draw(st.sampled_from(self._in(Phase.DECODING) + self._in(Phase.READY)))
        self.now += 1.0
        self.router.finish(rid, self.now)
        assert rid not in self.ended
        self.ended.add(rid)
        self._apply()

    @rule()
    def tick(self) -> None:
        wake = self.router.next_wakeup()
        if wake is not None:
            self.now = max(self.now, wake)
        self._apply()

    @invariant()
    def limits_hold(self) -> None:
        for rep in self.router.replicas.values():
            assert len(rep.decoding) <= rep.concurrency
            assert len(rep.prefilling) <= BUFFER * rep.n_stages
            assert rep.kv_used <= rep.timing.kv_budget_tokens + 1e-9
        for rid, req in self.router.requests.items():
            assert rid not in self.ended
            assert (rid in self.router.queue) == (req.phase is Phase.QUEUED)

    def teardown(self) -> None:
        for rid in list(self.router.requests):
            self.router.finish(rid, self.now)
        for rep in self.router.replicas.values():
            assert rep.kv_used == 0 and not rep.prefilling and not rep.decoding
        assert not self.router.queue and not self.router.ready


TestRouterMachine = RouterMachine.TestCase
TestRouterMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
