"""`e2llm plan` and `e2llm simulate`: registered into the main CLI by `register(subparsers)`.

Each subcommand sets `func(args) -> int` (the exit status). matplotlib is imported only
when a plot is drawn.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from planner.errors import ModelSpecError, PlannerError, yaml_problem
from planner.inventory import load_inventory
from planner.methods import METHODS
from planner.model import ModelSpec, load_model_description
from planner.workload import Workload

DEFAULT_TRACE = "/work/shared/data/traces/AzureLLMInferenceTrace_conv.csv"


def register(subparsers: Any) -> None:
    """Add the `plan` and `simulate` subcommands to an argparse subparsers object."""
    p = subparsers.add_parser("plan", help="plan replicas, roles and layer splits (YAML out)")
    p.add_argument("--inventory", required=True, help="device inventory YAML")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="exporter manifest YAML of the model")
    src.add_argument("--model", help="model description YAML (see planner/data/*.yaml)")
    p.add_argument("--prompt-tokens", type=float, required=True, help="mean prompt length")
    p.add_argument("--output-tokens", type=float, required=True, help="mean output length")
    p.add_argument("--rate", type=float, required=True, help="arrival rate, requests/s")
    p.add_argument("--method", choices=METHODS, default="e2llm")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--version", type=int, default=1)
    p.add_argument(
        "--min-tokens-per-s",
        type=float,
        default=15.0,
        help="per-request generation speed floor (default 15)",
    )
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("-o", "--out", help="write the plan here instead of stdout")
    p.set_defaults(func=cmd_plan)

    s = subparsers.add_parser(
        "simulate", help="reproduce the paper's comparison in the simulator (table + PNG)"
    )
    s.add_argument("--inventory", help="inventory YAML (default: the paper's testbed)")
    s.add_argument("--model", help="model description or manifest YAML (default: paper 20B)")
    s.add_argument(
        "--workloads",
        default="576/588,2284/1004",
        help="comma-separated prompt/output means (default: the paper's)",
    )
    s.add_argument("--intervals", default="0.5,1,2,3", help="mean arrival intervals, s")
    s.add_argument("--requests", type=int, default=1000, help="requests per run")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--methods", default=",".join(METHODS))
    s.add_argument(
        "--trace",
        nargs="?",
        const=DEFAULT_TRACE,
        default=None,
        help=f"also replay an Azure trace (default file: {DEFAULT_TRACE})",
    )
    s.add_argument(
        "--trace-rates", default="0.5,1", help="requests/s the trace is time-scaled to (edge rates)"
    )
    s.add_argument("--out", default="runs/simulate", help="directory for table and PNGs")
    s.add_argument("--no-plot", action="store_true", help="skip the PNGs")
    s.add_argument(
        "--no-ablation",
        action="store_true",
        help="skip the splitwise+jsq_time row (Splitwise's plan, E2LLM's routing)",
    )
    s.set_defaults(func=cmd_simulate)


def _model(path: str) -> ModelSpec:
    return load_model_description(path)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print or write a plan."""
    from planner.make import make_plan

    try:
        inventory = load_inventory(args.inventory)
        if args.manifest:
            try:
                manifest = yaml.safe_load(Path(args.manifest).read_text())
            except yaml.YAMLError as e:
                raise ModelSpecError(f"{args.manifest}: not valid YAML: {yaml_problem(e)}") from e
            model = ModelSpec.from_manifest(manifest)
        else:
            model = _model(args.model)
        workload = Workload(args.prompt_tokens, args.output_tokens, args.rate)
        plan = make_plan(
            inventory,
            model,
            workload,
            method=args.method,
            seed=args.seed,
            version=args.version,
            min_tokens_per_s=args.min_tokens_per_s,
            max_concurrency=args.max_concurrency,
        )
    except (PlannerError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = plan.to_yaml()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def _floats(text: str, flag: str) -> list[float]:
    """Comma-separated positive numbers (intervals and rates: a zero would divide by it)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"{flag}: expected comma-separated numbers > 0, got {text!r}")
    return values


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the paper's grid (and optionally a trace); print and write tables and plots."""
    from planner.sim import paper

    try:
        inventory = load_inventory(args.inventory) if args.inventory else paper.paper_inventory()
        model = _model(args.model) if args.model else paper.paper_model()
        workloads = [tuple(float(v) for v in w.split("/")) for w in args.workloads.split(",")]
        if any(len(w) != 2 for w in workloads):
            raise ValueError(
                f"--workloads must look like 576/588,2284/1004, got {args.workloads!r}"
            )
        methods = [m for m in args.methods.split(",") if m]
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad} (expected some of {list(METHODS)})")
        rows = paper.reproduce(
            inventory,
            model,
            workloads=[(w[0], w[1]) for w in workloads],
            intervals=_floats(args.intervals, "--intervals"),
            n_requests=args.requests,
            seed=args.seed,
            methods=methods,
            ablation=not args.no_ablation,
        )
        trace_rows = []
        if args.trace:
            trace_rows = paper.reproduce_trace(
                inventory,
                model,
                args.trace,
                rates_rps=_floats(args.trace_rates, "--trace-rates"),
                n_requests=args.requests,
                seed=args.seed,
                methods=methods,
                ablation=not args.no_ablation,
            )
    except (PlannerError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = [
        f"# Simulated mean waiting time ({args.requests} requests per cell, seed "
        f"{args.seed}, {len(inventory)} devices, model {model.name})",
        "",
        paper.table(rows),
    ]
    if trace_rows:
        text += [
            "",
            f"## Azure trace {args.trace}, first {args.requests} requests, time-scaled "
            "to the given rates (interval = 1/rate), prompts clipped to 4096 tokens "
            "(Patel et al., Splitwise, ISCA 2024; CC BY 4.0)",
            "",
            paper.table(trace_rows),
        ]
    report = "\n".join(text) + "\n"
    print(report)
    (out / "simulate.md").write_text(report)
    if not args.no_plot:
        png = paper.plot(
            rows,
            out / "waiting_vs_interval.png",
            title=f"E2LLM vs baselines, simulated ({model.name})",
        )
        print(f"wrote {png}")
        if trace_rows:
            tpng = paper.plot(
                trace_rows,
                out / "trace_waiting_vs_interval.png",
                title="Azure conversation trace, time-scaled to edge rates",
            )
            print(f"wrote {tpng}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m planner.cli ...`) until the main CLI wires us in."""
    parser = argparse.ArgumentParser(prog="e2llm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    status: int = args.func(args)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
