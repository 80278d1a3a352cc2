"""Batched decode: B requests advance in one session run and give the tokens of B single
runs, also when requests leave mid-way (their slots are reused, the rest compacted) and when
a cache arrives from another stage through kv()/load()."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from e2llm_edge.device.fast_runner import FastCache

from .conftest import FastModel

pytestmark = [pytest.mark.model, pytest.mark.slow]

STEPS = 12


def prompts(reference: dict[str, Any]) -> list[list[int]]:
    """Eight prompts of different lengths (7 to 670 tokens)."""
    base = [c["prompt_ids"] for c in reference["cases"]]
    return [*base, base[0][:20], base[3] + base[4]]


def prefill(model: FastModel, ids: list[int]) -> tuple[FastCache, int]:
    cache = model.layers.new_cache(len(ids) + STEPS + 1)
    h = model.layers.run(model.embed.run(np.asarray([ids], np.int64)), 0, cache)
    return cache, int(model.head.run(h[:, -1:])[0, -1].argmax())


def test_run_batch_equals_single_runs(exact: FastModel, reference: dict[str, Any]) -> None:
    ps = prompts(reference)
    assert len({len(p) for p in ps}) == 8
    single = []
    for p in ps:
        toks, _ = exact.greedy(p, STEPS)
        single.append(toks)

    started = [prefill(exact, p) for p in ps]
    caches = [c for c, _ in started]
    assert all(c.slot is not None for c in caches)
    tokens = [[t] for _, t in started]
    live = list(range(8))
    for step in range(1, STEPS):
        if step == 4:  # two requests finish: the remaining six are no longer adjacent slots
            for j in (2, 5):
                caches[j].release()
            live = [j for j in live if j not in (2, 5)]
        x = exact.embed.run(np.asarray([[tokens[j][-1]] for j in live], np.int64))
        h = exact.layers.run_batch(x, [caches[j] for j in live])
        nxt = exact.head.run(h)[:, -1].argmax(-1)
        for j, t in zip(live, nxt, strict=True):
            tokens[j].append(int(t))
    for j in range(8):
        want = single[j] if j in live else single[j][:4]
        assert tokens[j] == want, f"request {j} ({len(ps[j])} prompt tokens)"
    for j in live:
        caches[j].release()


def test_cache_moves_between_stages(exact: FastModel, reference: dict[str, Any]) -> None:
    """Prefill into a standalone cache, ship it layer by layer in chunks, decode from a slot."""
    case = reference["cases"][2]
    prompt = case["prompt_ids"]
    src = exact.layers.new_cache(len(prompt) + 1)
    dst = exact.layers.new_cache(len(prompt) + STEPS)
    h = exact.layers.run(exact.embed.run(np.asarray([prompt], np.int64)), 0, src)
    tok = int(exact.head.run(h[:, -1:])[0, -1].argmax())
    for layer in range(exact.layers.start, exact.layers.end):
        start, k, v = src.kv(layer)
        assert (start, k.shape[2]) == (0, len(prompt))
        for a in range(0, len(prompt), 16):
            dst.load(layer, k[:, :, a : a + 16], v[:, :, a : a + 16], a)
    src.release()
    assert dst.length == len(prompt)
    out = [tok]
    for _ in range(STEPS - 1):
        h = exact.layers.run(exact.embed.run(np.asarray([[out[-1]]], np.int64)), dst.length, dst)
        out.append(int(exact.head.run(h)[0, -1].argmax()))
    dst.release()
    assert out == case["new_ids"][:STEPS]


def test_dropped_cache_frees_its_slot(exact: FastModel) -> None:
    """The runtime may just drop a finished request's cache: its pool slot is reused."""
    pool = exact.layers.pool
    free = [s for s in range(pool.slots) if pool.owner(s) is None]
    c = exact.layers.new_cache(16)
    assert c.slot == free[0]
    del c
    again = exact.layers.new_cache(16)
    assert again.slot == free[0]
    again.release()
    assert pool.owner(free[0]) is None
