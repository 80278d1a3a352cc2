"""What an agent really holds in memory, per layer: the figures the testbed's memory limits
are chosen from.

Each configuration runs in a fresh process that imports what an agent imports, loads a
stage exactly as the agent's engine does (`load_stage`, `VariantEmbedder`, `VariantHead`,
one onnxruntime thread), then prefills `--prompt` tokens and decodes `--output` steps for
`--batch` requests. Printed per configuration: resident memory after the work (VmRSS) and
its peak (VmHWM, which includes the transient copies onnxruntime makes while it loads a
session); then a least-squares fit of peak = base + per_layer x layers + embed + head, and
the manifest's figure per layer for comparison (what the planner counts).

    .venv/bin/python bench/testbed_memory.py [--graph standard --precision fp32]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import numpy as np
import e2llm_edge.device.agent  # noqa: F401  (everything an agent imports)
from e2llm_edge.device.fast_runner import VariantEmbedder, VariantHead, load_stage
from onnx_export.manifest import Manifest

def status():
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out

a = json.loads(sys.argv[1])
base = status()
m = Manifest.load(a["model"])
v = (a["graph"], a["precision"])
stage = None
if a["layers"]:
    stage = load_stage(m, 0, a["layers"], v, threads=1, max_batch=a["batch"], context=1024)
emb = VariantEmbedder(m, v, threads=1) if a["embed"] else None
head = VariantHead(m, v, threads=1) if a["head"] else None
loaded = status()
h = int(m.config["hidden_size"])
rng = np.random.default_rng(0)
caches = []
if stage is not None:
    for _ in range(a["batch"]):
        c = stage.new_cache(a["prompt"] + a["output"] + 8)
        stage.run(rng.normal(0, 1, (1, a["prompt"], h)).astype(np.float32), 0, c)
        caches.append(c)
    for _ in range(a["output"]):
        stage.run_batch(rng.normal(0, 1, (a["batch"], 1, h)).astype(np.float32), caches)
if head is not None:
    head.run(rng.normal(0, 1, (a["batch"], 1, h)).astype(np.float32))
if emb is not None:
    emb.run(rng.integers(0, 1000, (1, a["prompt"]), dtype=np.int64))
print(json.dumps({"base": base, "loaded": loaded, "after": status()}))
"""


def measure(cfg: dict[str, object]) -> dict[str, dict[str, int]]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cfg)],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    result: dict[str, dict[str, int]] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--graph", default="standard")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from onnx_export.export import default_model_dir
    from onnx_export.manifest import Manifest

    model = default_model_dir()
    man = Manifest.load(model)
    configs = [(0, False, False), (0, True, False), (0, False, True)]
    configs += [(k, False, False) for k in (1, 2, 4, 8, 15)]
    rows = []
    print(f"{'layers':>6} {'embed':>5} {'head':>5} {'rss MB':>8} {'peak MB':>8}")
    for layers, embed, head in configs:
        r = measure(
            {
                "model": str(model),
                "graph": args.graph,
                "precision": args.precision,
                "layers": layers,
                "embed": embed,
                "head": head,
                "batch": args.batch,
                "prompt": args.prompt,
                "output": args.output,
            }
        )
        rss, peak = r["after"]["VmRSS"] / 1e6, r["after"]["VmHWM"] / 1e6
        rows.append((layers, embed, head, rss, peak))
        print(f"{layers:>6} {embed!s:>5} {head!s:>5} {rss:8.1f} {peak:8.1f}", flush=True)
    x = np.array([[1.0, r[0], float(r[1]), float(r[2])] for r in rows])
    for col, name in ((3, "resident"), (4, "peak")):
        y = np.array([r[col] for r in rows])
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        print(
            f"{name}: base {coef[0]:.1f} MB + {coef[1]:.2f} MB/layer + embed {coef[2]:.1f} MB "
            f"+ head {coef[3]:.1f} MB"
        )
    cost = man.to_dict()["cost"]
    print(
        f"manifest (what the planner counts): {cost['layer_param_bytes'][0] / 1e6:.2f} MB/layer, "
        f"embed {cost['embed_param_bytes'] / 1e6:.1f} MB, "
        f"head {cost['head_param_bytes'] / 1e6:.1f} MB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
