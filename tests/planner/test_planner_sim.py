"""The simulator: deterministic kernel, conservation, M/D/1, agreement with the planner."""

from __future__ import annotations

import numpy as np
import pytest
from planner_factories import hardware_device, tiny_model, workload

from planner import Inventory, Plan, make_plan
from planner.plan import Replica, Stage
from planner.sim import EventQueue, simulate
from planner.sim.paper import paper_inventory, paper_model, reduction, reproduce, table
from planner.workload import Request, Workload


def test_kernel_orders_by_time_then_order_then_insertion() -> None:
    q = EventQueue()
    seen: list[str] = []

    def note(name: str, follow: bool = False):  # type: ignore[no-untyped-def]
        def h(t: float):  # type: ignore[no-untyped-def]
            seen.append(f"{name}@{t:g}")
            return [(t + 1, 0, note(name + "'"))] if follow else []

        return h

    q.schedule(2.0, 1, note("b"))
    q.schedule(2.0, 0, note("a", follow=True))
    q.schedule(2.0, 1, note("c"))
    q.schedule(1.0, 5, note("first"))
    q.run()
    assert seen == ["first@1", "a@2", "b@2", "c@2", "a'@3"]
    with pytest.raises(ValueError, match="in the past"):
        q.schedule(0.5, 0, note("late"))


def two_device_inventory() -> Inventory:
    return Inventory.from_dict(
        {
            "devices": [
                hardware_device("p", 1000, tflops=2.0, bw=20.0),
                hardware_device("d", 1000, tflops=2.0, bw=20.0),
            ]
        }
    )


def md1_plan(inv: Inventory) -> Plan:
    # one-stage prefill replica on p, one-stage decoder on d (unused when outputs are 1)
    def stage(dev: str) -> list[Stage]:
        return [Stage(dev, 0, 4, True, True, 0.0, 0.0)]

    return Plan(
        1, "manual", 4, [Replica(0, "prefill", 1, stage("p")), Replica(1, "decoder", 4, stage("d"))]
    )


def test_md1_mean_wait_matches_pollaczek_khinchine() -> None:
    inv = two_device_inventory()
    model = tiny_model(n_layers=4)
    plan = md1_plan(inv)
    from planner.costs import CostModel, Layout

    prompt = 256
    probe = Workload(prompt, 1, 1.0)
    service = sum(
        CostModel(inv, model, probe).stage_times(
            Layout((0,), (0, 4), False), decode=False, tokens=prompt
        )
    )
    rho = 0.7
    lam = rho / service
    wl = Workload(prompt, 1, lam, length_dist="fixed", arrival="poisson")
    reqs = wl.sample_requests(40_000, np.random.default_rng(1))
    res = simulate(plan, inv, model, wl, reqs)
    pk = lam * service**2 / (2 * (1 - rho))  # M/D/1 mean wait in queue
    assert res.n_completed == res.n_arrived == 40_000
    assert res.summary.waiting.mean == pytest.approx(pk, rel=0.08)
    assert res.summary.ttft.mean == pytest.approx(pk + service, rel=0.08)
    assert res.utilisation["p"] == pytest.approx(rho, rel=0.03)
    assert res.utilisation["d"] == 0.0


def test_fixed_arrivals_below_capacity_never_wait() -> None:
    inv = two_device_inventory()
    model = tiny_model(n_layers=4)
    wl = Workload(64, 1, 1.0, length_dist="fixed", arrival="fixed")
    res = simulate(md1_plan(inv), inv, model, wl, wl.sample_requests(50, np.random.default_rng(0)))
    assert res.summary.waiting.p99 == pytest.approx(0.0, abs=1e-9)


def test_every_arrival_finishes_or_is_reported() -> None:
    inv, model = paper_inventory(), paper_model()
    wl = workload(576, 588, 1.0)
    plan = make_plan(inv, model, wl)
    reqs = wl.sample_requests(200, np.random.default_rng(3))
    full = simulate(plan, inv, model, wl, reqs)
    assert full.n_completed == full.n_arrived == 200 and full.unfinished == 0
    cut = simulate(plan, inv, model, wl, reqs, horizon_s=60.0)
    assert cut.n_arrived == 200
    assert 0 < cut.n_completed < 200
    assert cut.n_completed + cut.unfinished == 200
    # total generated tokens are exactly those requested
    s = full.summary
    assert s.throughput_tokens_per_s * s.makespan_s == pytest.approx(
        sum(r.output_tokens for r in reqs)
    )


def test_saturated_throughput_matches_the_planners_prediction() -> None:
    inv, model = paper_inventory(), paper_model()
    wl = Workload(576, 588, 1.0, length_dist="fixed")
    plan = make_plan(inv, model, wl)
    # everything arrives at once: the cluster runs flat out at its bottleneck
    reqs = [Request(i, 0.0, 576, 588) for i in range(400)]
    res = simulate(plan, inv, model, wl, reqs)
    assert res.summary.throughput_rps == pytest.approx(plan.predicted["capacity_rps"], rel=0.12)


def test_mixed_replica_serves_everything() -> None:
    inv, model = paper_inventory(), paper_model()
    wl = workload(576, 588, 0.05)
    plan = make_plan(inv, model, wl, method="memprop")
    reqs = wl.sample_requests(30, np.random.default_rng(0))
    res = simulate(plan, inv, model, wl, reqs)
    assert res.n_completed == 30
    assert res.summary.tbt.mean > 0


def test_same_inputs_same_result() -> None:
    inv, model = paper_inventory(), paper_model()
    wl = workload(576, 588, 1.0)
    plan = make_plan(inv, model, wl, method="splitwise")
    reqs = wl.sample_requests(100, np.random.default_rng(5))
    a = simulate(plan, inv, model, wl, reqs, routing="count")
    b = simulate(plan, inv, model, wl, reqs, routing="count")
    assert a.summary == b.summary and a.records == b.records


def test_small_paper_grid_runs_and_tabulates() -> None:
    rows = reproduce(
        paper_inventory(),
        paper_model(),
        workloads=[(576, 588)],
        intervals=[1.0],
        n_requests=60,
        methods=["e2llm", "splitwise"],
    )
    # every method with every routing policy, exactly one strongest per method
    assert [(r.method, r.routing) for r in rows] == [
        (m, p) for m in ("e2llm", "splitwise") for p in ("time", "tokens", "count")
    ]
    for m in ("e2llm", "splitwise"):
        mine = [r for r in rows if r.method == m]
        best = [r for r in mine if r.best]
        assert len(best) == 1
        assert best[0].result is not None
        assert best[0].result.summary.waiting.mean == min(
            r.result.summary.waiting.mean for r in mine if r.result is not None
        )
    text = table(rows)
    assert "| 576/588 | 1 | e2llm (" in text
    e2, sw = (next(r for r in rows if r.method == m and r.best) for m in ("e2llm", "splitwise"))
    assert e2.result is not None and sw.result is not None
    assert reduction(rows, "576/588", 1.0) == pytest.approx(
        1 - e2.result.summary.waiting.mean / sw.result.summary.waiting.mean
    )


def test_each_prefill_stage_sends_its_kv_when_its_pass_is_done() -> None:
    """Bound at dispatch, a PREFILL stage's KV leaves as soon as that stage has computed,
    while the later stages still compute (as the agents do); bound later, when the bind
    message arrives. Slow links make the difference visible."""
    from planner.costs import CostModel, Layout
    from planner.inventory import relay

    inv = Inventory.from_dict(
        {
            "devices": [
                hardware_device(name, 1000, tflops=0.5, bw=10.0, mbps=20.0)
                for name in ("p0", "p1", "d0", "d1")
            ]
        }
    )
    model = tiny_model(n_layers=4)

    def stages(a: str, b: str) -> list[Stage]:
        return [Stage(a, 0, 1, True, False, 0.0, 0.0), Stage(b, 1, 4, False, True, 0.0, 0.0)]

    plan = Plan(
        1,
        "manual",
        4,
        [
            Replica(0, "prefill", 1, stages("p0", "p1")),
            Replica(1, "decoder", 4, stages("d0", "d1")),
        ],
    )
    prompt = 512
    wl = Workload(prompt, 3, 0.01, length_dist="fixed")
    cm = CostModel(inv, model, wl)
    src = Layout((0, 1), (0, 1, 4), False)
    times = cm.stage_times(src, decode=False, tokens=prompt, kv_out=True)
    ready = [times[0], times[0] + times[1]]
    dst = Layout((2, 3), (0, 1, 4), False)
    pieces = cm.kv_pieces(src, dst, prompt)
    assert [(i, s, d, n) for i, s, d, _, n in pieces] == [(0, 0, 2, 1), (1, 1, 3, 3)]
    # each layer a message, relayed one by one; each received as it arrives
    relayed = [relay(cm.links[s], cm.links[d], b, n, start=ready[i]) for i, s, d, b, n in pieces]
    arrive = [
        max(r.last + cm.agent_io_s(d, b / n), r.first + cm.agent_io_s(d, b))
        for r, (_, _, d, b, n) in zip(relayed, pieces, strict=True)
    ]
    # the first step may start before the last stage's KV is in: it needs it only when
    # the step reaches that stage, after the stages before it computed
    reach = [0.0, cm.stage_times(dst, decode=True, tokens=1)[0]]
    req = [Request(0, 0.0, prompt, 3)]
    early = simulate(plan, inv, model, wl, req, bind="dispatch").records[0]
    assert early.first_token_s == pytest.approx(ready[1])
    start = max(a - r for a, r in zip(arrive, reach, strict=True))
    assert early.decode_start_s == pytest.approx(max(start, ready[1]))
    assert start < max(arrive)
    late = simulate(plan, inv, model, wl, req, bind="ready", bind_message_s=0.001).records[0]
    assert late.wait_for_decoder_s > early.wait_for_decoder_s


def test_a_mixed_replica_interleaves_a_prompt_with_decoding_stage_by_stage() -> None:
    """As the agents do: a decode step meeting a prompt's pass at a stage waits for it,
    then computes while the prompt occupies the next stage, and waits there only for the
    rest of the prompt's pass. It is stalled (waiting) for those waits, not for the
    prompt's whole pass through the pipeline."""
    from planner.costs import CostModel, Layout

    inv = Inventory.from_dict(
        {"devices": [hardware_device(n, 1000, tflops=0.5, bw=10.0) for n in ("m0", "m1")]}
    )
    model = tiny_model(n_layers=4)
    plan = Plan(
        1,
        "manual",
        4,
        [
            Replica(
                0,
                "mixed",
                2,
                [
                    Stage("m0", 0, 2, True, False, 0.0, 0.0),
                    Stage("m1", 2, 4, False, True, 0.0, 0.0),
                ],
            )
        ],
    )
    wl = Workload(64, 40, 0.01, length_dist="fixed")
    cm = CostModel(inv, model, wl)
    lay = Layout((0, 1), (0, 2, 4), False)
    pa = cm.stage_times(lay, decode=False, tokens=16)
    p0, p1 = cm.stage_times(lay, decode=False, tokens=256)
    d0, d1 = cm.stage_times(lay, decode=True, tokens=1)
    assert p0 > d0 + d1 and p1 > d0
    first = sum(pa)  # A's first token; its first step then runs m0, m1, m0, ...
    arrive_b = first + d0 + d1 / 2  # B arrives while A's step is on m1
    reqs = [Request(0, 0.0, 16, 40), Request(1, arrive_b, 256, 2)]
    res = simulate(plan, inv, model, wl, reqs)
    a, b = res.records
    assert a.first_token_s == pytest.approx(first)
    # B's pass starts on m0 at once; A's step, back at m0 at first+d0+d1, waits for it,
    # runs m0 while B runs m1, then waits on m1 for the rest of B's pass there
    stall = (arrive_b + p0 - (first + d0 + d1)) + (p1 - d0)
    assert a.decode_stall_s == pytest.approx(stall)
    assert a.decode_stall_s < p0 + p1  # the whole-pass pause of the old model
    assert b.first_token_s == pytest.approx(arrive_b + p0 + p1)
    assert b.waiting_s == pytest.approx(0.0, abs=1e-12)


def test_a_relayed_train_of_messages_matches_message_by_message() -> None:
    """`relay`'s closed form against the recurrence it unrolls, links busy or idle."""
    from planner.inventory import Link, relay

    rng = np.random.default_rng(7)
    for _ in range(200):
        up = Link(float(rng.choice([10, 50, 100, 1000])), float(rng.uniform(0, 5)))
        down = Link(float(rng.choice([10, 50, 100, 1000])), float(rng.uniform(0, 5)))
        n = int(rng.integers(1, 12))
        nbytes = float(rng.uniform(1e3, 5e6))
        start, up_free, down_free = (float(x) for x in rng.uniform(0, 0.5, 3))
        a = nbytes / n * 8 / (up.bandwidth_mbps * 1e6)
        b = nbytes / n * 8 / (down.bandwidth_mbps * 1e6)
        u = max(start, up_free)
        d = down_free
        got = []
        for _ in range(n):
            u += a
            d = max(d, u + up.latency_ms * 1e-3) + b
            got.append(d + down.latency_ms * 1e-3)
        r = relay(up, down, nbytes, n, start=start, up_free=up_free, down_free=down_free)
        assert r.first == pytest.approx(got[0])
        assert r.last == pytest.approx(got[-1])
        assert r.up_free == pytest.approx(u) and r.down_free == pytest.approx(d)


def test_a_mixed_replica_decodes_in_micro_batches_that_travel_whole() -> None:
    """4 requests decoding on 2 stages circulate as 2 micro-batches of 2 (each stage runs
    at most the replica's micro-batch, and a batch travels on as one message, as the
    agents do): a token every decode_cycle of the planner's model, the figure the planner
    counts on for a DECODER replica. (Here one batch of four would be faster: the head
    makes m1 the slower stage, and two micro-batches wait on it in turn. The planner's
    model fixes min(stages, concurrency) micro-batches; it does not choose their number.)"""
    from planner.costs import CostModel, Layout, decode_cycle

    inv = Inventory.from_dict(
        {"devices": [hardware_device(n, 1000, tflops=0.5, bw=10.0) for n in ("m0", "m1")]}
    )
    model = tiny_model(n_layers=4)
    stages = [Stage("m0", 0, 2, True, False, 0.0, 0.0), Stage("m1", 2, 4, False, True, 0.0, 0.0)]
    plan = Plan(1, "manual", 4, [Replica(0, "mixed", 4, stages)])
    wl = Workload(8, 400, 0.01, length_dist="fixed")
    cm = CostModel(inv, model, wl)
    lay = Layout((0, 1), (0, 2, 4), False)
    cycle = decode_cycle(cm.stage_times(lay, decode=True, tokens=2), 4)
    whole = sum(cm.stage_times(lay, decode=True, tokens=4))  # one batch of all four
    assert abs(cycle - whole) > 0.1 * whole  # the two regimes differ here
    res = simulate(plan, inv, model, wl, [Request(i, 0.0, 8, 400) for i in range(4)])
    for r in res.records:
        tbt = (r.finish_s - r.first_token_s) / (r.output_tokens - 1)
        assert tbt == pytest.approx(cycle, rel=0.02)
