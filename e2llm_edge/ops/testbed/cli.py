"""`e2llm testbed up|down|status|check|run` (and the `relay` and `drive` it starts)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Any

from e2llm_edge.ops.testbed.inventory import TestbedError, bundled_inventory


def _model_dir(args: argparse.Namespace) -> Path:
    from e2llm_edge.cli import _model_dir as resolve

    return resolve(args)


def _inventory(args: argparse.Namespace) -> Any:
    from e2llm_edge.ops.testbed.inventory import load_testbed_inventory

    return load_testbed_inventory(args.inventory or bundled_inventory())


def _workload(text: str) -> tuple[float, float]:
    try:
        p, o = (float(x) for x in text.split("/"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--workload must be PROMPT/OUTPUT, got {text!r}") from exc
    if p < 1 or o < 1:
        raise argparse.ArgumentTypeError(f"--workload needs lengths >= 1, got {text!r}")
    return p, o


def _rates(text: str) -> tuple[float, ...]:
    try:
        rates = tuple(float(x) for x in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"--rate must be numbers separated by commas: {text!r}"
        ) from exc
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"--rate values must be > 0, got {text!r}")
    return rates


def _methods(text: str) -> tuple[str, ...]:
    from e2llm_edge.ops.testbed.compare import METHODS

    ms = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [m for m in ms if m not in METHODS]
    if bad or not ms:
        raise argparse.ArgumentTypeError(
            f"unknown method {bad[0] if bad else ''!r} (have {sorted(METHODS)})"
        )
    return ms


def _teardown_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like Ctrl-C, so `finally: down()` runs."""

    def raise_interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, raise_interrupt)


def cmd_up(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.testbed.bed import CLUSTER, FOG, Testbed
    from planner import Workload

    inv = _inventory(args)
    model = _model_dir(args)
    bed = Testbed.create(args.name, inv, model)
    _teardown_on_signals()
    try:
        print(f"testbed {args.name}: {len(inv.devices)} devices", file=sys.stderr)
        bed.up(lambda s: print(f"  {s}...", file=sys.stderr))
        p, o = args.workload
        bed.start_cluster(args.method, Workload(p, o, args.rate), args.seed, args.min_tokens_per_s)
        print("  waiting for the cluster to serve...", file=sys.stderr)
        bed.wait_serving()
    except BaseException:
        bed.down()
        raise
    fog = bed.ns(FOG)
    print(
        f"up: broker 127.0.0.1:1883 in namespace {fog}; cluster {CLUSTER!r}, method {args.method}\n"
        f"  ip netns exec {fog} {sys.executable} -m e2llm_edge.cli generate "
        f'--broker mqtt://127.0.0.1:1883 --cluster {CLUSTER} "Hello"\n'
        f"  e2llm testbed status --name {args.name}\n"
        f"  e2llm testbed down --name {args.name}"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.testbed import system
    from e2llm_edge.ops.testbed.bed import down
    from e2llm_edge.ops.testbed.state import known_names

    system.require()
    names = known_names() if args.all else [args.name]
    for name in names:
        for line in down(name):
            print(line)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.testbed.bed import Testbed

    st = Testbed.attach(args.name).status()
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"testbed {st['name']} ({st['state_dir']}); cluster: {st['cluster'] or 'none'}")
    for role, p in sorted(st["processes"].items()):
        print(f"  {role:<24} pid {p['pid']:<8} {'running' if p['alive'] else 'DEAD'}")
    for dev, d in st["devices"].items():
        link = d["link"]
        print(
            f"  {dev:<12} cpu {d['cpu_percent']:g}%  memory {d['memory_mb']:g} MB (peak "
            f"{d['memory_peak_mb']:.0f}, OOM kills {d['oom_kills']})  "
            f"budget {d['budget_mb']:g} MB  "
            f"link {link['bandwidth_mbps']:g} Mbit/s {link['latency_ms']:g} ms  "
            f"throttled {d['cpu_throttled']}/{d['cpu_periods']} periods"
        )
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.testbed.bed import Testbed

    checks = Testbed.attach(args.name).check(oom=args.oom)
    for c in checks:
        print(
            f"{'ok  ' if c.ok else 'FAIL'} {c.device:<12} {c.what:<38} expected {c.expected:9.3f} "
            f"measured {c.measured:9.3f}  {c.detail}"
        )
    return 0 if all(c.ok for c in checks) else 1


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from e2llm_edge.ops.testbed.run import RunConfig, Runner, cpu_table, plot, table

    inv = _inventory(args)
    p, o = args.workload
    cfg = RunConfig(
        inventory=inv,
        model_dir=_model_dir(args),
        methods=args.methods,
        rates=args.rate,
        requests=args.requests,
        prompt_tokens=p,
        output_tokens=o,
        seed=args.seed,
        min_tokens_per_s=args.min_tokens_per_s,
        trace=Path(args.trace) if args.trace else None,
        name=args.name,
        logs=Path(args.logs) if args.logs else None,
        check_answers=not args.no_answer_check,
        check_links=not args.no_limit_check,
    )
    _teardown_on_signals()
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        out = Runner(cfg, progress).run()
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    for line in [*table(out), "", *cpu_table(out)]:
        print(line)
    for run in out["runs"]:
        pred, n = run.get("predicted") or {}, len(out.get("stream") or [])
        if pred and pred.get("completed", n) < n:
            print(
                f"note: the simulator serves {pred['completed']} of {n} requests of "
                f"{run['method']} @ {run['rate']:g}/s: the others exceed every replica's KV "
                "budget in the cost model, although the devices served them"
            )
    _verdicts(out)
    if args.plot:
        print(f"plot: {plot(out, Path(args.plot))}")
    print(f"json: {args.json}")
    return 0


def _verdicts(out: dict[str, Any]) -> None:
    g = out["goals"]
    if "e2llm_vs_splitwise" in g:
        e = g["e2llm_vs_splitwise"]
        verdict = "met" if e["met"] else "NOT met"
        print(f"goal e2llm waiting <= 0.5x splitwise, TTFT p99 no worse at {e['rates']}: {verdict}")
    f = g["fidelity"]
    said = "met" if f["met"] else "NOT met: " + ("; ".join(f["misses"]) or "no run was served")
    print(f"goal simulator within 25%: {said}")


def cmd_predict(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.testbed.run import cpu_table, plot, predict_again, table

    path = Path(args.json)
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TestbedError(f"{path}: not a testbed run's JSON ({exc})") from exc
    if not isinstance(out, dict) or not isinstance(out.get("runs"), list):
        raise TestbedError(f"{path}: not a testbed run's JSON (no list of runs)")
    from planner.errors import PlannerError
    from planner.sim.cluster import SimulationError

    try:
        out = predict_again(out, _model_dir(args))
    except (KeyError, TypeError, ValueError) as exc:
        raise TestbedError(f"{path}: a run lacks what predicting needs ({exc!r})") from exc
    except (PlannerError, SimulationError) as exc:
        raise TestbedError(f"{path}: the simulator cannot replay a run: {exc}") from exc
    for line in [*table(out), "", *cpu_table(out)]:
        print(line)
    for run in out["runs"]:
        pred, n = run.get("predicted") or {}, len(out.get("stream") or [])
        if pred and pred.get("completed", n) < n:
            print(
                f"note: the simulator serves {pred['completed']} of {n} requests of "
                f"{run['method']} @ {run['rate']:g}/s: the others exceed every replica's KV "
                "budget in the cost model, although the devices served them"
            )
    _verdicts(out)
    Path(args.out).write_text(json.dumps(out, indent=1))
    if args.plot:
        print(f"plot: {plot(out, Path(args.plot))}")
    print(f"json: {args.out}")
    return 0


def cmd_relay(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.testbed import relay

    return relay.main(args)


def cmd_drive(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.testbed import drive

    return drive.main(args)


def _guard(fn: Any) -> Any:
    """A testbed error is one line to the user, never a traceback."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except TestbedError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return run


def register(subparsers: Any) -> None:
    tb = subparsers.add_parser(
        "testbed", help="unequal emulated devices on this machine (root: cgroups, namespaces)"
    )
    sub = tb.add_subparsers(dest="testbed_command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--name", default="default", help="testbed name (a-z0-9, up to 12)")

    def setup(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument(
            "--inventory", help="testbed inventory YAML (default: the bundled 7 devices)"
        )
        p.add_argument("--model", help="model directory (default: the exported default model)")
        p.add_argument(
            "--workload", type=_workload, default=(128.0, 64.0), help="PROMPT/OUTPUT mean tokens"
        )
        p.add_argument("--seed", type=int, default=0)
        p.add_argument(
            "--min-tokens-per-s",
            type=float,
            default=15.0,
            help="floor on each request's generation speed the plan must keep",
        )

    p = sub.add_parser(
        "up", help="make the devices, profile them, start a cluster; leave it running"
    )
    setup(p)
    p.add_argument(
        "--method", default="e2llm", choices=["e2llm", "splitwise", "pipeline", "memprop"]
    )
    p.add_argument("--rate", type=float, default=0.2, help="arrival rate the plan is made for")
    p.set_defaults(func=_guard(cmd_up))

    p = sub.add_parser("down", help="remove everything a testbed made (idempotent)")
    common(p)
    p.add_argument("--all", action="store_true", help="every testbed with a state directory")
    p.set_defaults(func=_guard(cmd_down))

    p = sub.add_parser("status", help="devices, limits, links, processes of a testbed")
    common(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(cmd_status))

    p = sub.add_parser("check", help="prove each device's limits (quota, memory, rate, delay)")
    common(p)
    p.add_argument(
        "--oom",
        action="store_true",
        help="also allocate past each memory limit (idle devices only)",
    )
    p.set_defaults(func=_guard(cmd_check))

    p = sub.add_parser(
        "run", help="every method at every load on the same stream, measured and predicted"
    )
    setup(p)
    p.set_defaults(name="run")
    p.add_argument("--methods", type=_methods, default=("e2llm", "splitwise", "pipeline"))
    p.add_argument("--requests", type=int, default=60, help="requests per run")
    p.add_argument(
        "--rate", type=_rates, default=(0.1, 0.2, 0.3), help="loads, requests/s (comma-separated)"
    )
    p.add_argument(
        "--trace", help="Azure trace CSV: its arrivals and lengths, scaled to --workload and --rate"
    )
    p.add_argument("--json", required=True, help="results (measured and predicted per run)")
    p.add_argument("--plot", help="PNG: waiting time by method and load, measured and predicted")
    p.add_argument("--logs", help="keep every process's log here, per run")
    p.add_argument(
        "--no-answer-check", action="store_true", help="skip comparing answers with the local path"
    )
    p.add_argument(
        "--no-limit-check", action="store_true", help="skip proving the limits before the runs"
    )
    p.set_defaults(func=_guard(cmd_run))

    p = sub.add_parser(
        "predict", help="predict a finished run again with the simulator as it is now (no root)"
    )
    p.add_argument("--json", required=True, help="a run's JSON (e2llm testbed run --json)")
    p.add_argument("--out", required=True, help="where to write it with the new predictions")
    p.add_argument("--model", help="model directory (default: the exported default model)")
    p.add_argument("--plot", help="PNG of the measured and the new predicted figures")
    p.set_defaults(func=_guard(cmd_predict))

    p = sub.add_parser("relay", help="(started by up) a TCP relay adding a fixed delay each way")
    p.add_argument("--listen", required=True, help="HOST:PORT to accept connections on")
    p.add_argument("--to", required=True, help="HOST:PORT to relay them to (the broker)")
    p.add_argument("--delay-ms", type=float, required=True, help="added one-way delay")
    p.set_defaults(func=cmd_relay)

    p = sub.add_parser("drive", help="(started by run) send a recorded request stream, open loop")
    p.add_argument("--broker", required=True, help="mqtt://host:port of the testbed's broker")
    p.add_argument("--cluster", required=True)
    p.add_argument(
        "--stream", required=True, help="JSON: [{arrival_s, prompt_ids, max_new_tokens}]"
    )
    p.add_argument("--out", required=True, help="where to write the results (JSON)")
    p.add_argument("--devices", type=int, required=True, help="devices whose profiles to wait for")
    p.add_argument("--serving-timeout", type=float, default=900.0)
    p.add_argument(
        "--request-timeout",
        type=float,
        default=900.0,
        help="seconds a request may go without any event (it may queue that long)",
    )
    p.set_defaults(func=cmd_drive)
