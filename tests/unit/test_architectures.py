"""Every supported architecture, exported from a GGUF (several tensor types) and from fp16 and
bf16 Hugging Face folders, in both graph families, against transformers on the same weights:
greedy tokens identical, logits within fp32 rounding. Tiny random models: seconds each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import arch_models

from e2llm_edge.device.fast_runner import contrib_supported
from e2llm_edge.device.local import LocalModel
from onnx_export.export import export_model
from onnx_export.manifest import Manifest, kv_windows

PROMPT = [5, 17, 42, 99, 7, 200, 31, 64, 150, 3, 88, 12]
NEW = 6
# (architecture, format): GGUF tensor types the fast graph maps exactly, and HF dtypes.
CASES = [
    ("llama", "gguf-F32"),
    ("llama", "gguf-Q4_1"),
    ("llama", "hf-float16"),
    ("llama", "hf-bfloat16"),
    ("llama3", "gguf-Q8_0"),
    ("llama3", "hf-bfloat16"),
    ("mistral", "hf-bfloat16"),
    ("qwen2", "gguf-Q4_0"),
    ("qwen2", "gguf-F16"),
    ("qwen2", "hf-bfloat16"),
    ("qwen3", "gguf-Q8_0"),
    ("qwen3", "hf-float16"),
    ("phi3", "gguf-Q4_1"),
    ("phi3", "hf-bfloat16"),
    ("gemma2", "gguf-Q8_0"),
    ("gemma2", "hf-bfloat16"),
    ("gemma3", "gguf-Q4_0"),
    ("gemma3", "hf-float16"),
]
VARIANTS = [("standard", "fp32"), ("contrib", "exact")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{a}-{f}" for a, f in CASES])
def case(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Manifest, list[int], list[np.ndarray]]:
    """The exported model and transformers' greedy tokens and logits on what it was made from."""
    name, fmt = request.param
    tmp = tmp_path_factory.mktemp(f"{name}-{fmt}")
    model = arch_models.reference_model(name)
    kind, what = fmt.split("-", 1)
    if kind == "gguf":
        src: Path = tmp / "model.gguf"
        arch_models.write_gguf(model, name, src, what)
        ref_model: Any = model
    else:
        src = arch_models.write_hf_dir(model, tmp / "hf", what)
        ref_model = arch_models.load_hf_reference(src)
    tokens, logits = arch_models.greedy_reference(ref_model, PROMPT, NEW)
    manifest = export_model(src, tmp / "out", ranges="0-3", progress=False)
    return manifest, tokens, logits


@pytest.mark.parametrize("variant", VARIANTS, ids=["standard", "contrib"])
def test_greedy_tokens_and_logits_match_transformers(
    case: tuple[Manifest, list[int], list[np.ndarray]], variant: tuple[str, str]
) -> None:
    manifest, want, ref_logits = case
    if variant[0] == "contrib" and not contrib_supported(windows=bool(kv_windows(manifest.config))):
        pytest.skip("this onnxruntime lacks the com.microsoft contrib operators")
    for prefer_ranges in (True, False):
        model = LocalModel(manifest.directory, variant=variant, prefer_ranges=prefer_ranges)
        steps: list[tuple[np.ndarray, float]] = []
        got = list(model.generate(PROMPT, NEW, stop_at_eos=False, logits_out=steps))
        assert got == want
        for (row, bound), ref in zip(steps, ref_logits, strict=True):
            # the screened Q8_0 head is exact near the top, within its bound elsewhere
            assert np.isfinite(bound)
            err = np.abs(row - ref)
            pre = row
            if cap := manifest.config.get("final_softcap"):  # the bound is in pre-cap units
                pre = cap * np.arctanh(np.clip(row / cap, -1 + 1e-7, 1 - 1e-7))
            near = pre >= pre.max() - bound
            assert err[near].max() < 2e-4, f"{err[near].max():.2e}"
            assert (err - bound).max() < 2e-4
