"""Plan serialisation round-trips exactly and validation names the bad field."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from planner import Plan, PlanError
from planner.plan import Replica, Stage


def sample_plan() -> Plan:
    return Plan(
        version=3,
        method="e2llm",
        n_layers=6,
        replicas=[
            Replica(
                0,
                "prefill",
                1,
                [
                    Stage("a", 0, 4, True, False, 0.1 + 0.2, 1e-3 / 3),
                    Stage("b", 4, 6, False, True, 0.25, 2.0 / 7),
                ],
            ),
            Replica(
                1,
                "decoder",
                8,
                [
                    Stage("c", 0, 2, False, False, 0.5, 0.01),
                    Stage("d", 2, 6, True, True, 1.0 / 3, 0.02),
                ],
            ),
        ],
        predicted={
            "bottleneck_s": 0.1 + 0.7,
            "idle_devices": ["e"],
            "phase": "decode",
            "inf": float("inf"),
        },
    )


def test_yaml_round_trip_is_exact() -> None:
    plan = sample_plan()
    again = Plan.from_yaml(plan.to_yaml())
    assert again == plan
    assert again.to_dict() == plan.to_dict()
    assert Plan.from_dict(plan.to_dict()) == plan
    assert again.replicas[1].embed_last
    assert again.replica(1).device_ids == ["c", "d"]
    assert [r.replica_id for r in again.by_role("prefill")] == [0]


def broken(path: list[Any], value: Any) -> dict[str, Any]:
    d = copy.deepcopy(sample_plan().to_dict())
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["version"], 0, "plan: version must be an integer >= 1, got 0"),
        (["replicas"], [], "plan: replicas must be a non-empty list"),
        (["replicas", 0, "role"], "both", "replica 0: role must be one of"),
        (["replicas", 1, "concurrency"], 0, "replica 1: concurrency must be an integer >= 1"),
        (
            ["replicas", 0, "stages", 1, "layer_start"],
            3,
            "replica 0: stage 1: layer_start must be 4 (contiguous",
        ),
        (
            ["replicas", 0, "stages", 1, "layer_end"],
            5,
            "replica 0: stage 1: layer_end must be n_layers=6",
        ),
        (["replicas", 0, "stages", 1, "layer_end"], 9, "replica 0: stage 1: layer_end must be in"),
        (["replicas", 0, "stages", 0, "head"], True, "replica 0: stage 0: head must be false"),
        (["replicas", 0, "stages", 1, "head"], False, "replica 0: stage 1: head must be true"),
        (
            ["replicas", 0, "stages", 1, "embed"],
            True,
            "replica 0: embed must be true on exactly one stage",
        ),
        (
            ["replicas", 1, "stages", 1, "embed"],
            False,
            "replica 1: embed must be true on exactly one stage",
        ),
        (["replicas", 1, "stages", 0, "device_id"], "a", "device_id 'a' already used by replica 0"),
        (["replicas", 1, "replica_id"], 0, "replica_id values must be unique"),
        (
            ["replicas", 0, "stages", 0, "predicted_prefill_s"],
            -1.0,
            "stage 0: predicted_prefill_s must be a number >= 0",
        ),
        (["replicas", 0, "stages", 0, "embed"], "yes", "stage 0: embed must be true or false"),
    ],
)
def test_validation_names_the_field(path: list[Any], value: Any, message: str) -> None:
    with pytest.raises(PlanError) as err:
        Plan.from_dict(broken(path, value))
    assert message in str(err.value)


def test_embed_must_be_first_or_last_stage() -> None:
    d = sample_plan().to_dict()
    d["n_layers"] = 6
    stages = d["replicas"][0]["stages"]
    stages[0]["embed"] = False
    stages.insert(
        1, {**stages[0], "device_id": "m", "layer_start": 4, "layer_end": 5, "embed": True}
    )
    stages[2]["layer_start"] = 5
    with pytest.raises(PlanError, match=r"got embed on stages \[1\]"):
        Plan.from_dict(d)


def test_bad_yaml() -> None:
    with pytest.raises(PlanError, match="not valid YAML"):
        Plan.from_yaml("replicas: [")


def _single(rid: int, role: str, devs: tuple[str, str]) -> Replica:
    return Replica(
        rid,
        role,
        1 if role == "prefill" else 4,  # type: ignore[arg-type]
        [
            Stage(devs[0], 0, 3, True, False, 0.1, 0.01),
            Stage(devs[1], 3, 6, False, True, 0.1, 0.01),
        ],
    )


def test_without_keeps_surviving_replicas_exactly() -> None:
    plan = Plan(
        4,
        "e2llm",
        6,
        [
            _single(0, "prefill", ("a", "b")),
            _single(1, "decoder", ("c", "d")),
            _single(2, "decoder", ("e", "f")),
        ],
        {"bottleneck_s": 0.5},
    )
    left = plan.without({"f", "zz"}, version=5)
    assert left is not None
    assert left.version == 5 and left.method == plan.method and left.n_layers == 6
    assert left.replicas == plan.replicas[:2]  # untouched: their devices reload nothing
    assert left.predicted == {"survivors_of": 4, "dropped_replicas": [2]}
    assert Plan.from_dict(left.to_dict()).replicas == left.replicas
    assert plan.without([], version=5) is not None


def test_without_is_none_when_a_role_is_gone() -> None:
    plan = Plan(
        1, "e2llm", 6, [_single(0, "prefill", ("a", "b")), _single(1, "decoder", ("c", "d"))]
    )
    assert plan.without({"c"}, version=2) is None  # nothing left decodes
    assert plan.without({"a"}, version=2) is None  # nothing left prefills
    mixed = Plan(
        1, "e2llm", 6, [_single(0, "mixed", ("a", "b")), _single(1, "prefill", ("c", "d"))]
    )
    left = mixed.without({"c"}, version=2)
    assert left is not None and [r.role for r in left.replicas] == ["mixed"]
    assert mixed.without({"a", "c"}, version=2) is None


def test_timing_round_trips_and_bad_fields_are_named() -> None:
    from planner import Workload, make_plan
    from planner.pools import pool

    inv, model, floor = pool("paper")
    plan = make_plan(inv, model, Workload(576, 588, 1.0), min_tokens_per_s=floor)
    assert all(r.timing is not None for r in plan.replicas)
    again = Plan.from_yaml(plan.to_yaml())
    assert again == plan
    t = again.replicas[0].timing
    assert t is not None and t.prefill_stages(576) == pytest.approx(
        [s.predicted_prefill_s for s in again.replicas[0].stages], rel=0.05
    )
    d = plan.to_dict()
    d["replicas"][0]["timing"]["kv_budget_tokens"] = -1
    with pytest.raises(
        PlanError, match=r"replica 0: timing: kv_budget_tokens must be a number > 0"
    ):
        Plan.from_dict(d)
    d = plan.to_dict()
    d["replicas"][1]["timing"]["prefill_stage_s"][0] = [0.1] * 9
    with pytest.raises(PlanError, match=r"replica 1: timing: prefill_stage_s\[0\] must list"):
        Plan.from_dict(d)
