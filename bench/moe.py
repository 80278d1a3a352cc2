"""gpt-oss on this machine: prefill and decode speed and resident memory of the fast graph.

    .venv/bin/python bench/moe.py [--layers 2] [--hidden 2880] [--experts 32] [--used 4]
        [--vocab 8192] [--prompt 128] [--steps 16] [--json out.json] [--workdir DIR]

Writes a gpt-oss-shaped GGUF with random weights as llama.cpp's converter lays it out
(experts MXFP4 as 3-D tensors, attention and embeddings BF16, norms, router, biases and
sinks F32; sliding window 128 on even layers, YaRN), exports the contrib graph (exact
precision: MXFP4 experts kept as stored, only the chosen experts decoded) and, in a child
process of its own, loads the whole model and measures: resident memory after load vs the
GGUF's bytes, prefill tokens/s on a `--prompt`-token prompt, decode tokens/s over
`--steps` steps. The defaults are gpt-oss-20b's layer (hidden 2880, 32 experts of 2880, 4
per token, 64 query and 8 KV heads of 64) with fewer layers and a smaller vocabulary, so
it fits here; `--hidden 64 --experts 8 --used 2 --vocab 300` is the tests' tiny shape.
llama.cpp (llama-cpp-python) is compared when it is importable; it is not installed here.
No real gpt-oss weights can be fetched on this machine (no model hub): random weights
measure speed and memory, not answers.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_gguf(path: Path, a: argparse.Namespace, seed: int = 0) -> None:
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(seed)
    h, inter, e, nh, nkv, d = a.hidden, a.hidden, a.experts, 64, 8, 64
    if h < 1024:  # the tiny shape
        inter, nh, nkv, d = 32, 4, 2, 16
    wr = gguf.GGUFWriter(str(path), "gpt-oss")
    wr.add_name(f"gpt-oss-shaped-{a.layers}x{h}")
    wr.add_block_count(a.layers)
    wr.add_context_length(4096)
    wr.add_embedding_length(h)
    wr.add_feed_forward_length(inter)
    wr.add_expert_feed_forward_length(inter)
    wr.add_expert_count(e)
    wr.add_expert_used_count(a.used)
    wr.add_head_count(nh)
    wr.add_head_count_kv(nkv)
    wr.add_key_length(d)
    wr.add_value_length(d)
    wr.add_layer_norm_rms_eps(1e-5)
    wr.add_sliding_window(128)
    wr.add_vocab_size(a.vocab)
    wr.add_rope_freq_base(150000.0)
    wr.add_rope_dimension_count(d)
    wr.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    wr.add_rope_scaling_factor(32.0)
    wr.add_rope_scaling_orig_ctx_len(4096)
    from tokenizers import pre_tokenizers

    # byte symbols, one merge, control tokens up to the vocabulary size
    tokens = ["<|endoftext|>", "<|return|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), "ab"]
    types = [3, 3] + [1] * (len(tokens) - 2)
    tokens += [f"<|reserved_{i}|>" for i in range(a.vocab - len(tokens))]
    types += [3] * (a.vocab - len(types))
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("gpt-4o")
    wr.add_token_list(tokens[: a.vocab])
    wr.add_token_types(types[: a.vocab])
    wr.add_token_merges(["a b"])
    wr.add_eos_token_id(1)

    def f32(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape, np.float32) * np.float32(scale)).astype(np.float32)

    def bf16(*shape: int) -> np.ndarray:
        return (f32(*shape).view(np.uint32) >> 16).astype(np.uint16)

    def mxfp4(*shape: int) -> np.ndarray:  # (E, N, K) as blocks: an exponent, 16 code bytes
        n_blocks = shape[-1] // 32
        blocks = rng.integers(0, 256, (*shape[:-1], n_blocks, 17), dtype=np.uint8)
        blocks[..., 0] = rng.integers(118, 122, blocks.shape[:-1], dtype=np.uint8)
        return blocks.reshape(*shape[:-1], n_blocks * 17)

    wr.add_tensor("token_embd.weight", bf16(a.vocab, h), raw_dtype=Q.BF16)
    wr.add_tensor("output.weight", bf16(a.vocab, h), raw_dtype=Q.BF16)
    wr.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(a.layers):
        b = f"blk.{i}."
        wr.add_tensor(b + "attn_norm.weight", np.ones(h, np.float32))
        wr.add_tensor(b + "post_attention_norm.weight", np.ones(h, np.float32))
        for n, rows in (("q", nh * d), ("k", nkv * d), ("v", nkv * d)):
            wr.add_tensor(f"{b}attn_{n}.weight", bf16(rows, h), raw_dtype=Q.BF16)
            wr.add_tensor(f"{b}attn_{n}.bias", f32(rows))
        wr.add_tensor(b + "attn_output.weight", bf16(h, nh * d), raw_dtype=Q.BF16)
        wr.add_tensor(b + "attn_output.bias", f32(h))
        wr.add_tensor(b + "attn_sinks.weight", f32(nh, scale=1.0))
        wr.add_tensor(b + "ffn_gate_inp.weight", f32(e, h, scale=0.1))
        wr.add_tensor(b + "ffn_gate_inp.bias", f32(e))
        for n, (rows, k) in (("gate", (inter, h)), ("up", (inter, h)), ("down", (h, inter))):
            wr.add_tensor(f"{b}ffn_{n}_exps.weight", mxfp4(e, rows, k), raw_dtype=Q.MXFP4)
            wr.add_tensor(f"{b}ffn_{n}_exps.bias", f32(e, rows))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


def measure(model_dir: Path, a: argparse.Namespace) -> dict[str, Any]:
    """In this process: load the contrib model, then prefill and decode (greedy)."""
    from e2llm_edge.device.local import GenerationStats, LocalModel
    from e2llm_edge.device.runner import configure_threads
    from e2llm_edge.sysinfo import rss_bytes

    configure_threads(a.threads)
    before = rss_bytes()
    t = time.perf_counter()
    model = LocalModel(model_dir, variant=("contrib", "exact"))
    load_s = time.perf_counter() - t
    loaded = rss_bytes()
    rng = np.random.default_rng(1)
    prompt = [int(x) for x in rng.integers(2, a.vocab, a.prompt)]
    stats = GenerationStats()
    list(model.generate(prompt, a.steps, stop_at_eos=False, stats=stats))
    return {
        "load_s": load_s,
        "rss_after_load": loaded,
        "rss_before_load": before,
        "rss_after_run": rss_bytes(),
        "prefill_tok_s": stats.prefill_tokens_per_s,
        "decode_tok_s": stats.decode_tokens_per_s,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--used", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(measure(a.child, a)))
        return

    from onnx_export.export import export_model
    from onnx_export.source import cache_dir

    work = a.workdir or cache_dir() / "bench-moe" / f"{a.layers}x{a.hidden}x{a.experts}"
    work.mkdir(parents=True, exist_ok=True)
    gguf_path = work / "model.gguf"
    if not gguf_path.is_file():
        t = time.perf_counter()
        write_gguf(gguf_path, a)
        print(f"wrote {gguf_path} ({gguf_path.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - t:.0f} s")  # fmt: skip
    t = time.perf_counter()
    m = export_model(gguf_path, work / "model", progress=False, variants=[("contrib", "exact")])
    export_s = time.perf_counter() - t
    cmd = [sys.executable, __file__, "--child", str(m.directory)]
    for k in ("layers", "hidden", "experts", "used", "vocab", "prompt", "steps"):
        cmd += [f"--{k}", str(getattr(a, k))]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measuring child failed:\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    gguf_bytes = gguf_path.stat().st_size
    held = r["rss_after_load"] - r["rss_before_load"]
    result = {
        "shape": {k: getattr(a, k) for k in ("layers", "hidden", "experts", "used", "vocab")},
        "gguf_bytes": gguf_bytes,
        "manifest_weight_bytes": sum(m.cost["layer_param_bytes"])
        + m.cost["embed_param_bytes"]
        + m.cost["head_param_bytes"],
        "export_s": export_s,
        **r,
        "resident_over_gguf": held / gguf_bytes,
        "llama_cpp": "importable" if importlib.util.find_spec("llama_cpp") else "not installed",
        "load": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
