"""`e2llm testbed run`: each method, each load, the same request stream, on the real
runtime over emulated devices; measured beside what the simulator predicts.

One seeded stream (Poisson arrivals, prompt and output lengths around the workload's
means, prompts of random ordinary tokens) is drawn at 1 request/s and scaled to each
rate. For every (rate, method) the cluster starts from nothing (a fresh broker, new
orchestrator and agents; the devices' profiles, measured once under their limits, stay),
the orchestrator plans with that method for that workload, the driver sends the stream
open-loop and the cluster stops again. Afterwards every answer is checked against the
local path, and the simulator serves the same stream with the plan the orchestrator made,
from the profiles the devices announced, with the output lengths the model really
produced. JSON holds both per run; the plot shows waiting time by method and load.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from e2llm_edge.ops.testbed import compare
from e2llm_edge.ops.testbed.bed import BROKER_PORT, CLUSTER, FOG, Testbed, cli
from e2llm_edge.ops.testbed.inventory import TestbedError, TestbedInventory
from planner.model import ModelSpec
from planner.workload import Request, Workload, load_azure_trace

FIRST_ORDINARY_TOKEN = 100
"""Prompt ids are drawn from here up (below lie the special tokens)."""


@dataclass(frozen=True)
class RunConfig:
    """What `e2llm testbed run` was asked."""

    inventory: TestbedInventory
    model_dir: Path
    methods: tuple[str, ...]
    rates: tuple[float, ...]
    requests: int
    prompt_tokens: float
    output_tokens: float
    seed: int = 0
    min_tokens_per_s: float = 15.0
    """Floor on each request's generation speed the planner keeps (the paper's 15)."""
    trace: Path | None = None
    """Take arrivals and lengths from this Azure trace, lengths scaled to the means."""
    name: str = "run"
    logs: Path | None = None
    check_answers: bool = True
    check_links: bool = True
    serving_timeout: float = 900.0


def make_stream(cfg: RunConfig, vocab: int, context: int) -> list[dict[str, Any]]:
    """The requests at 1 request/s: arrival_s, prompt_ids, max_new_tokens."""
    rng = np.random.default_rng(cfg.seed)
    if cfg.trace is None:
        base: Sequence[Request] = Workload(
            cfg.prompt_tokens, cfg.output_tokens, 1.0, max_context_tokens=context
        ).sample_requests(cfg.requests, rng)
    else:
        raw = load_azure_trace(cfg.trace, rate_rps=1.0, limit=cfg.requests)
        sp = cfg.prompt_tokens / np.mean([r.prompt_tokens for r in raw])
        so = cfg.output_tokens / np.mean([r.output_tokens for r in raw])
        base = [
            Request(
                r.id,
                r.arrival_s - raw[0].arrival_s,
                max(1, round(r.prompt_tokens * sp)),
                max(1, round(r.output_tokens * so)),
            )
            for r in raw
        ]
    return [
        {
            "arrival_s": r.arrival_s,
            "prompt_ids": rng.integers(FIRST_ORDINARY_TOKEN, vocab, r.prompt_tokens).tolist(),
            "max_new_tokens": min(r.output_tokens, context - r.prompt_tokens),
        }
        for r in base
    ]


def scaled(stream: list[dict[str, Any]], rate: float) -> list[dict[str, Any]]:
    return [{**r, "arrival_s": r["arrival_s"] / rate} for r in stream]


class Runner:
    """Holds the testbed through a whole experiment; `down` in every case."""

    def __init__(self, cfg: RunConfig, progress: Any) -> None:
        self.cfg = cfg
        self.progress = progress
        self.bed: Testbed | None = None

    def run(self) -> dict[str, Any]:
        from onnx_export.manifest import Manifest

        cfg = self.cfg
        manifest = Manifest.load(cfg.model_dir)
        vocab = int(manifest.config["vocab_size"])
        context = int(manifest.config.get("max_position", 2048))
        stream = make_stream(cfg, vocab, context)
        out: dict[str, Any] = {
            "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg()},
            "workload": {
                "prompt_tokens": cfg.prompt_tokens,
                "output_tokens": cfg.output_tokens,
                "requests": cfg.requests,
                "seed": cfg.seed,
                "min_tokens_per_s": cfg.min_tokens_per_s,
                "trace": str(cfg.trace) if cfg.trace else None,
                "rates": list(cfg.rates),
            },
            "methods": {m: asdict(compare.METHODS[m]) for m in cfg.methods},
            "inventory": cfg.inventory.to_dict(),
        }
        task = self.progress.add_task("testbed up", total=None)
        self.bed = bed = Testbed.create(cfg.name, cfg.inventory, cfg.model_dir, cfg.logs)
        try:
            out["profiles"] = bed.up(lambda s: self.progress.update(task, description=s))
            if cfg.check_links:
                self.progress.update(task, description="checking every limit")
                out["checks"] = [asdict(c) for c in bed.check()]
            self.progress.remove_task(task)
            runs = []
            total = self.progress.add_task("runs", total=len(cfg.rates) * len(cfg.methods))
            for rate in cfg.rates:
                for method in cfg.methods:
                    runs.append(self.one(method, rate, scaled(stream, rate)))
                    self.progress.advance(total)
            out["runs"] = runs
        finally:
            self.bed = None
            bed.down()
        out["machine"]["load_after"] = os.getloadavg()
        out["stream"] = stream  # at 1 request/s: the runs can be predicted again from here
        analyse(out, stream, cfg, self.progress)
        return out

    def one(self, method: str, rate: float, stream: list[dict[str, Any]]) -> dict[str, Any]:
        cfg, bed = self.cfg, self.bed
        assert bed is not None
        spec = compare.METHODS[method]
        if cfg.logs is not None:
            bed.logs = cfg.logs / f"{rate:g}-{method}"
        workload = Workload(cfg.prompt_tokens, cfg.output_tokens, rate)
        d = bed.state.dir / "runs" / f"{rate:g}-{method}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "stream.json").write_text(json.dumps(stream))
        task = self.progress.add_task(f"{method} @ {rate:g}/s: starting", total=len(stream))
        bed.reset_peaks()
        before = bed.device_usage()
        load0 = os.getloadavg()
        bed.start_cluster(spec.planner, workload, cfg.seed, cfg.min_tokens_per_s)
        try:
            ready = bed.wait_serving(cfg.serving_timeout)
        except TestbedError as exc:
            bed.stop_cluster()
            self.progress.remove_task(task)
            return {"method": method, "rate": rate, "error": str(exc)}
        self.progress.update(task, description=f"{method} @ {rate:g}/s")
        # CPU from here: what serving the stream cost each device, not loading its stage
        serving = bed.device_usage()
        t_serving = time.monotonic()
        driver = bed.spawn(
            "driver",
            FOG,
            cli(
                "testbed", "drive", "--broker", f"mqtt://127.0.0.1:{BROKER_PORT}",
                "--cluster", CLUSTER, "--stream", str(d / "stream.json"),
                "--out", str(d / "result.json"), "--devices", str(len(cfg.inventory.devices)),
                "--serving-timeout", f"{cfg.serving_timeout:g}",
            ),
            stdout=subprocess.PIPE,
        )  # fmt: skip
        assert driver.stdout is not None
        failed = 0
        for line in driver.stdout:
            ev = json.loads(line)
            if ev["event"] == "done":
                failed += not ev["ok"]
                self.progress.advance(task)
        rc = driver.wait()
        dead = bed.dead_processes(expected=("driver",))
        after = bed.device_usage()
        wall = time.monotonic() - t_serving
        bed.stop_role("driver")
        bed.stop_cluster()
        self.progress.remove_task(task)
        if rc != 0:
            raise TestbedError(
                f"{method} @ {rate:g}/s: the driver failed ({bed.log_tail('driver', 3)}); "
                f"{'; '.join(dead) or 'no process died'}"
            )
        result = json.loads((d / "result.json").read_text())
        return {
            "method": method,
            "rate": rate,
            "serving_after_s": ready,
            "load": [load0, os.getloadavg()],
            "plan": result["plan"],
            "inventory": result["inventory"],
            "requests": result["requests"],
            "counters": result["counters"],
            "devices": {
                k: {
                    "memory_peak_mb": v["memory_peak_mb"],
                    "memory_limit_mb": v["memory_limit_mb"],
                    "oom_kills": v["oom_kills"] - before[k]["oom_kills"],
                    "cpu_throttled_fraction": (v["cpu_throttled"] - before[k]["cpu_throttled"])
                    / max(1, v["cpu_periods"] - before[k]["cpu_periods"]),
                    "cpu_throttled_s": v["cpu_throttled_s"] - serving[k]["cpu_throttled_s"],
                    "cpu_s": v["cpu_s"] - serving[k]["cpu_s"],
                    "serving_wall_s": wall,
                }
                for k, v in after.items()
            },
            "dead_processes": dead,
        }


def local_answers(cfg: RunConfig, stream: list[dict[str, Any]], progress: Any) -> list[list[int]]:
    """Greedy answers of the local path (`LocalModel`) for every request of the stream."""
    from e2llm_edge.device.local import LocalModel

    model = LocalModel(cfg.model_dir, variant=(cfg.inventory.graph, cfg.inventory.precision))
    task = progress.add_task("local path answers", total=len(stream))
    out = []
    for r in stream:
        out.append(list(model.generate(r["prompt_ids"], r["max_new_tokens"])))
        progress.advance(task)
    progress.remove_task(task)
    return out


def analyse(
    out: dict[str, Any], stream: list[dict[str, Any]], cfg: RunConfig, progress: Any
) -> None:
    """Correctness, predictions, fidelity and the goals, added to `out`."""
    from e2llm_edge.fog.orchestrator import planning_model
    from onnx_export.manifest import Manifest

    expected = local_answers(cfg, stream, progress) if cfg.check_answers else None
    # the weights of the variant the agents ran, as the orchestrator planned with
    variant = f"{cfg.inventory.graph}/{cfg.inventory.precision}"
    model = planning_model(Manifest.load(cfg.model_dir), variant)
    for run in out["runs"]:
        if "error" in run:  # the method found no plan for these devices
            continue
        equal, differ = 0, 0
        for r in run["requests"]:
            ok = "error" not in r
            if ok and expected is not None:
                same = r["new_ids"] == expected[r["index"]]
                equal += same
                differ += not same
        run["answers"] = {
            "equal_local": equal if expected is not None else None,
            "differ": differ if expected is not None else None,
            "errors": sorted({r["error"] for r in run["requests"] if "error" in r}),
        }
        run["measured"] = measured = measure(run)
        lengths = [
            len(expected[i])
            if expected is not None
            else len(r.get("new_ids", [])) or s["max_new_tokens"]
            for i, (r, s) in enumerate(zip(run["requests"], stream, strict=True))
        ]
        run["predicted"] = predicted = predict(run, stream, lengths, out["workload"], model)
        run["fidelity"] = compare.fidelity(measured, predicted)
        run["sustained"] = compare.sustained(measured, run["rate"], len(stream))
        run["late_s_max"] = max((r["late_s"] for r in run["requests"]), default=0.0)
        # requests a device decoded per pass: 1 when a decoder's requests take turns through
        # its stages (micro-batches, as the simulator assumes), its concurrency when they
        # travel together
        run["decode_batch_mean"] = {
            dev: c["decode_steps"] / c["decode_batches"]
            for dev, c in run.get("counters", {}).items()
            if c.get("decode_batches")
        }
    out["goals"] = goals(out["runs"])


def measure(run: dict[str, Any]) -> dict[str, Any]:
    """The measured figures of one run, from the requests the driver recorded."""
    return compare.measured_metrics(
        [
            compare.Measured(
                index=r["index"],
                sent_s=r["sent_s"],
                done_s=r.get("done_s"),
                new_tokens=len(r.get("new_ids", [])),
                waiting_s=r.get("waiting_s"),
                ttft_s=r.get("ttft_s"),
                total_s=r.get("total_s"),
                error=r.get("error"),
            )
            for r in run["requests"]
        ]
    )


def predict(
    run: dict[str, Any],
    stream: list[dict[str, Any]],
    lengths: list[int],
    workload: dict[str, Any],
    model: ModelSpec,
) -> dict[str, Any]:
    """What the simulator predicts for one run: its plan and the inventory (profiles,
    links) the orchestrator planned with, the stream at the run's rate, the output
    lengths the model produced."""
    from planner.inventory import Inventory
    from planner.make import with_timings
    from planner.plan import Plan
    from planner.sim.cluster import simulate

    reqs = [
        Request(i, s["arrival_s"] / run["rate"], len(s["prompt_ids"]), max(1, n))
        for i, (s, n) in enumerate(zip(stream, lengths, strict=True))
    ]
    plan = Plan.from_dict(run["plan"])
    inv = Inventory.from_dict(run["inventory"], source=f"{run['method']} @ {run['rate']:g}/s")
    means = Workload(workload["prompt_tokens"], workload["output_tokens"], run["rate"])
    method = compare.METHODS[run["method"]]
    plan = with_timings(plan, inv, model, means)  # a run recorded before plans had them
    sim = simulate(plan, inv, model, means, reqs, routing=method.routing, bind=method.bind)
    return compare.predicted_metrics(sim)


def predict_again(out: dict[str, Any], model_dir: Path) -> dict[str, Any]:
    """`out` (a finished run's JSON) with every prediction made again by the simulator as
    it is now, and the figures computed again from the same recorded requests: how a
    change to the cost model fares against the same measured runs."""
    from e2llm_edge.fog.orchestrator import planning_model
    from onnx_export.manifest import Manifest

    if "stream" not in out:
        raise TestbedError("this JSON holds no stream (written before streams were kept)")
    bed = out.get("inventory") or {}
    variant = f"{bed.get('graph', 'standard')}/{bed.get('precision', 'fp32')}"
    model = planning_model(Manifest.load(model_dir), variant)
    stream = out["stream"]
    for run in out["runs"]:
        if "error" in run:
            continue
        lengths = [
            len(r.get("new_ids", [])) or s["max_new_tokens"]
            for r, s in zip(run["requests"], stream, strict=True)
        ]
        run["measured"] = measure(run)
        run["predicted"] = predict(run, stream, lengths, out["workload"], model)
        run["fidelity"] = compare.fidelity(run["measured"], run["predicted"])
        run["sustained"] = compare.sustained(run["measured"], run["rate"], len(stream))
    out["goals"] = goals(out["runs"])
    return out


def goals(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's goals, judged on these runs."""
    by = {(r["method"], r["rate"]): r for r in runs if "error" not in r}
    rates = sorted({r["rate"] for r in runs})
    out: dict[str, Any] = {}
    if any(m == "e2llm" for m, _ in by) and any(m == "splitwise" for m, _ in by):
        top = [x for x in rates if by.get(("e2llm", x), {}).get("sustained")][-2:]
        cells = []
        for x in top:
            if ("splitwise", x) not in by:
                cells.append({"rate": x, "splitwise": "no plan"})
                continue
            e, s = by[("e2llm", x)]["measured"], by[("splitwise", x)]["measured"]
            ratio = (
                e["waiting"]["mean"] / s["waiting"]["mean"]
                if s["waiting"]["mean"] > 0
                else float("nan")
            )
            cells.append(
                {
                    "rate": x,
                    "waiting_mean_ratio": ratio,
                    "waiting_ok": bool(ratio <= 0.5),
                    "ttft_p99_e2llm": e["ttft"]["p99"],
                    "ttft_p99_splitwise": s["ttft"]["p99"],
                    "ttft_ok": bool(e["ttft"]["p99"] <= s["ttft"]["p99"]),
                }
            )
        out["e2llm_vs_splitwise"] = {
            "rates": top,
            "cells": cells,
            "met": bool(cells) and all(c.get("waiting_ok") and c.get("ttft_ok") for c in cells),
        }
    misses = [
        f"{r['method']} @ {r['rate']:g}/s: {k} {v['relative_error']:+.0%}"
        for r in runs
        if "error" not in r
        for k, v in r["fidelity"].items()
        if not v["within"]
    ]
    judged = sum("error" not in r for r in runs)
    out["fidelity"] = {
        "tolerance": compare.FIDELITY_TOLERANCE,
        "runs": judged,
        "misses": misses,
        "met": judged > 0 and not misses,  # nothing served proves nothing
    }
    return out


def plot(out: dict[str, Any], path: Path) -> Path:
    """Mean waiting time and TTFT p99 by load, per method, measured beside predicted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(out["methods"])
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, stat, label) in zip(
        axes,
        (("waiting", "mean", "mean waiting time (s)"), ("ttft", "p99", "TTFT p99 (s)")),
        strict=True,
    ):
        for i, m in enumerate(methods):
            runs = sorted(
                (r for r in out["runs"] if r["method"] == m and "error" not in r),
                key=lambda r: r["rate"],
            )
            x = [r["rate"] for r in runs]
            c = colors[i % len(colors)]
            ax.plot(
                x, [r["measured"][metric][stat] for r in runs], "o-", color=c, label=f"{m} measured"
            )
            ax.plot(
                x,
                [r["predicted"][metric][stat] for r in runs],
                "x--",
                color=c,
                label=f"{m} predicted",
            )
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    w = out["workload"]
    fig.suptitle(
        f"testbed: {len(out['inventory']['devices'])} emulated devices, "
        f"{w['requests']} requests, prompt/output {w['prompt_tokens']:g}/{w['output_tokens']:g}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(out: dict[str, Any]) -> list[str]:
    """One line per run: measured / predicted for the figures the goals name."""
    lines = [
        f"{'method':<10} {'rate':>5}  {'waiting mean':>17} {'TTFT mean':>15} {'TTFT p99':>15} "
        f"{'TBT mean':>15} {'tput req/s':>15}  sustained  answers"
    ]
    for r in out["runs"]:
        if "error" in r:
            lines.append(f"{r['method']:<10} {r['rate']:>5g}  {r['error']}")
            continue

        def pair(key: str, stat: str | None, r: dict[str, Any] = r) -> str:
            a = r["measured"][key] if stat is None else r["measured"][key][stat]
            b = r["predicted"][key] if stat is None else r["predicted"][key][stat]
            return f"{a:7.3f}/{b:7.3f}"

        a = r["answers"]
        ans = (
            f"{a['equal_local']} equal, {a['differ']} differ"
            if a["equal_local"] is not None
            else "unchecked"
        )
        lines.append(
            f"{r['method']:<10} {r['rate']:>5g}  {pair('waiting', 'mean'):>17} "
            f"{pair('ttft', 'mean'):>15} {pair('ttft', 'p99'):>15} {pair('tbt', 'mean'):>15} "
            f"{pair('throughput_rps', None):>15}  {'yes' if r['sustained'] else 'no':>9}  {ans}"
            + (f"; {r['measured']['failed']} failed" if r["measured"]["failed"] else "")
        )
    return lines


def cpu_table(out: dict[str, Any]) -> list[str]:
    """Per run and device: the CPU seconds its agent ran while serving the stream, and
    the same divided by its quota (the seconds of its slowed clock they took, the unit of
    its profile), beside the busy seconds the simulator gave it (its stages' compute plus
    the hops feeding them); passes (prefills and decode batches) and what each pass cost
    beyond the simulator's figure; seconds the kernel held it back at its quota."""
    share = {d["id"]: d["cpu_percent"] / 100 for d in out["inventory"]["devices"]}
    lines = [
        f"{'method':<10} {'rate':>5}  {'device':<8} {'CPU s':>7} {'/quota':>7} {'sim busy':>8} "
        f"{'passes':>6} {'extra ms/pass':>13} {'throttled s':>11}"
    ]
    for r in out["runs"]:
        if "error" in r:
            continue
        busy = r["predicted"].get("busy_s", {})
        for dev, u in sorted(r["devices"].items()):
            c = r.get("counters", {}).get(dev, {})
            passes = c.get("prefills", 0) + c.get("decode_batches", 0)
            if dev not in busy or passes == 0:
                continue  # in no replica of this plan
            slowed = u.get("cpu_s", 0.0) / share[dev]
            lines.append(
                f"{r['method']:<10} {r['rate']:>5g}  {dev:<8} {u.get('cpu_s', 0.0):>7.2f} "
                f"{slowed:>7.2f} {busy[dev]:>8.2f} {passes:>6} "
                f"{1e3 * (slowed - busy[dev]) / passes:>13.1f} {u.get('cpu_throttled_s', 0):>11.2f}"
            )
    return lines
