"""Teacher-forced top-1 agreement with transformers: contrib int8 and exact against llama.cpp.

The fast precision's bar is "at least as high as llama.cpp's own on the same prompts"; the
test suite's 6 fixture prompts (192 tokens) separate the two by a token or two, so this
script measures on more: each prompt's greedy continuation by transformers (fp32, on the
dequantized GGUF) is the reference; every engine is fed prompt + reference tokens in one
pass and scored on how often its top-1 prediction is the reference's next token.

    .venv/bin/pip install -e '.[reference]'   # torch==2.13.0 and transformers
    .venv/bin/python bench/agreement.py [--new-tokens 64] [--fast-dir DIR]

llama.cpp is scored when llama_cpp (llama-cpp-python) is importable.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2llm_edge.device.fast_runner import FastLayerStack, VariantEmbedder, VariantHead  # noqa: E402
from e2llm_edge.device.runner import configure_threads  # noqa: E402
from e2llm_edge.fog.textio import ChatTokenizer  # noqa: E402
from onnx_export.export import export_model  # noqa: E402
from onnx_export.manifest import Manifest  # noqa: E402
from onnx_export.source import fetch_default_gguf  # noqa: E402

CHAT = [
    "What is the capital of France?",
    "Write a haiku about small computers.",
    "What is 17 times 23? Think step by step.",
    "Explain what a hash table is.",
    "Give me three tips for sleeping better.",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Write a short poem about the sea.",
    "What are the planets of the solar system?",
    "How do I boil an egg?",
    "Summarize the plot of Romeo and Juliet.",
    "What is photosynthesis?",
    "List five fruits that are red.",
    "How does a bicycle stay upright?",
    "Write a limerick about a cat.",
    "What is the difference between weather and climate?",
]
RAW = [
    "Once upon a time, in a village by the sea,",
    "def fibonacci(n):\n    ",
    "The history of the Roman Empire",
    "import numpy as np\n\n# compute the mean of",
    "Dear hiring manager,\n\n",
    "The three laws of thermodynamics are",
    "In a large bowl, combine the flour and",
    "SELECT name, age FROM users WHERE",
]


def references(tok: ChatTokenizer, new: int) -> list[tuple[list[int], list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM

    gguf = fetch_default_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        torch_dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    out = []
    for text, raw in [(p, False) for p in CHAT] + [(p, True) for p in RAW]:
        ids = tok.encode_prompt(text, raw=raw)
        with torch.no_grad():
            seq = model.generate(
                torch.tensor([ids]),
                max_new_tokens=new,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        out.append((ids, seq[0, len(ids) :].tolist()))
    return out


def ours(fast_dir: Path, precision: str, cases: list[tuple[list[int], list[int]]]) -> float:
    m = Manifest.load(fast_dir)
    v = ("contrib", precision)
    emb, head = VariantEmbedder(m, v, verify=False), VariantHead(m, v, verify=False)
    stack = FastLayerStack(m, 0, int(m.config["n_layers"]), precision=precision, verify=False)
    hits = total = 0
    for prompt, new in cases:
        ids = prompt + new[:-1]
        cache = stack.new_cache(len(ids))
        h = stack.run(emb.run(np.asarray([ids], np.int64)), 0, cache)
        cache.release()
        pred = head.run(h[:, len(prompt) - 1 :])[0].argmax(-1)
        hits, total = hits + int((pred == np.asarray(new)).sum()), total + len(new)
    return hits / total


def llamacpp(cases: list[tuple[list[int], list[int]]]) -> float | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(str(fetch_default_gguf()), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    hits = total = 0
    for prompt, new in cases:
        llm.reset()
        llm.eval(prompt + new[:-1])
        pred = np.asarray(llm.scores[len(prompt) - 1 : len(prompt) + len(new) - 1]).argmax(-1)
        hits, total = hits + int((pred == np.asarray(new)).sum()), total + len(new)
    return hits / total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument(
        "--fast-dir",
        default="/tmp/e2llm_fast_bench",
        help="contrib model directory (exported here if missing)",
    )
    args = ap.parse_args()
    configure_threads(2)
    gguf, fast_dir = fetch_default_gguf(), Path(args.fast_dir)
    for precision in ("exact", "int8"):
        m = export_model(
            gguf, fast_dir, ranges="0-30", progress=False, graph_name="contrib", precision=precision
        )
    cases = references(ChatTokenizer(m), args.new_tokens)
    n = sum(len(c[1]) for c in cases)
    print(f"{len(cases)} prompts, {n} reference tokens (transformers fp32 greedy)")
    for precision in ("exact", "int8"):
        print(f"contrib {precision:5s}: top-1 agreement {ours(fast_dir, precision, cases):.4f}")
    theirs = llamacpp(cases)
    print(f"llama.cpp    : {'not installed' if theirs is None else f'{theirs:.4f}'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
