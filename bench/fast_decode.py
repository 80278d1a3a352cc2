"""Decode/prefill speed of the graph variants against llama.cpp, alternating A/B in one window.

    .venv/bin/python bench/fast_decode.py [--threads 2] [--rounds 5]

For each engine (standard fp32, contrib exact, contrib int8, llama.cpp when llama_cpp is
importable) and each context (~40 and ~1000 tokens): prefill the prompt, then decode
greedily; the full local path is timed (embed, layers, head, argmax). Engines take turns
within every round, so machine noise hits all of them alike; medians over rounds are
printed, with the median of each round's ratio to llama.cpp. Then batched decode
throughput of the contrib graph at concurrency 1, 4 and 8 on one device (one `run_batch`
per step for all requests), the concurrencies also taking turns.
Models are exported on first use (standard into the cache, contrib into --fast-dir).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from e2llm_edge.device.fast_runner import FastLayerStack, VariantEmbedder, VariantHead  # noqa: E402
from e2llm_edge.device.local import LocalModel  # noqa: E402
from e2llm_edge.device.runner import StageCache, configure_threads  # noqa: E402
from onnx_export.export import default_model_dir, export_model  # noqa: E402
from onnx_export.manifest import Manifest  # noqa: E402
from onnx_export.source import fetch_default_gguf  # noqa: E402

Prefill = Callable[[list[int]], Any]  # prompt ids -> state
Decode = Callable[[Any, int], int]  # (state, token) -> next token


def prompts() -> dict[str, list[int]]:
    ref = json.loads((ROOT / "tests" / "fixtures" / "reference_smollm2.json").read_text())
    cases = {c["name"]: c["prompt_ids"] for c in ref["cases"]}
    long = cases["chat_long"]
    return {
        "ctx40": (cases["chat_capital"] + cases["raw_code"])[:40],
        "ctx1000": (long + long)[:1000],
    }


def local_engine(model: LocalModel) -> tuple[Prefill, Decode]:
    def prefill(ids: list[int]) -> Any:
        cache = model.layers.new_cache(len(ids) + 64)
        logits = model.forward(ids, 0, cache)
        return [cache, len(ids), int(logits.argmax())]

    def decode(state: Any, tok: int) -> int:
        cache, pos, _ = state
        logits = model.forward([tok], pos, cache)
        state[1] = pos + 1
        return int(logits.argmax())

    return prefill, decode


def llamacpp_engine(gguf: Path, threads: int) -> tuple[Prefill, Decode] | None:
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    from llama_cpp import Llama

    llm = Llama(
        str(gguf),
        n_ctx=2048,
        n_batch=2048,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def prefill(ids: list[int]) -> Any:
        llm.reset()
        llm.eval(ids)
        return [None, len(ids), int(np.argmax(llm.scores[llm.n_tokens - 1]))]

    def decode(state: Any, tok: int) -> int:
        llm.eval([tok])
        return int(np.argmax(llm.scores[llm.n_tokens - 1]))

    return prefill, decode


def measure(engine: tuple[Prefill, Decode], ids: list[int], steps: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) for one prompt."""
    prefill, decode = engine
    t0 = time.perf_counter()
    state = prefill(ids)
    t1 = time.perf_counter()
    tok = state[2]
    for _ in range(steps):
        tok = decode(state, tok)
    t2 = time.perf_counter()
    return len(ids) / (t1 - t0), steps / (t2 - t1)


def batched(
    fast_dir: Path, precision: str, ids: list[int], steps: int, rounds: int, conc: list[int]
) -> dict[int, list[float]]:
    """Aggregate decode tokens/s per round with B requests advancing together
    (embed+layers+head)."""
    m = Manifest.load(fast_dir)
    v = ("contrib", precision)
    emb, head = VariantEmbedder(m, v, verify=False), VariantHead(m, v, verify=False)
    stack = FastLayerStack(
        m,
        0,
        int(m.config["n_layers"]),
        precision=precision,
        verify=False,
        max_batch=max(conc),
        context=len(ids) + steps * rounds * len(conc) + 8,
    )
    caches: list[StageCache] = []
    toks: list[int] = []
    for _ in range(max(conc)):
        c = stack.new_cache(stack.context)
        h = stack.run(emb.run(np.asarray([ids], np.int64)), 0, c)
        caches.append(c)
        toks.append(int(head.run(h[:, -1:])[0, -1].argmax()))
    out: dict[int, list[float]] = {b: [] for b in conc}
    for _ in range(rounds):
        for b in conc:
            t = time.perf_counter()
            for _ in range(steps):
                x = emb.run(np.asarray([[tk] for tk in toks[:b]], np.int64))
                h = stack.run_batch(x, caches[:b])
                nxt = head.run(h)[:, -1].argmax(-1)
                toks[:b] = [int(n) for n in nxt]
            out[b].append(b * steps / (time.perf_counter() - t))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime and llama.cpp threads")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    ap.add_argument(
        "--fast-dir",
        default="/tmp/e2llm_fast_bench",
        help="contrib model directory (exported here if missing)",
    )
    ap.add_argument("--standard-dir", help="standard model directory (default: the cache)")
    ap.add_argument("--skip", default="", help="comma list of engines to skip")
    args = ap.parse_args()
    configure_threads(args.threads)
    gguf = fetch_default_gguf()
    std_dir = Path(args.standard_dir) if args.standard_dir else default_model_dir()
    fast_dir = Path(args.fast_dir)
    if not args.standard_dir:
        export_model(None, std_dir, progress=False, graph_name="standard")
    n_layers = int(Manifest.load(std_dir).config["n_layers"])
    for precision in ("exact", "int8"):
        export_model(
            gguf,
            fast_dir,
            ranges=f"0-{n_layers}",
            progress=False,
            graph_name="contrib",
            precision=precision,
        )

    print(
        f"CPU: {cpu_model()}; threads: {args.threads} (onnxruntime per-session pools that "
        f"sleep between runs, llama.cpp n_threads); rounds: {args.rounds}, "
        f"{args.steps} decode steps each"
    )
    skip = set(filter(None, args.skip.split(",")))
    engines: dict[str, tuple[Prefill, Decode]] = {}
    if "standard" not in skip:
        engines["standard fp32"] = local_engine(
            LocalModel(std_dir, verify=False, variant=("standard", "fp32"))
        )
    for precision in ("exact", "int8"):
        if precision not in skip:
            engines[f"contrib {precision}"] = local_engine(
                LocalModel(fast_dir, verify=False, variant=("contrib", precision))
            )
    llama = llamacpp_engine(gguf, args.threads) if "llama.cpp" not in skip else None
    if llama is None:
        print(
            "llama.cpp: llama_cpp (llama-cpp-python) is not importable or skipped; "
            "no comparison (CMAKE_ARGS=-DGGML_NATIVE=ON pip install llama-cpp-python)"
        )
    else:
        engines["llama.cpp"] = llama

    ps = prompts()
    res: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for eng in engines.values():  # warm-up: first runs pay allocation and prepacking
        measure(eng, ps["ctx40"], 4)
    for _ in range(args.rounds):
        for ctx, ids in ps.items():
            for name, eng in engines.items():
                res.setdefault((name, ctx), []).append(measure(eng, ids, args.steps))

    print(
        f"\n{'engine':16s} {'context':8s} {'prefill tok/s':>14s} {'decode tok/s':>13s} "
        f"{'prefill x':>10s} {'decode x':>9s}  decode x per round"
    )
    for ctx, ids in ps.items():
        base = res.get(("llama.cpp", ctx))
        for n in engines:
            rows = res[(n, ctx)]
            p, d = (statistics.median(r[i] for r in rows) for i in (0, 1))
            if base:  # each round's ratio pairs runs minutes apart at most: less noise
                px = [r[0] / b[0] for r, b in zip(rows, base, strict=True)]
                dx = [r[1] / b[1] for r, b in zip(rows, base, strict=True)]
                ratio = (
                    f"{statistics.median(px):10.2f} {statistics.median(dx):9.2f}  "
                    f"{[round(x, 2) for x in dx]}"
                )
            else:
                ratio = f"{'-':>10s} {'-':>9s}"
            print(f"{n:16s} {len(ids):<8d} {p:14.1f} {d:13.1f} {ratio}")
    print("(ratios: to llama.cpp, median over rounds of each round's ratio)")

    conc = [1, 4, 8]
    for precision in ("exact", "int8"):
        if precision in skip:
            continue
        tput = batched(fast_dir, precision, ps["ctx40"], args.steps, args.rounds, conc)
        line = ", ".join(
            f"B={b}: {statistics.median(t):.1f} tok/s "
            f"({statistics.median(x / y for x, y in zip(t, tput[1], strict=True)):.2f}x)"
            for b, t in tput.items()
        )
        print(f"batched decode, contrib {precision}, ~40-token contexts: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
