"""How a device should get the session for its layer range: load time, memory, decode speed.

Methods, for a stage of layers [0, N) of one graph variant:

- ``a``: an exported range file (``e2llm export --ranges``) loaded by path (the old way,
  with the orchestrator writing range files into the model directory);
- ``b``: one session per per-layer file, chained (the old fallback without range files);
- ``c-bytes``: the range graph composed from the per-layer files with the weights copied
  in, handed to onnxruntime as bytes;
- ``c-file``: the same written to a device cache file and loaded by path (the time includes
  composing and writing; a later load from the cache costs what ``a`` costs);
- ``d``: composed from the per-layer files with the weights left in them as external data
  (``e2llm_edge/device/ranges.py``: what a device does now when it has no range file);
- ``d-range``: the exported range file through the same in-place loader (what a device does
  when it has one).

Each (variant, N, method) runs in a fresh process, rounds alternate every configuration, and
medians are printed. Peak is the process's high-water RSS during the load (reset just
before), steady the RSS after it and after decoding; memory figures are beyond the process's
RSS before the load (Python, numpy, onnxruntime and onnx imported). Every file is sha256
checked in every method, as a device does. Decode is one token through the stage after a
prompt of ``--prompt`` tokens, ``--steps`` times.

    .venv/bin/python bench/range_sessions.py [--layers 15,30] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

METHODS = ("a", "b", "c-bytes", "c-file", "d", "d-range")
VARIANTS = ("standard/fp32", "contrib/exact")


def _status() -> dict[str, float]:
    """This process's memory counters from /proc, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) / 1024
    return out


def _open(method: str, model_dir: Path, variant: tuple[str, str], n: int) -> list[Any]:
    """The sessions of layers [0, n) the way `method` makes them."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from e2llm_edge.device.ranges import compose
    from e2llm_edge.device.runner import Part, make_session, open_parts
    from onnx_export.manifest import Manifest

    m = Manifest.load(model_dir)
    if method == "a":
        (seg,) = m.cover(0, n, *variant)
        return [Part(seg.layers, make_session(m.verify(seg)))]
    if method == "b":
        segs = m.cover(0, n, *variant, longest=False)
        return [Part(s.layers, make_session(m.verify(s))) for s in segs]
    if method in ("d", "d-range"):
        return open_parts(m, 0, n, variant, prefer_ranges=method == "d-range")
    graph, folder = compose(m, m.cover(0, n, *variant, longest=False))
    model = onnx.load_model_from_string(graph)
    load_external_data_for_model(model, str(folder))
    if method == "c-bytes":
        data = model.SerializeToString()
        del model
        return [Part(range(0, n), make_session(data))]
    cache = Path(tempfile.mkdtemp(prefix="range-cache-"))
    path = cache / f"{variant[0]}_{variant[1]}_{n}.onnx"
    onnx.save_model(model, str(path))
    del model
    try:
        return [Part(range(0, n), make_session(path))]
    finally:
        path.unlink()
        cache.rmdir()


class _Decoder:
    """A stage of layers [0, n) on `parts`, its cache filled with a random prompt, decoding
    random hidden states (the speed does not depend on their values)."""

    def __init__(
        self, m: Any, variant: tuple[str, str], n: int, parts: list[Any], prompt: int, steps: int
    ) -> None:
        import numpy as np

        from e2llm_edge.device.fast_runner import FastLayerStack
        from e2llm_edge.device.runner import LayerStack

        ctx = prompt + steps + 8
        self.stage: Any
        if variant[0] == "contrib":
            self.stage = FastLayerStack(
                m, 0, n, precision=variant[1], max_batch=0, context=ctx, parts=parts
            )
        else:
            self.stage = LayerStack(m, 0, n, parts=parts)
        h = int(m.config["hidden_size"])
        rng = np.random.default_rng(0)
        self.cache = self.stage.new_cache(ctx)
        self.stage.run(rng.normal(0, 1, (1, prompt, h)).astype(np.float32), 0, self.cache)
        self.xs = rng.normal(0, 1, (steps, 1, 1, h)).astype(np.float32)
        self.done = 0

    def step(self, k: int) -> Any:
        """k decode steps; the last output."""
        out = None
        for x in self.xs[self.done : self.done + k]:
            out = self.stage.run(x, self.cache.length, self.cache)
        self.done += k
        return out


def child(method: str, model_dir: Path, variant: tuple[str, str], n: int, a: Any) -> None:
    import numpy as np
    import onnx  # noqa: F401  (imported by every method: the baseline includes it)

    from e2llm_edge.device.runner import configure_threads
    from onnx_export.manifest import Manifest

    configure_threads(a.threads)
    m = Manifest.load(model_dir)
    gc.collect()
    before = _status()
    cgroup_before = _cgroup_mb()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the peak of this load only
    t0 = time.perf_counter()
    parts = _open(method, model_dir, variant, n)
    load_s = time.perf_counter() - t0
    gc.collect()
    loaded = _status()
    stage = _Decoder(m, variant, n, parts, a.prompt, a.steps + 4)
    stage.step(4)  # warm-up
    t1 = time.perf_counter()
    out = stage.step(a.steps)
    tok_s = a.steps / (time.perf_counter() - t1)
    after = _status()
    print(
        json.dumps(
            {
                "sessions": len(parts),
                "load_s": load_s,
                "base_mb": before["VmRSS"],
                "peak_mb": loaded["VmHWM"] - before["VmRSS"],
                "loaded_mb": loaded["VmRSS"] - before["VmRSS"],
                "loaded_anon_mb": loaded["RssAnon"] - before["RssAnon"],
                "loaded_file_mb": loaded["RssFile"] - before["RssFile"],
                "decoded_mb": after["VmRSS"] - before["VmRSS"],
                "tok_s": tok_s,
                "checksum": float(np.abs(out).sum()),
                "cgroup_before_mb": cgroup_before,
            }
        )
    )


SPEED_METHODS = ("a", "b", "d", "d-range")  # c-bytes and c-file load d's graph


def speed_child(model_dir: Path, variant: tuple[str, str], n: int, a: Any) -> None:
    """Decode tok/s of every method in one process, in short alternating bursts: on a busy
    machine the noise then hits all alike (separate processes swung by 30% here)."""
    from e2llm_edge.device.runner import configure_threads
    from onnx_export.manifest import Manifest

    configure_threads(a.threads)
    m = Manifest.load(model_dir)
    burst = 8
    bursts = max(1, a.steps // burst) * a.rounds
    stages = {
        meth: _Decoder(
            m, variant, n, _open(meth, model_dir, variant, n), a.prompt, 4 + bursts * burst
        )
        for meth in SPEED_METHODS
    }
    spent = dict.fromkeys(stages, 0.0)
    for s in stages.values():
        s.step(4)  # warm-up
    for b in range(bursts):
        order = list(stages)[b % len(stages) :] + list(stages)[: b % len(stages)]
        for meth in order:
            t = time.perf_counter()
            stages[meth].step(burst)
            spent[meth] += time.perf_counter() - t
    print(json.dumps({meth: bursts * burst / t for meth, t in spent.items()}))


def speed(model_dir: Path, v: str, n: int, a: Any) -> dict[str, float]:
    cmd = [*_child_cmd("speed", model_dir, v, n, a), "--rounds", str(a.rounds)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if out.returncode:
        raise RuntimeError(f"speed {v} {n}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def onnx_import_cost() -> dict[str, float]:
    """RSS and time that `import onnx` adds to a process with numpy and onnxruntime."""
    code = (
        "import json, time, numpy, onnxruntime, yaml, sys\n"
        f"sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        "from range_sessions import _status\n"
        "a = _status()['VmRSS']; t = time.perf_counter(); import onnx\n"
        "print(json.dumps({'import_s': time.perf_counter() - t, "
        "'rss_mb': _status()['VmRSS'] - a}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


CGROUP = Path("/sys/fs/cgroup/memory")


def _cgroup_mb() -> float | None:
    """What this process's memory cgroup (v1) is charged, in MB; None outside one."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            usage = CGROUP / path.lstrip("/") / "memory.usage_in_bytes"
            return int(usage.read_text()) / 2**20 if usage.exists() else None
    return None


def fits(
    method: str, model_dir: Path, variant: str, n: int, limit_mb: float | None, a: Any
) -> tuple[bool, float, float]:
    """Whether `method` loads and decodes inside a memory cgroup (v1) of `limit_mb` (None:
    no limit), as a device under a memory limit does; the charge before the load and the
    cgroup's peak charge, in MB (page cache included: the kernel reclaims it before killing)."""
    group = CGROUP / f"e2llm-range-bench-{os.getpid()}"
    group.mkdir()
    try:
        if limit_mb is not None:
            (group / "memory.limit_in_bytes").write_text(str(int(limit_mb * 2**20)))

        def join() -> None:
            (group / "cgroup.procs").write_text(str(os.getpid()))

        out = subprocess.run(
            _child_cmd(method, model_dir, variant, n, a),
            capture_output=True,
            text=True,
            timeout=900,
            preexec_fn=join,
        )
        peak = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        if out.returncode:
            return False, 0.0, peak
        before = json.loads(out.stdout.strip().splitlines()[-1])["cgroup_before_mb"]
        return True, before, peak
    finally:
        group.rmdir()


def _child_cmd(method: str, model_dir: Path, variant: str, n: int, a: Any) -> list[str]:
    return [
        sys.executable,
        __file__,
        "--child",
        method,
        variant,
        str(n),
        "--model",
        str(model_dir),
        "--threads",
        str(a.threads),
        "--steps",
        str(a.steps),
        "--prompt",
        str(a.prompt),
    ]


def run(method: str, model_dir: Path, variant: str, n: int, a: Any) -> dict[str, float]:
    out = subprocess.run(
        _child_cmd(method, model_dir, variant, n, a), capture_output=True, text=True, timeout=900
    )
    if out.returncode:
        raise RuntimeError(f"{method} {variant} {n}: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(model_dir: Path, a: Any) -> dict[tuple[str, int, str], list[dict[str, float]]]:
    res: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for _ in range(a.rounds):
        for v in a.variants:
            for n in a.layers:
                for meth in a.methods:
                    res.setdefault((v, n, meth), []).append(run(meth, model_dir, v, n, a))
    return res


def cgroup_table(
    model_dir: Path, res: dict[tuple[str, int, str], list[dict[str, float]]], a: Any
) -> str:
    """Each configuration under memory limits of (RSS before the load) + F x (the range's
    weights, the exported range file's size), for every F of --cgroup."""
    from onnx_export.manifest import Manifest

    m = Manifest.load(model_dir)
    lines = [
        "memory cgroup (v1) limited to its charge before the load + F x the weights; "
        "peak charge beyond the charge before the load, as a multiple of the weights"
    ]
    for v, n, meth in res:
        graph, precision = v.split("/")
        (seg,) = m.cover(0, n, graph, precision)
        weights = seg.bytes / 2**20
        ok, before, peak = fits(meth, model_dir, v, n, None, a)
        assert ok, (v, n, meth)
        cells = [f"unlimited: peak {(peak - before) / weights:.2f}x"]
        for f in a.cgroup:
            ok, _, _ = fits(meth, model_dir, v, n, before + f * weights, a)
            cells.append(f"{f}x: {'ok ' if ok else 'OOM'}")
        lines.append(f"{v:14s} {n:>3d} {meth:8s} {weights:5.0f} MB  " + "  ".join(cells))
    return "\n".join(lines)


def table(res: dict[tuple[str, int, str], list[dict[str, float]]]) -> str:
    cols = [
        ("load_s", "load s", "{:.2f}"),
        ("peak_mb", "peak MB", "{:.0f}"),
        ("loaded_mb", "steady MB", "{:.0f}"),
        ("loaded_anon_mb", "(anon)", "{:.0f}"),
        ("decoded_mb", "after decode MB", "{:.0f}"),
        ("tok_s", "decode tok/s", "{:.1f}"),
    ]
    lines = [
        f"{'variant':14s} {'N':>3s} {'method':8s} {'sess':>4s} "
        + " ".join(f"{h:>15s}" for _, h, _ in cols)
    ]
    for (v, n, meth), rows in res.items():
        cells = []
        for key, _, fmt in cols:
            vals = [r[key] for r in rows]
            med = fmt.format(statistics.median(vals))
            cells.append(f"{med:>15s}")
        lines.append(f"{v:14s} {n:>3d} {meth:8s} {int(rows[0]['sessions']):>4d} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "VARIANT", "N"), help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: cache)")
    ap.add_argument("--layers", default="15,30", help="stage sizes, comma-separated")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64, help="decode steps timed")
    ap.add_argument("--prompt", type=int, default=128, help="tokens in the cache before decoding")
    ap.add_argument(
        "--no-speed",
        dest="speed",
        action="store_false",
        help="skip the decode speed of the methods alternating in one process",
    )
    ap.add_argument(
        "--cgroup",
        default="",
        help="also run each configuration in a memory cgroup (v1, root) limited to the RSS "
        "before the load + F x the weights, for each F of this list (e.g. 1.25,1.5,2)",
    )
    a = ap.parse_args(argv)
    if a.child:
        meth, v, n = a.child
        graph, precision = v.split("/")
        if meth == "speed":
            speed_child(a.model, (graph, precision), int(n), a)
        else:
            child(meth, a.model, (graph, precision), int(n), a)
        return 0
    a.layers = [int(x) for x in a.layers.split(",")]
    a.methods = [x for x in a.methods.split(",") if x]
    a.variants = a.variants.split(",")
    a.cgroup = [float(x) for x in a.cgroup.split(",") if x]
    model_dir = a.model or export_ranges(a.variants, a.layers)
    from machine import cpu_model

    print(
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}; "
        f"{a.threads} thread(s); {a.rounds} round(s), medians"
    )
    cost = onnx_import_cost()
    print(f"import onnx: +{cost['rss_mb']:.0f} MB RSS, {cost['import_s']:.2f} s", flush=True)
    res = measure(model_dir, a)
    print(table(res), flush=True)
    if a.speed:
        print(
            f"decode tok/s, {', '.join(SPEED_METHODS)} alternating in one process "
            f"({a.rounds} x {a.steps} steps each), and the ratio to a:"
        )
        for v in a.variants:
            for n in a.layers:
                tps = speed(model_dir, v, n, a)
                cells = "  ".join(f"{m_} {t:6.1f} ({t / tps['a']:.2f})" for m_, t in tps.items())
                print(f"{v:14s} {n:>3d}  {cells}", flush=True)
    if a.cgroup:
        print(cgroup_table(model_dir, res, a))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


def export_ranges(variants: list[str], layers: list[int]) -> Path:
    """The default model with the exported ranges [0, N) method `a` needs."""
    from onnx_export.export import default_model_dir, export_model

    d = default_model_dir()
    for v in variants:
        graph, precision = v.split("/")
        export_model(
            None,
            d,
            ranges=",".join(f"0-{n}" for n in layers if n > 1),
            progress=False,
            graph_name=graph,
            precision=precision,
        )
    return d


if __name__ == "__main__":
    raise SystemExit(main())
