"""Re-planning on drift in the fog core: the live mix is measured, a check is asked for
at the configured pace (one at a time, with enough observations), and its answer is
taken: a flip installs the same layouts with other roles, a stale or "keep" answer
changes nothing. The decision itself (`planner.drift`) is tested in tests/planner; the
whole loop on a real cluster in tests/e2e/test_drift_flip.py."""

from __future__ import annotations

import dataclasses

from e2llm_edge.fog import core as c
from planner.drift import DriftConfig, DriftPlanner
from planner.plan import Plan
from planner.sim.paper import paper_model
from planner.switch import Flip, Keep, same_layout
from tests.core.fogharness import FogDriver, two_by_two

CONFIG = DriftConfig(window_s=60.0, tick_s=2.0, min_arrivals=6)


def driver() -> FogDriver:
    planner = DriftPlanner(None, paper_model(), designed_for=c.FogConfig().workload, config=CONFIG)
    d = FogDriver(two_by_two(), drift=planner)
    d.boot()
    return d


def checks(d: FogDriver) -> list[c.CheckDrift]:
    return [x for x in d.log if isinstance(x, c.CheckDrift)]


def serve(d: FogDriver, rid: str, prompt: str, new: int) -> None:
    """One request through: prompt in, `new` tokens out."""
    d.submit(rid, prompt, max_new_tokens=new)
    for _ in range(40):
        if d.starts(rid):
            break
        d.tick(0.1)
    d.token(rid, 5, dev="p1")
    for i in range(new - 1):
        d.token(rid, 6, finished=i == new - 2)


def swapped(plan: Plan) -> Plan:
    """The same layouts, roles swapped (what a flip looks like)."""
    flip = {"prefill": "decoder", "decoder": "prefill"}
    return dataclasses.replace(
        plan,
        replicas=[
            dataclasses.replace(r, role=flip[r.role], concurrency=1 if r.role == "decoder" else 2)
            for r in plan.replicas
        ],
    )


def test_a_check_is_asked_for_with_the_live_mix_once_enough_is_seen() -> None:
    d = driver()
    for i in range(5):
        serve(d, f"r{i}", "x" * 40, 3)
    d.tick(CONFIG.tick_s)
    assert not checks(d), "5 arrivals: fewer than min_arrivals"
    serve(d, "r5", "x" * 40, 3)
    d.tick(CONFIG.tick_s)
    (ask,) = checks(d)
    assert ask.version == d.core.version and ask.plan == d.core.plan
    assert ask.workload.mean_prompt_tokens == 40 and ask.workload.mean_output_tokens == 3
    assert {x.id for x in ask.inventory.devices} == {"p0", "p1", "d0", "d1"}
    d.tick(CONFIG.tick_s)
    assert len(checks(d)) == 1, "one check at a time"
    d.feed(c.DriftChecked(ask.version, Keep("not worth it")))
    assert len(d.published) == 1
    d.tick(CONFIG.tick_s)
    assert len(checks(d)) == 2, "asked again at the configured pace"


def test_a_flip_installs_the_same_layouts_with_other_roles() -> None:
    d = driver()
    for i in range(6):
        serve(d, f"r{i}", "y" * 30, 4)
    d.tick(CONFIG.tick_s)
    (ask,) = checks(d)
    old = d.core.plan
    assert old is not None
    d.submit("late", "z" * 20, max_new_tokens=3)
    d.feed(c.DriftChecked(ask.version, Flip(swapped(old), "prompts got longer")))
    for _ in range(80):  # drains (bounded), then publishes
        if len(d.published) > 1:
            break
        d.tick(0.25)
    new = d.published[-1]
    assert new.version == old.version + 1 and same_layout(new, old)
    assert [r.role for r in new.replicas] == ["decoder", "prefill"]
    assert any("flip roles/concurrency, no reload" in x.text for x in d.log if isinstance(x, c.Log))
    d.ready(new)
    assert d.core.phase == c.PlanPhase.SERVING
    d.tick(0.25)
    (start,) = [s for s in d.starts("late") if s.plan_version == new.version]
    assert start.decoder_replica == 0, "the flipped replica decodes now"


def test_an_answer_for_an_older_plan_is_ignored() -> None:
    d = driver()
    for i in range(6):
        serve(d, f"r{i}", "w" * 30, 4)
    d.tick(CONFIG.tick_s)
    (ask,) = checks(d)
    d.feed(c.DriftChecked(ask.version + 7, Flip(swapped(two_by_two()), "x")))
    assert len(d.published) == 1 and d.core.drift_checking == ask.version
