"""The local path against Hugging Face transformers on the same GGUF (fixture from
scripts/make_reference.py): identical greedy tokens, logits within 1e-3."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from e2llm_edge.device.fast_runner import contrib_supported
from e2llm_edge.device.local import LocalModel
from e2llm_edge.fog.textio import ChatTokenizer

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def model(default_model: Path) -> LocalModel:
    return LocalModel(default_model)


def test_tokenizer_matches_transformers(model: LocalModel, reference: dict[str, Any]) -> None:
    tok = ChatTokenizer(model.manifest)
    for case in reference["cases"]:
        ids = tok.encode_prompt(case["prompt"], raw=case["raw"])
        assert ids == case["prompt_ids"] == case["hf_prompt_ids"], case["name"]


@pytest.mark.parametrize(
    "variant", [("standard", "fp32"), ("contrib", "exact")], ids=["standard", "contrib-exact"]
)
@pytest.mark.parametrize("prefer_ranges", [True, False], ids=["range-segments", "per-layer"])
def test_greedy_tokens_and_logits_match_transformers(
    default_model: Path, reference: dict[str, Any], prefer_ranges: bool, variant: tuple[str, str]
) -> None:
    """Tokens identical; the reference's top-32 logits within 1e-3 where ours are exact
    (all of the standard graph's; the screened head's within one bound of the top), the
    rest within their bound."""
    if variant[0] == "contrib" and not contrib_supported():
        pytest.skip("this onnxruntime lacks the com.microsoft contrib operators")
    model = LocalModel(default_model, prefer_ranges=prefer_ranges, variant=variant)
    assert any(len(c["prompt_ids"]) > 500 for c in reference["cases"])
    worst = worst_screened = 0.0
    for case in reference["cases"]:
        logits: list[tuple[np.ndarray, float]] = []
        got = list(
            model.generate(
                case["prompt_ids"],
                reference["max_new_tokens"],
                stop_at_eos=False,
                logits_out=logits,
            )
        )
        assert got == case["new_ids"], case["name"]
        for (row, bound), step in zip(logits, case["steps"], strict=True):
            assert np.isfinite(bound), f"{case['name']}: a model row left uncertified"
            ours, diff = row[step["ids"]], np.abs(row[step["ids"]] - np.array(step["logits"]))
            exact = ours >= row.max() - bound
            worst = max(worst, float(diff[exact].max()))
            worst_screened = max(worst_screened, float((diff - bound).max()))
    print(f"max |logit difference| vs transformers where exact: {worst:.2e}")
    assert worst < 1e-3
    assert worst_screened < 1e-3


def test_cli_json_output(default_model: Path, reference: dict[str, Any]) -> None:
    case = next(c for c in reference["cases"] if c["name"] == "raw_story")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "e2llm_edge.cli",
            "generate",
            case["prompt"],
            "--raw",
            "--max-new-tokens",
            "12",
            "--json",
            "--model",
            str(default_model),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    doc = json.loads(out.stdout)
    assert doc["prompt_ids"] == case["prompt_ids"]
    assert doc["new_ids"] == case["new_ids"][:12]
    assert doc["text"].startswith(" there was")


def test_sampling_is_seeded_and_bounded(model: LocalModel, reference: dict[str, Any]) -> None:
    from e2llm_edge.device.sampling import Sampling, SamplingError

    ids = reference["cases"][0]["prompt_ids"]
    s = Sampling(temperature=0.8, top_p=0.9, seed=7)
    a = list(model.generate(ids, 10, s))
    assert a == list(model.generate(ids, 10, s))
    assert a != list(model.generate(ids, 10, Sampling(temperature=0.8, top_p=0.9, seed=8)))
    for bad in ({"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"seed": -2}):
        with pytest.raises(SamplingError):
            Sampling(**bad)  # type: ignore[arg-type]


def test_tokenizer_matches_llama_cpp(default_model: Path) -> None:
    """The real SmolLM2 vocabulary (pre-tokenizer smollm) on the tokenizer corpus, as
    llama.cpp tokenizes the same GGUF."""
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python not installed")
    import tokenizer_vocab as tv
    from llama_cpp import Llama

    from onnx_export.manifest import Manifest
    from onnx_export.source import fetch_default_gguf

    tok = ChatTokenizer(Manifest.load(default_model))
    llm = Llama(str(fetch_default_gguf()), vocab_only=True, verbose=False)
    for text in tv.CORPUS:
        ids = tok.tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == llm.tokenize(text.encode(), add_bos=False, special=True), text
