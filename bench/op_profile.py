"""Where a contrib step spends its time, operator by operator (onnxruntime's profiler).

    .venv/bin/python bench/op_profile.py [--precision exact,int8] [--batch 1,8]
                                         [--prefill 40,1000] [--steps 30]

For each precision, all layers of the contrib graph in one session, as an agent runs them:
decode steps at each batch size after a 40-token prompt, then one prefill per prompt length.
onnxruntime's per-node times are summed by operator type; the linear layers are told apart
by their (K, N) shape (QKV, O, gate+up, down, and the Q4_1 block term of each). Printed per
case: wall and kernel milliseconds per decode step or per prefill, and every row with its
share.

These are the figures behind issue 7's notes: which kernels a decode step waits on in exact
and int8 mode, and what batching or a long prompt costs each of them. The profiler adds a
little time per node, so compare shares, and wall times only with the profiler on.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from machine import cpu_model  # noqa: E402

from e2llm_edge.device import runner  # noqa: E402
from e2llm_edge.device.fast_runner import FastLayerStack  # noqa: E402
from e2llm_edge.device.runner import configure_threads  # noqa: E402
from onnx_export.export import export_model  # noqa: E402
from onnx_export.manifest import Manifest  # noqa: E402
from onnx_export.source import fetch_default_gguf, open_model  # noqa: E402

PROMPT = 40  # decode cases start after a prompt this long
WARM = 2  # decode steps run before the profiled ones
LINEARS = ("MatMulNBits", "MatMul", "Gemm")


@dataclass
class Profile:
    """Per-row kernel microseconds summed over `calls` timed calls (decode steps or whole
    prefills; a long prefill is several session runs, one per chunk)."""

    case: str
    calls: int
    wall_ms: float  # per call, profiler on
    micros: dict[str, float] = field(default_factory=dict)
    session_runs: int = 0

    @property
    def kernel_ms(self) -> float:
        return sum(self.micros.values()) / self.calls / 1e3

    def rows(self) -> list[tuple[str, float, float]]:
        """(row, ms per run, share) from the costliest."""
        total = sum(self.micros.values()) or 1.0
        return [
            (k, v / self.calls / 1e3, v / total)
            for k, v in sorted(self.micros.items(), key=lambda kv: -kv[1])
        ]


def linear_names(cfg: dict[str, int]) -> dict[tuple[int, int], str]:
    """(K, N) of each linear layer -> its name, for the profiler's shapes."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    qkv = (cfg["n_heads"] + 2 * cfg["n_kv_heads"]) * d
    names = {(h, qkv): "qkv", (h, cfg["n_heads"] * d): "o", (h, 2 * i): "gate_up", (i, h): "down"}
    for (k, n), nm in list(names.items()):
        names[(k // 32, n)] = f"{nm} block term"  # Gemm(block sums, block minima)
        names[(k, k // 32)] = f"block sums, K={k}"  # MatMul(x, 0/1 indicator): shared K
    return names


def _dims(shapes: list[dict[str, list[int]]], j: int) -> list[int]:
    return next(iter(shapes[j].values())) if len(shapes) > j and shapes[j] else []


def aggregate(events: list[dict], names: dict[tuple[int, int], str]) -> tuple[int, dict]:
    """(session runs, row -> summed kernel microseconds) from a profiler JSON."""
    micros: dict[str, float] = collections.defaultdict(float)
    runs = 0
    for e in events:
        if e.get("cat") == "Session" and e.get("name") == "model_run":
            runs += 1
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        op = e["args"].get("op_name", "?")
        row = op
        if op in LINEARS:
            x = _dims(e["args"].get("input_type_shape", []), 0)
            y = _dims(e["args"].get("output_type_shape", []), 0)
            if x and y:
                row = f"{op} {names.get((x[-1], y[-1]), f'{x[-1]}x{y[-1]}')}"
        micros[row] += float(e["dur"])
    return runs, dict(micros)


def profile_stack(
    fast_dir: Path,
    precision: str,
    batches: list[int],
    prefills: list[int],
    steps: int,
    threads: int | None = None,
) -> list[Profile]:
    """One profiled session per case (a fresh stack each, so cases do not share a file)."""
    m = Manifest.load(fast_dir)
    cfg = {
        k: int(m.config[k])
        for k in (
            "hidden_size",
            "intermediate_size",
            "head_dim",
            "n_heads",
            "n_kv_heads",
            "n_layers",
        )
    }
    names = linear_names(cfg)
    rng = np.random.default_rng(0)
    out: list[Profile] = []
    with tempfile.TemporaryDirectory(prefix="e2llm_prof_") as tmp:

        def stack(case: str, context: int) -> FastLayerStack:
            return FastLayerStack(
                m,
                0,
                cfg["n_layers"],
                precision=precision,
                verify=False,
                threads=threads,
                max_batch=max([*batches, 1]),
                context=context,
                profile=f"{tmp}/{case}",
            )

        def finish(st: FastLayerStack, case: str, skip: int, wall: float, calls: int) -> None:
            """Read each segment's profile, leaving out its first `skip` session runs."""
            files = [Path(bd.session.end_profiling()) for bd in st.bound]
            runs, micros = 0, collections.Counter[str]()
            for f in files:
                events = json.loads(f.read_text())
                r, mc = aggregate(_drop_runs(events, skip), names)
                runs += r
                micros.update(mc)
            out.append(
                Profile(case, calls, wall / calls * 1e3, dict(micros), runs // max(1, len(files)))
            )

        for b in batches:
            case = f"{precision} decode B={b}"
            st = stack(case.replace(" ", "_").replace("=", ""), PROMPT + WARM + steps + 8)
            caches = [st.new_cache(PROMPT + WARM + steps + 8) for _ in range(b)]
            for c in caches:
                st.run(rng.standard_normal((1, PROMPT, cfg["hidden_size"]), np.float32), 0, c)
            x = rng.standard_normal((b, 1, cfg["hidden_size"]), np.float32)
            for _ in range(WARM):  # the first steps pay allocation
                st.run_batch(x, caches)
            t = time.perf_counter()
            for _ in range(steps):
                st.run_batch(x, caches)
            prompt_runs = b * -(-PROMPT // runner.PREFILL_CHUNK)
            finish(st, case, prompt_runs + WARM, time.perf_counter() - t, steps)
        for n in prefills:
            case = f"{precision} prefill T={n}"
            st = stack(case.replace(" ", "_").replace("=", ""), n + 8)
            h = rng.standard_normal((1, n, cfg["hidden_size"]), np.float32)
            c = st.new_cache(n + 8)
            st.run(h, 0, c)  # warm-up: first runs pay allocation
            c.release()
            chunks = -(-n // runner.PREFILL_CHUNK)  # session runs per prefill
            reps = max(1, min(steps, 4000 // n))
            t = time.perf_counter()
            for _ in range(reps):
                c = st.new_cache(n + 8)
                st.run(h, 0, c)
                c.release()
            finish(st, case, chunks, time.perf_counter() - t, reps)
    return out


def _drop_runs(events: list[dict], n: int) -> list[dict]:
    """The events after the first `n` session runs (prompt prefills or the warm-up)."""
    ends = sorted(
        e["ts"] + e["dur"]
        for e in events
        if e.get("cat") == "Session" and e.get("name") == "model_run"
    )
    if n <= 0 or len(ends) <= n:
        return events
    cut = ends[n - 1]
    return [e for e in events if e.get("ts", 0) >= cut]


def report(p: Profile, top: int | None = None) -> str:
    unit = "step" if "decode" in p.case else "prefill"
    lines = [
        f"{p.case}: {p.wall_ms:.2f} ms wall per {unit} (profiler on), "
        f"{p.kernel_ms:.2f} ms in kernels; {p.calls} {unit}s, {p.session_runs} session runs"
    ]
    for row, ms, share in p.rows()[:top]:
        lines.append(f"  {row:34s} {ms:9.3f} ms  {100 * share:5.1f}%")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precision", default="exact,int8")
    ap.add_argument("--batch", default="1,8", help="decode batch sizes")
    ap.add_argument("--prefill", default="40,1000", help="prompt lengths")
    ap.add_argument("--steps", type=int, default=30, help="decode steps (and prefill runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--top", type=int, default=14, help="rows printed per case")
    ap.add_argument(
        "--fast-dir",
        default="/tmp/e2llm_fast_bench",
        help="contrib model directory (exported here if missing)",
    )
    args = ap.parse_args()
    configure_threads(args.threads)
    ints = lambda s: [int(v) for v in s.split(",") if v]  # noqa: E731
    fast_dir = Path(args.fast_dir)
    precisions = [p for p in args.precision.split(",") if p]
    gguf = fetch_default_gguf()
    n = open_model(gguf).config.n_layers
    for precision in precisions:  # all layers in one segment, as one device runs them
        export_model(
            gguf,
            fast_dir,
            ranges=f"0-{n}",
            progress=False,
            graph_name="contrib",
            precision=precision,
        )
    print(f"CPU: {cpu_model()}; threads: {args.threads}; {args.steps} steps per case")
    for precision in precisions:
        for p in profile_stack(
            fast_dir, precision, ints(args.batch), ints(args.prefill), args.steps
        ):
            print(report(p, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
