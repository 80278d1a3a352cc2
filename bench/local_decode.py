"""Local path speed: decode and prefill tokens/s with per-layer and with range segments.

Each configuration runs in its own process (onnxruntime threading is fixed per process),
and the configurations alternate round by round so the machine's noise hits all alike.
Medians are printed, with every round in brackets.

    .venv/bin/python bench/local_decode.py [--rounds 3] [--new-tokens 64]

``--baseline DIR`` also runs every configuration with the code of another checkout (say
``git worktree add /tmp/base HEAD~1``), interleaved with this tree's runs: a before/after
measured in one time window.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from onnx_export.export import default_model_dir, export_model  # noqa: E402

CHILD = r"""
import json, sys, time
from e2llm_edge.device.local import GenerationStats, LocalModel
model_dir, ranges = sys.argv[1], sys.argv[2] == "1"
threads, n, prompt_len = (int(x) for x in sys.argv[3:6])
m = LocalModel(model_dir, prefer_ranges=ranges, threads=threads,
               variant=(sys.argv[6], sys.argv[7]))
ids = [(7 * i + 11) % 40000 + 100 for i in range(prompt_len)]
list(m.generate(ids[:8], 4, stop_at_eos=False))  # warm-up
st = GenerationStats()
list(m.generate(ids, n, stats=st, stop_at_eos=False))
sessions = len(getattr(m.layers, "parts", None) or m.layers.segments)  # older trees: segments
print(json.dumps({"sessions": sessions, "decode": st.decode_tokens_per_s,
                  "prefill": st.prefill_tokens_per_s}))
"""


def run(
    model_dir: Path,
    ranges: bool,
    threads: int,
    n: int,
    prompt_len: int,
    variant: tuple[str, str],
    tree: Path = ROOT,
) -> dict[str, float]:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(model_dir),
            "1" if ranges else "0",
            str(threads),
            str(n),
            str(prompt_len),
            *variant,
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        cwd=tree,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout whose code runs the same configurations, interleaved",
    )
    ap.add_argument("--graph", default="standard", choices=["standard", "contrib"])
    ap.add_argument("--precision", default=None, help="fp32 (standard), exact/int8 (contrib)")
    args = ap.parse_args()
    variant = (args.graph, args.precision or ("fp32" if args.graph == "standard" else "exact"))
    trees = [("", ROOT)] + ([("baseline ", args.baseline.resolve())] if args.baseline else [])
    model_dir = export_model(
        None,
        default_model_dir(),
        ranges="0-15,15-30",
        progress=False,
        graph_name=variant[0],
        precision=variant[1],
    ).directory
    cpu = cpu_model()
    print(
        f"CPU: {cpu}, {os.cpu_count()} cores; graph {variant[0]}/{variant[1]}; threads as "
        f"the code under test sets them up (see e2llm_edge/device/runner.py)"
    )
    configs = [(b, r, t) for t in args.threads for r in (False, True) for b in trees]
    for ctx in (40, 1000):
        res: dict[tuple[tuple[str, Path], bool, int], list[dict[str, float]]] = {
            c: [] for c in configs
        }
        for _ in range(args.rounds):
            for b, r, t in configs:
                res[(b, r, t)].append(
                    run(model_dir, r, t, args.new_tokens, ctx, variant, tree=b[1])
                )
        print(f"\nprompt of {ctx} tokens, {args.new_tokens} new tokens")
        for (b, r, t), rows in res.items():
            dec = [x["decode"] for x in rows]
            pre = [x["prefill"] for x in rows]
            label = f"{b[0]}{'range' if r else 'per-layer'} ({int(rows[0]['sessions'])} sessions)"
            print(
                f"  {label:33s} threads={t}: decode {statistics.median(dec):6.1f} tok/s "
                f"{[round(x, 1) for x in dec]}, prefill {statistics.median(pre):7.0f} tok/s"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
