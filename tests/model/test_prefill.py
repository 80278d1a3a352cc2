"""Chunked prefill: a prompt longer than PREFILL_CHUNK runs as chunks that each attend to
the cache so far, with the same hidden states, cache and next tokens as one pass, on both
graphs (the parity tests' 670-token prompt also goes through it, against transformers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import e2llm_edge.device.runner as runner
from e2llm_edge.device.local import LocalModel

pytestmark = pytest.mark.model


@pytest.mark.parametrize(
    "variant", [("standard", "fp32"), ("contrib", "exact")], ids=["standard", "contrib-exact"]
)
def test_chunked_prefill_equals_one_pass(
    variant: tuple[str, str],
    default_model: Path,
    reference: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = LocalModel(default_model, verify=False, variant=variant)
    ids = max((c["prompt_ids"] for c in reference["cases"]), key=len)[:150]
    x = model.embed.run(np.asarray([ids], np.int64))

    def prefill() -> tuple[np.ndarray, Any, list[int]]:
        cache = model.layers.new_cache(len(ids) + 8)
        h = model.layers.run(x, 0, cache)
        toks = [int(model.head.run(h[:, -1:])[0, -1].argmax())]
        for _ in range(3):  # decode on top: the cache is what one pass leaves
            h1 = model.layers.run(
                model.embed.run(np.asarray([[toks[-1]]], np.int64)), cache.length, cache
            )
            toks.append(int(model.head.run(h1)[0, -1].argmax()))
        return h, cache, toks

    monkeypatch.setattr(runner, "PREFILL_CHUNK", 10_000)
    whole, c_whole, t_whole = prefill()
    monkeypatch.setattr(runner, "PREFILL_CHUNK", 64)  # 150 = 64 + 64 + 22
    chunked, c_chunk, t_chunk = prefill()
    assert chunked.shape == whole.shape == (1, 150, whole.shape[-1])
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-4 * float(np.abs(whole).max()))
    assert c_chunk.length == c_whole.length == 150 + 3
    first, last = model.layers.start, model.layers.end - 1
    for layer in (first, last):
        for a, b in zip(c_whole.kv(layer), c_chunk.kv(layer), strict=True):
            np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * float(np.abs(a).max()))
    assert t_chunk == t_whole
