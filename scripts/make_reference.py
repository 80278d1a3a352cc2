"""Produce the parity fixture: Hugging Face transformers on the same GGUF, dequantized to fp32.

Needs the `reference` extra (torch==2.13.0, transformers); the test suite does not: it reads
the fixture this script writes (tests/fixtures/reference_smollm2.json). For each prompt the
fixture holds our prompt ids, transformers' own tokenization of the same text (to check
the tokenizer too), the 32 greedy token ids and, per step, the top-32 logits.

    .venv/bin/pip install -e '.[reference]'
    .venv/bin/python scripts/make_reference.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2llm_edge.fog.textio import ChatTokenizer  # noqa: E402
from onnx_export.export import default_model_dir, export_model  # noqa: E402
from onnx_export.source import fetch_default_gguf  # noqa: E402

TOP = 32
NEW = 32


def prompts() -> list[dict[str, object]]:
    long_text = (ROOT / "tests" / "fixtures" / "long_prompt.txt").read_text()
    return [
        {"name": "chat_capital", "prompt": "What is the capital of France?", "raw": False},
        {"name": "chat_haiku", "prompt": "Write a haiku about small computers.", "raw": False},
        {"name": "chat_math", "prompt": "What is 17 times 23? Think step by step.", "raw": False},
        {"name": "raw_story", "prompt": "Once upon a time, in a village by the sea,", "raw": True},
        {"name": "raw_code", "prompt": "def fibonacci(n):\n    ", "raw": True},
        {"name": "chat_long", "prompt": long_text, "raw": False},
    ]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "reference_smollm2.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    gguf = fetch_default_gguf()
    manifest = export_model(None, default_model_dir(), progress=False)
    ours = ChatTokenizer(manifest)
    hf_tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        torch_dtype=torch.float32,
        attn_implementation="eager",
    )
    model.eval()
    cases = []
    for p in prompts():
        text = str(p["prompt"])
        ids = ours.encode_prompt(text, raw=bool(p["raw"]))
        rendered = (
            text
            if p["raw"]
            else hf_tok.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
        )
        hf_ids = hf_tok(rendered, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=None,
                pad_token_id=0,
            )
        new_ids = out.sequences[0, len(ids) :].tolist()
        steps = []
        for lg in out.logits:
            row = lg[0].float().numpy()
            top = np.argsort(-row, kind="stable")[:TOP]
            steps.append({"ids": top.tolist(), "logits": [float(row[i]) for i in top]})
        cases.append(
            {**p, "prompt_ids": ids, "hf_prompt_ids": hf_ids, "new_ids": new_ids, "steps": steps}
        )
        print(
            f"{p['name']}: {len(ids)} prompt tokens, tokenizer match {ids == hf_ids}, "
            f"{hf_tok.decode(new_ids)!r}"
        )
    fixture = {
        "generator": "scripts/make_reference.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gguf": gguf.name,
        "max_new_tokens": NEW,
        "top": TOP,
        "cases": cases,
    }
    Path(args.out).write_text(json.dumps(fixture, indent=None, separators=(",", ":")))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
