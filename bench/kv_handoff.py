"""KV handoff speed with one chunk in flight against several, side by side in one run.

Two clusters of four agents (memory budgets make each replica two devices: a PREFILL and a
DECODER pair) differ only in `e2llm agent --kv-window`; rounds alternate between them. Each
round prefills a 512-token prompt and times the handoff of its KV cache (first chunk sent
to the decoder holding all of it), as `bench/distributed_decode.py` does.

    .venv/bin/python bench/kv_handoff.py [--rounds 5] [--windows 1,4] [--plaintext]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_decode import kv_handoff

from e2llm_edge.fog.textio import ChatTokenizer
from e2llm_edge.ops.localcluster import LocalCluster, pinned_prefill_decoder
from onnx_export.export import default_model_dir, export_model
from onnx_export.manifest import Manifest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--windows", default="1,4", help="kv windows to compare")
    ap.add_argument("--plaintext", action="store_true", help="plain TCP (default: TLS)")
    args = ap.parse_args()
    windows = [int(x) for x in args.windows.split(",")]
    model_dir = export_model(None, default_model_dir(), progress=False).directory
    tok = ChatTokenizer(Manifest.load(model_dir))
    ids = tok.encode_prompt("Summarise: " + "edge devices share the work. " * 120, raw=True)[:512]
    inv = {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": f"kv{i}", "memory_mb": 420, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
            for i in range(4)
        ],
    }
    with contextlib.ExitStack() as stack:
        n_layers = int(Manifest.load(model_dir).config["n_layers"])
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        plan_file = pinned_prefill_decoder(
            tmp / "plan.json",
            ("kv0", "kv1"),
            ("kv2", "kv3"),
            n_layers,
        )
        clusters = {
            w: stack.enter_context(
                LocalCluster(
                    model_dir,
                    inv,
                    cluster=f"kvw{w}",
                    agent_args=["--kv-window", str(w)],
                    orchestrator_args=["--plan", str(plan_file)],
                    verbose=False,
                    tls=not args.plaintext,
                )
            )
            for w in windows
        }
        plans = {w: c.wait_serving(timeout=240) for w, c in clusters.items()}
        for w, p in plans.items():
            if sorted(r.role for r in p.replicas) != ["decoder", "prefill"]:
                print(f"window {w}: plan has no PREFILL->DECODER pair ({p.to_dict()})")
                return 1
        runs: dict[int, list[dict[str, float]]] = {w: [] for w in windows}
        for _ in range(args.rounds):
            for w, c in clusters.items():
                runs[w].append(asyncio.run(kv_handoff(c, plans[w], ids)))
    print(
        f"KV handoff of a {len(ids)}-token prompt, {'plaintext' if args.plaintext else 'TLS'}, "
        f"{args.rounds} alternating rounds (median, all in brackets):"
    )
    base = None
    for w, rs in runs.items():
        mbs = [r["bytes"] / 1e6 / max(r["handoff_s"], 1e-9) for r in rs]
        med = statistics.median(mbs)
        base = base or med
        print(
            f"  window {w}: {med:6.0f} MB/s  {[round(x) for x in mbs]}  "
            f"({statistics.median(r['bytes'] for r in rs) / 1e6:.1f} MB; "
            f"{med / base:.2f}x window {windows[0]})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
