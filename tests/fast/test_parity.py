"""Contrib graph vs the transformers fp32 reference on the dequantized GGUF.

exact: greedy tokens identical for every case (32 tokens), logits within fp32 rounding.
int8: teacher-forced top-1 agreement, printed beside llama.cpp's own on the same prompts
and GGUF when llama-cpp-python is installed. Both quantize activations per 32-block to int8;
on these 192 tokens they differ by a token (measured: 0.974 vs 0.979), on the 1536 of
`bench/agreement.py` by one the other way (0.9746 vs 0.9740): a tie within noise. So the
test holds a floor that the unscreened head (0.958 here) fails, not the ordering.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from e2llm_edge.device.fast_runner import choose_variant
from e2llm_edge.device.local import LocalModel
from onnx_export.manifest import Manifest
from onnx_export.source import fetch_default_gguf

from .conftest import FastModel

pytestmark = [pytest.mark.model, pytest.mark.slow]
INT8_FLOOR = 0.96


def test_exact_greedy_tokens_identical(exact: FastModel, reference: dict[str, Any]) -> None:
    """Tokens identical; of the reference's top-32 logits per step, those the screened head
    rescored (within one bound of the top) equal the reference to fp32 rounding, the rest
    lie within the bound it reports."""
    worst = worst_screened = 0.0
    rescored = total = 0
    for case in reference["cases"]:
        n = len(case["new_ids"])
        tokens, logits = exact.greedy(case["prompt_ids"], n)
        assert tokens == case["new_ids"], case["name"]
        for (lg, bound), step in zip(logits, case["steps"], strict=True):
            ours, ref = lg[step["ids"]], np.asarray(step["logits"])
            assert np.isfinite(bound), f"{case['name']}: a model row left uncertified"
            near = ours >= lg.max() - bound
            worst = max(worst, float(np.abs(ours - ref)[near].max()))
            worst_screened = max(worst_screened, float((np.abs(ours - ref) - bound).max()))
            rescored, total = rescored + int(near.sum()), total + len(ours)
    print(
        f"\ncontrib exact: max |logit diff| on rescored reference top-32 logits "
        f"({rescored} of {total}): {worst:.2e}; none exceeds its bound by more than "
        f"{worst_screened:.2e}"
    )
    assert worst < 1e-2
    assert worst_screened < 1e-2


def teacher_forced(model: FastModel, case: dict[str, Any]) -> np.ndarray:
    """Top-1 predictions for the reference's 32 steps, fed the reference tokens."""
    prompt, new = case["prompt_ids"], case["new_ids"]
    ids = prompt + new[:-1]
    cache = model.layers.new_cache(len(ids))
    h = model.layers.run(model.embed.run(np.asarray([ids], np.int64)), 0, cache)
    cache.release()
    return model.logits(h[:, len(prompt) - 1 :])[0].argmax(-1)


def llamacpp_teacher_forced(cases: list[dict[str, Any]]) -> float | None:
    """llama.cpp's own top-1 agreement on the same GGUF and tokens, if it is installed."""
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(str(fetch_default_gguf()), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    hits = total = 0
    for case in cases:
        prompt, new = case["prompt_ids"], case["new_ids"]
        llm.reset()
        llm.eval(prompt + new[:-1])
        pred = np.asarray(llm.scores[len(prompt) - 1 : len(prompt) + len(new) - 1]).argmax(-1)
        hits += int((pred == np.asarray(new)).sum())
        total += len(new)
    return hits / total


def test_int8_teacher_forced_agreement(int8: FastModel, reference: dict[str, Any]) -> None:
    cases = reference["cases"]
    hits = sum(int((teacher_forced(int8, c) == np.asarray(c["new_ids"])).sum()) for c in cases)
    ours = hits / sum(len(c["new_ids"]) for c in cases)
    theirs = llamacpp_teacher_forced(cases)
    print(
        f"\ncontrib int8 teacher-forced top-1 agreement: {ours:.3f}; llama.cpp: "
        f"{'not installed' if theirs is None else f'{theirs:.3f}'}"
    )
    assert ours >= INT8_FLOOR


def test_local_model_chooses_contrib_exact(fast_dir: Path, reference: dict[str, Any]) -> None:
    m = Manifest.load(fast_dir)
    assert choose_variant(m) == ("contrib", "exact")
    model = LocalModel(fast_dir, verify=False)
    assert model.variant == ("contrib", "exact")
    case = reference["cases"][0]
    got = list(model.generate(case["prompt_ids"], 8, stop_at_eos=False))
    assert got == case["new_ids"][:8]
