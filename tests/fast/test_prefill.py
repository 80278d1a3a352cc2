"""Chunked prefill: a prompt longer than PREFILL_CHUNK runs as chunks that each attend to
the cache so far, with the same hidden states, cache and next tokens as one pass."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import e2llm_edge.fast_runner as fast_runner

from .conftest import FastModel

pytestmark = [pytest.mark.model]


@pytest.mark.parametrize("precision", ["exact", "int8"])
def test_chunked_prefill_equals_one_pass(precision: str, exact: FastModel, int8: FastModel,
                                         reference: dict[str, Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = exact if precision == "exact" else int8
    ids = max((c["prompt_ids"] for c in reference["cases"]), key=len)[:150]
    x = model.embed.run(np.asarray([ids], np.int64))

    def prefill() -> tuple[np.ndarray, fast_runner.FastCache, list[int]]:
        cache = model.layers.new_cache(len(ids) + 8)
        h = model.layers.run(x, 0, cache)
        toks = [int(model.head.run(h[:, -1:])[0, -1].argmax())]
        for _ in range(3):  # decode on top: the cache is what one pass leaves
            h1 = model.layers.run(model.embed.run(np.asarray([[toks[-1]]], np.int64)),
                                  cache.length, cache)
            toks.append(int(model.head.run(h1)[0, -1].argmax()))
        return h, cache, toks

    monkeypatch.setattr(fast_runner, "PREFILL_CHUNK", 10_000)
    whole, c_whole, t_whole = prefill()
    monkeypatch.setattr(fast_runner, "PREFILL_CHUNK", 64)  # 150 = 64 + 64 + 22
    chunked, c_chunk, t_chunk = prefill()
    assert chunked.shape == whole.shape == (1, 150, whole.shape[-1])
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-4 * float(np.abs(whole).max()))
    assert c_chunk.length == c_whole.length == 150 + 3
    for layer in (c_whole.start, c_whole.end - 1):
        for a, b in zip(c_whole.kv(layer), c_chunk.kv(layer), strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * float(np.abs(a).max()))
    assert t_chunk == t_whole
    c_whole.release()
    c_chunk.release()
