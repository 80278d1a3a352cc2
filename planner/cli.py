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
from planner.metrics import SLO
from planner.model import ModelSpec, load_model_description
from planner.pools import POOLS, pool
from planner.routing import POLICIES
from planner.workload import TRACES, Workload, load_phases


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
    _limits(p)
    p.add_argument("-o", "--out", help="write the plan here instead of stdout")
    p.set_defaults(func=cmd_plan)

    s = subparsers.add_parser(
        "simulate", help="compare E2LLM with the baselines in the simulator (table + PNG)"
    )
    s.add_argument(
        "--pool",
        choices=sorted(POOLS),
        default="paper",
        help="bundled devices and model: "
        + "; ".join(f"{k}: {v.about}" for k, v in sorted(POOLS.items())),
    )
    s.add_argument("--inventory", help="inventory YAML (instead of the pool's)")
    s.add_argument("--model", help="model description or manifest YAML (instead of the pool's)")
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
        "--routing",
        choices=("best", *POLICIES),
        default="best",
        help="routing policy; best (default): each method with every policy, reported at "
        "its strongest",
    )
    _limits(s)
    s.add_argument(
        "--slo-ttft", type=float, default=10.0, help="goodput: largest TTFT in s (default 10)"
    )
    s.add_argument(
        "--trace",
        nargs="?",
        const="conv",
        default=None,
        help=f"replay an Azure trace instead: a shipped one ({', '.join(TRACES)}; default "
        "conv) or a CSV file",
    )
    s.add_argument(
        "--trace-rates", default="0.5,1", help="requests/s the trace is time-scaled to (edge rates)"
    )
    s.add_argument(
        "--phases",
        help="a drifting stream instead: YAML list of phases (prompt_tokens, output_tokens, "
        "rate or interval_s, requests or duration_s); adds E2LLM re-planning online",
    )
    s.add_argument("--out", default="runs/simulate", help="directory for table and PNG")
    s.add_argument("--no-plot", action="store_true", help="skip the PNG")
    s.set_defaults(func=cmd_simulate)


def _limits(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--min-tokens-per-s",
        type=float,
        default=15.0,
        help="per-request generation speed floor (default 15, the paper's)",
    )
    p.add_argument(
        "--max-concurrency",
        type=int,
        default=16,
        help="most requests a decoder runs at once (default 16)",
    )


def _model(path: str) -> ModelSpec:
    return load_model_description(path)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print or write a plan; its predicted capacity and the bound go to stderr."""
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
    except (PlannerError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = plan.to_yaml()
    if args.out:
        Path(args.out).write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text, end="")
    print(
        f"predicted capacity {plan.figure('capacity_rps', 0.0):.3f} req/s; upper bound "
        f"{plan.figure('capacity_bound_rps', 0.0):.3f} req/s "
        f"(gap {100 * plan.figure('gap_to_bound', 0.0):.0f}%)",
        file=sys.stderr,
    )
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
    """Run the comparison (the paper's grid, a trace or a drifting stream); print and
    write the table and the plot."""
    from planner.sim import paper

    floor = args.min_tokens_per_s
    try:
        inventory, model, _ = pool(args.pool)
        if args.inventory:
            inventory = load_inventory(args.inventory)
        if args.model:
            model = _model(args.model)
        if floor <= 0 or args.max_concurrency < 1:
            raise ValueError(
                "--min-tokens-per-s must be > 0 and --max-concurrency >= 1, got "
                f"{floor:g} and {args.max_concurrency}"
            )
        methods = [m for m in args.methods.split(",") if m]
        bad = [m for m in methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown methods {bad} (expected some of {list(METHODS)})")
        policies = POLICIES if args.routing == "best" else (args.routing,)
        slo = SLO(ttft_s=args.slo_ttft, tbt_s=1.0 / floor)
        common: dict[str, Any] = {
            "methods": methods,
            "seed": args.seed,
            "min_tokens_per_s": floor,
            "max_concurrency": args.max_concurrency,
            "policies": policies,
            "slo": slo,
        }
        if args.phases:
            phased = load_phases(args.phases)
            rows = paper.run_phases(inventory, model, phased, **common)
            what = f"drifting stream {args.phases} ({len(phased.phases)} phases)"
        elif args.trace:
            rows = paper.reproduce_trace(
                inventory,
                model,
                args.trace,
                rates_rps=_floats(args.trace_rates, "--trace-rates"),
                n_requests=args.requests,
                **common,
            )
            what = (
                f"Azure trace {args.trace} (Patel et al., Splitwise, ISCA 2024; CC BY 4.0), "
                f"first {args.requests} requests time-scaled to {args.trace_rates} req/s "
                "(interval = 1/rate), prompts clipped to 4096 tokens"
            )
        else:
            try:
                workloads = [
                    tuple(float(v) for v in w.split("/")) for w in args.workloads.split(",")
                ]
            except ValueError:
                workloads = []
            if not workloads or any(len(w) != 2 or min(w) <= 0 for w in workloads):
                raise ValueError(
                    f"--workloads must look like 576/588,2284/1004, got {args.workloads!r}"
                )
            rows = paper.reproduce(
                inventory,
                model,
                workloads=[(w[0], w[1]) for w in workloads],
                intervals=_floats(args.intervals, "--intervals"),
                n_requests=args.requests,
                **common,
            )
            what = f"{args.requests} requests per cell"
    except (PlannerError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if paper.all_infeasible(rows):
        reason = next((r.note for r in rows if r.method == "e2llm"), rows[0].note)
        print(
            f"error: with --min-tokens-per-s {floor:g} and --max-concurrency "
            f"{args.max_concurrency} every method is infeasible on these {len(inventory)} "
            f"devices: {reason}",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Simulated serving: {what}; seed {args.seed}, {len(inventory)} devices, model "
        f"{model.name}, floor {floor:g} tokens/s, max concurrency {args.max_concurrency}; "
        f"goodput SLO TTFT <= {slo.ttft_s:g} s and TBT <= {1000 * slo.tbt_s:.0f} ms; "
        "* marks each method's strongest routing"
    )
    report = "\n".join([header, "", paper.table(rows)]) + "\n"
    print(report)
    (out / "simulate.md").write_text(report)
    if not args.no_plot and not args.phases:
        png = paper.plot(
            rows,
            out / "waiting_vs_interval.png",
            title=f"E2LLM vs baselines, simulated ({model.name})",
        )
        print(f"wrote {png}")
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
