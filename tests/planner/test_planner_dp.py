"""The vectorised DP is exact: it matches brute force over every split and embedding spot."""

from __future__ import annotations

import itertools
import random

import pytest
from planner_factories import (
    hardware_device,
    profile_device,
    random_inventory,
    tiny_model,
    workload,
)

from planner.costs import CostModel, Layout, micro_batch
from planner.dp import CONCURRENCY_STEPS, SplitSolver
from planner.inventory import Inventory, relay


def compositions(total: int, parts: int) -> list[tuple[int, ...]]:
    """Boundaries 0 < b1 < ... < total with `parts` non-empty ranges."""
    return [(0, *cuts, total) for cuts in itertools.combinations(range(1, total), parts - 1)]


def brute_force(
    cm: CostModel, devices: tuple[int, ...], *, decode: bool, concurrency: int
) -> tuple[float, float] | None:
    """(bottleneck, sum) of the solver's objective, by enumerating every feasible layout.

    Memory must hold what the workload reaches: a prefill replica a mean prompt per stage
    and at least the longest prompt (workspace of the longest prompt), a decoder
    `concurrency` mean contexts and at least the longest context.
    Per embedding placement: least bottleneck, then least sum among those. Between the
    placements: prefill by (bottleneck, sum), decode by (cycle, bottleneck).
    """
    k = len(devices)
    per_variant = []
    for embed_last in (False,) if k == 1 else (False, True):
        best: tuple[float, float] | None = None
        for bounds in compositions(cm.n_layers, k):
            lay = Layout(devices, bounds, embed_last)
            if decode:
                b = micro_batch(concurrency, k)
                kv = max(concurrency * cm.workload.mean_context_tokens, cm.peak_context_tokens)
                mem = cm.stage_memory(lay, kv_tokens=kv, pass_tokens=b)
                times = cm.stage_times(lay, decode=True, tokens=b)
            else:
                mem = cm.stage_memory(
                    lay,
                    kv_tokens=max(k * cm.prompt_tokens, cm.peak_prompt_tokens),
                    pass_tokens=cm.peak_prompt_tokens,
                )
                times = cm.stage_times(lay, decode=False, tokens=cm.prompt_tokens, kv_out=True)
            if any(m > cm.capacity[d] for m, d in zip(mem, devices, strict=True)):
                continue
            v, s = max(times), sum(times)
            if (
                best is None
                or v < best[0] * (1 - 1e-12)
                or (v <= best[0] * (1 + 1e-12) and s < best[1])
            ):
                best = (v, s)
        if best is not None:
            per_variant.append(best)
    if not per_variant:
        return None
    m = min(k, concurrency)
    if decode:
        return min(per_variant, key=lambda vs: (max(vs[1], m * vs[0]), vs[0]))
    return min(per_variant)


@pytest.mark.parametrize("case", range(30))
def test_dp_equals_brute_force(case: int) -> None:
    rng = random.Random(case)
    n_layers = rng.randint(2, 7)
    model = tiny_model(
        n_layers=n_layers,
        layer_mb=rng.uniform(10, 60),
        embed_mb=rng.uniform(5, 50),
        head_mb=rng.uniform(5, 50),
        tied=rng.random() < 0.5,
    )
    inv = random_inventory(rng, rng.randint(1, 4), mem_range=(40, 250))
    wl = workload(prompt=rng.choice([20, 300, 1500]), output=rng.choice([10, 200]))
    cm = CostModel(inv, model, wl, max_concurrency=6)
    solver = SplitSolver(cm)
    devices = tuple(rng.sample(range(len(inv)), len(inv)))
    got = solver.prefill(devices)
    want = brute_force(cm, devices, decode=False, concurrency=1)
    if want is None:
        assert got is None
    else:
        assert got is not None
        assert got.bottleneck_s == pytest.approx(want[0], rel=1e-9)
        assert got.total_s == pytest.approx(want[1], rel=1e-9)
        # the reported stage times are those of the plain per-layer cost model, a
        # PREFILL replica's (its stages also send their KV on)
        assert list(got.stage_s) == pytest.approx(
            cm.stage_times(got.layout, decode=False, tokens=cm.prompt_tokens, kv_out=True),
            rel=1e-9,
        )
    for c, split in enumerate(solver.decode(devices), start=1):
        if c not in CONCURRENCY_STEPS:
            assert split is None  # the DP solves a ladder of concurrencies only
            continue
        want = brute_force(cm, devices, decode=True, concurrency=c)
        if want is None:
            assert split is None
            continue
        assert split is not None
        assert split.bottleneck_s == pytest.approx(want[0], rel=1e-9)
        assert split.cycle_s(c) == pytest.approx(
            max(want[1], min(len(devices), c) * want[0]), rel=1e-9
        )
        # the backtracked layout's stage times are those of the plain cost model
        b = micro_batch(c, len(devices))
        assert list(split.stage_s) == pytest.approx(
            cm.stage_times(split.layout, decode=True, tokens=b), rel=1e-9
        )


def test_tied_embedding_moves_next_to_the_head_when_memory_is_tight() -> None:
    # Two 100 MB devices, tied 60 MB embedding/head, 4 layers of 30 MB: embedding on
    # stage 0 costs 60 MB twice; next to the head it is paid once, which is the only fit.
    model = tiny_model(n_layers=4, layer_mb=30, embed_mb=60, head_mb=60, tied=True)
    inv = Inventory.from_dict(
        {"devices": [hardware_device("a", 100, 1, 10), hardware_device("b", 130, 1, 10)]}
    )
    cm = CostModel(inv, model, workload(prompt=16, output=8), max_concurrency=2)
    split = SplitSolver(cm).prefill((0, 1))
    assert split is not None
    assert split.layout.embed_last
    assert split.layout.bounds == (0, 3, 4)


def test_a_stage_costs_its_layers_and_the_agents_own_work() -> None:
    """`pass_s` once per pass, `io_s_per_mb` for the messages in and out and, on a PREFILL
    replica, for the KV of its layers sent on; a decoder's receipt of the KV is part of
    the hand-off."""
    model = tiny_model(n_layers=4, layer_mb=10, embed_mb=5, head_mb=5, tied=False)
    plain = profile_device("a", 500, 1.0)
    doc = {"devices": [plain, {**profile_device("b", 500, 1.0), "id": "b"}]}
    inv = Inventory.from_dict(doc)
    bare = {
        "devices": [
            {**d, "profile": {**d["profile"], "pass_s": 0.0, "io_s_per_mb": 0.0}}
            for d in doc["devices"]
        ]
    }
    wl = workload(prompt=100, output=10)
    cm, cm0 = CostModel(inv, model, wl), CostModel(Inventory.from_dict(bare), model, wl)
    lay = Layout((0, 1), (0, 1, 4), False)
    act = model.activation_bytes_per_token
    kv = model.kv_bytes_per_token_per_layer
    per_mb = plain["profile"]["io_s_per_mb"] * 1e-6
    pass_s = plain["profile"]["pass_s"]
    pre, pre0 = (c.stage_times(lay, decode=False, tokens=100, kv_out=True) for c in (cm, cm0))
    # stage 0 sends 100 activations and its 1 layer's KV; stage 1 takes them in and its 3
    # layers' KV out (the prompt itself comes from the client)
    assert pre[0] - pre0[0] == pytest.approx(pass_s + per_mb * 100 * (act + kv))
    assert pre[1] - pre0[1] == pytest.approx(pass_s + per_mb * 100 * (act + 3 * kv))
    dec, dec0 = (c.stage_times(lay, decode=True, tokens=2) for c in (cm, cm0))
    # two rows: the last stage sends their token ids back to the first
    assert dec[0] - dec0[0] == pytest.approx(pass_s + per_mb * 2 * (4 + act))
    assert dec[1] - dec0[1] == pytest.approx(pass_s + per_mb * 2 * (act + 4))
    # the busiest receiver (b, 3 layers) takes each layer's message in as it arrives: its
    # work starts with the first one and outlasts the network's by the rest
    train = relay(inv.devices[1].link, inv.devices[1].link, 100 * 3 * kv, 3)
    moved = cm.kv_transfer_s(lay, lay, 100) - cm0.kv_transfer_s(lay, lay, 100)
    assert moved == pytest.approx(train.first + per_mb * 100 * 3 * kv - train.last)
