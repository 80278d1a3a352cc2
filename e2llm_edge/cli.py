"""The `e2llm` command. Each subcommand is a small function; the work lives in the modules."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from e2llm_edge.errors import ConfigError, E2LLMError
from onnx_export.errors import ExportError

if TYPE_CHECKING:
    from e2llm_edge.params import GenerationParams
    from e2llm_edge.wire.bus import BusConfig

log = logging.getLogger("e2llm")


def _model_dir(args: argparse.Namespace) -> Path:
    """The model directory to use; the default model is fetched and exported on first use."""
    from onnx_export.export import default_model_dir, export_model

    if args.model:
        p = Path(args.model)
        if (p / "manifest.yaml").is_file():
            return p
        if p.is_dir() and not (p / "config.json").is_file():
            raise ExportError(f"{p}: no manifest.yaml (not an exported model directory)")
        out = default_model_dir().parent / p.stem
        export_model(p, out, progress=sys.stderr.isatty())
        return out
    d = default_model_dir()
    if not (d / "manifest.yaml").is_file():
        print("exporting the default model (first run only)...", file=sys.stderr)
    export_model(None, d, progress=sys.stderr.isatty())
    return d


def cmd_export(args: argparse.Namespace) -> int:
    from onnx_export.export import export_model

    t0 = time.perf_counter()
    variant = _variant(args)
    m = export_model(
        args.source,
        args.out,
        ranges=args.ranges,
        progress=not args.quiet,
        variants=[variant] if variant else None,
    )
    total = sum(s.bytes for s in m.segments)
    print(
        f"{m.directory}: {len(m.segments)} segments, {total / 1e6:.1f} MB, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    return 0


def generation_params(args: argparse.Namespace) -> GenerationParams:
    """The request's parameters from the flags, checked before anything is loaded or sent
    (the same checks the cluster makes; the context window is checked once tokenized)."""
    from e2llm_edge.params import GenerationParams, check_prompt

    check_prompt(args.prompt)
    return GenerationParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        raw=args.raw,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    params = generation_params(args)
    if args.broker:
        from e2llm_edge.client import run_generate_cli

        return run_generate_cli(args)
    from e2llm_edge.device.local import GenerationStats, LocalModel
    from e2llm_edge.fog.textio import ChatTokenizer, StreamDecoder
    from e2llm_edge.params import validate

    model = LocalModel(_model_dir(args), threads=args.threads, variant=_variant(args))
    tok = ChatTokenizer(model.manifest)
    ids = tok.encode_prompt(args.prompt, raw=params.raw)
    validate(params, ids, model.limits)
    stats = GenerationStats()
    stream = StreamDecoder(tok)
    new_ids: list[int] = []
    for t in model.generate(ids, params.max_new_tokens, params.sampling(), stats):
        new_ids.append(t)
        if not args.json:
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_ids": ids,
                    "new_ids": new_ids,
                    "text": tok.decode(new_ids),
                    "stats": {
                        "prompt_tokens": stats.prompt_tokens,
                        "new_tokens": stats.new_tokens,
                        "prefill_s": round(stats.prefill_s, 4),
                        "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2),
                    },
                }
            )
        )
    else:
        print()
        print(
            f"[{stats.prompt_tokens} prompt tokens, prefill {stats.prefill_s * 1e3:.0f} ms; "
            f"{stats.new_tokens} new tokens, {stats.decode_tokens_per_s:.1f} tokens/s]",
            file=sys.stderr,
        )
    return 0


def _variant(args: argparse.Namespace) -> tuple[str, str] | None:
    """--graph/--precision as a (graph, precision) pair; None lets the model choose."""
    graph, precision = getattr(args, "graph", None), getattr(args, "precision", None)
    if graph is None and precision is None:
        return None
    if graph is None:
        graph = "standard" if precision == "fp32" else "contrib"
    return graph, precision or {"standard": "fp32", "contrib": "exact"}[graph]


def _number(kind: type[float] | type[int], minimum: float, inclusive: bool) -> Any:
    """An argparse ``type`` that also refuses values out of range, in argparse's one line."""
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value >= minimum if inclusive else value > minimum):  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    return parse


positive_int = _number(int, 1, inclusive=True)
non_negative_int = _number(int, 0, inclusive=True)
positive_float = _number(float, 0, inclusive=False)
non_negative_float = _number(float, 0, inclusive=True)


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (a user message unless --raw)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def read_password_file(path: str) -> str:
    """The password in a ``--password-file`` (one line, as ``e2llm broker init`` writes)."""
    try:
        password = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ConfigError(f"--password-file {path}: cannot read it ({why})") from None
    if not password:
        raise ConfigError(f"--password-file {path}: the file is empty")
    return password


def _bus_config(
    args: argparse.Namespace, client_id: str | None = None, *, service: bool = False
) -> BusConfig:
    """The broker settings from the flags: TLS with ``--identity DIR`` (its certificate's
    name is the user name), or ``--username``/``--password-file`` (the plaintext lab mode).
    A ``service`` (agent, orchestrator) waits for a broker that is not up yet; one-shot
    commands fail at once with the reason."""
    from e2llm_edge.wire.bus import BusConfig

    over: dict[str, object] = {"cluster": args.cluster, "wait_for_broker": service}
    if client_id:
        over["client_id"] = client_id
    if getattr(args, "username", None):
        over["username"] = args.username
    if getattr(args, "password_file", None):
        over["password"] = read_password_file(args.password_file)
    identity = getattr(args, "identity", None)
    if identity:
        _check_identity(args, identity)
    return BusConfig.from_url(args.broker, identity=identity, **over)


def _check_identity(args: argparse.Namespace, identity: str) -> None:
    """An identity used where the ACL will deny it everything is refused here, in words:
    another cluster's, a device's for another device, the orchestrator's role."""
    from e2llm_edge.errors import BusTLSError
    from e2llm_edge.wire.tls import read_identity

    info = read_identity(identity)
    name, role, cluster = info["name"], info.get("role"), info.get("cluster")
    why = None
    if cluster and cluster != args.cluster:
        why = f"is for cluster {cluster!r}, not {args.cluster!r}: pass --cluster {cluster}"
    elif args.command == "agent" and name != args.device_id:
        why = f"is {name!r}, not device {args.device_id!r}"
    elif args.command == "orchestrator" and role and role != "orchestrator":
        why = f"is the {role} {name!r}, not the orchestrator"
    if why:
        raise BusTLSError("bad_identity", args.broker, f"identity {identity} {why}")


def _link(args: argparse.Namespace) -> Any:
    from e2llm_edge.wire.messages import LinkSpec

    if args.bandwidth_mbps is None and args.latency_ms is None:
        return None
    return LinkSpec(bandwidth_mbps=args.bandwidth_mbps or 1000.0, latency_ms=args.latency_ms or 0.5)


def cmd_agent(args: argparse.Namespace) -> int:
    import asyncio

    from e2llm_edge.device.agent import Agent, AgentConfig

    cfg = AgentConfig(
        device_id=args.device_id,
        bus=_bus_config(args, client_id=f"agent-{args.device_id}", service=True),
        model_dir=_model_dir(args),
        memory_mb=args.memory_mb,
        threads=args.threads,
        link=_link(args),
        request_timeout=args.request_timeout,
        variant=_variant(args),
        stage_timeout=args.stage_timeout,
        kv_window=max(1, args.kv_window),
        telemetry_interval=args.telemetry_interval,
    )
    asyncio.run(Agent(cfg).run())
    return 0


def check_orchestrator_files(args: argparse.Namespace) -> None:
    """Read ``--inventory`` and ``--plan`` now, so a bad file is one line at start and not
    a crash when the first plan is made. The inventory needs only ids and memory budgets:
    agents announce their measured profiles and links."""
    import yaml

    from planner import Plan, load_inventory
    from planner.errors import PlanError, yaml_problem

    if args.inventory:
        load_inventory(args.inventory, require_costs=False)
    if args.plan:
        try:
            Plan.from_dict(yaml.safe_load(Path(args.plan).read_text()))
        except OSError as exc:
            raise ConfigError(f"--plan {args.plan}: cannot read it ({exc.strerror})") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"--plan {args.plan}: not valid YAML: {yaml_problem(exc)}") from None
        except PlanError as exc:
            raise ConfigError(f"--plan {args.plan}: {exc}") from None


def cmd_orchestrator(args: argparse.Namespace) -> int:
    import asyncio

    from e2llm_edge.fog.orchestrator import Orchestrator, OrchestratorConfig
    from planner import Workload
    from planner.drift import DriftConfig

    check_orchestrator_files(args)
    name = args.id or f"orchestrator-{socket.gethostname()}-{os.getpid()}"
    cfg = OrchestratorConfig(
        orchestrator_id=name,
        standby=args.standby,
        lease_ttl_s=args.lease_ttl,
        bus=_bus_config(args, client_id=name, service=True),
        model_dir=_model_dir(args),
        inventory_path=Path(args.inventory) if args.inventory else None,
        expect_devices=args.expect_devices,
        method=args.method,
        seed=args.seed,
        fixed_plan=Path(args.plan) if args.plan else None,
        workload=Workload(args.mean_prompt, args.mean_output, args.rate),
        min_tokens_per_s=args.min_tokens_per_s,
        request_timeout=args.request_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        drain_timeout=args.drain_timeout,
        regroup_after=args.regroup_after,
        max_retries=args.max_retries,
        drift=DriftConfig(
            window_s=args.drift_window,
            tick_s=args.drift_check_every,
            min_arrivals=args.drift_min_requests,
            relayout=not args.drift_flips_only,
        )
        if args.replan_on_drift
        else None,
    )
    asyncio.run(Orchestrator(cfg).run())
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    import yaml

    from e2llm_edge.device.fast_runner import check_variant, choose_variant
    from e2llm_edge.device.profile import load_or_measure_profile, measure_profile, profile_path
    from e2llm_edge.device.runner import configure_threads
    from onnx_export.manifest import Manifest

    manifest = Manifest.load(_model_dir(args))
    variant = _variant(args) or choose_variant(manifest)
    check_variant(manifest, *variant)
    if args.fresh:
        prof = measure_profile(manifest, args.threads, variant=variant)
    else:
        prof = load_or_measure_profile(manifest, args.threads, variant=variant)
        where = profile_path(manifest, configure_threads(args.threads), variant)
        print(f"# cached at {where}", file=sys.stderr)
    print(yaml.safe_dump({"profile": prof}, sort_keys=False), end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.demo import check_demo_args, run_demo

    inventory = check_demo_args(args)  # before a model is exported or a process started
    return run_demo(args, _model_dir(args), inventory)


def cmd_gateway(args: argparse.Namespace) -> int:
    from e2llm_edge.fog.gateway import cmd_gateway as run

    return run(args, _model_dir(args))


def cmd_up(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.up import run_up

    return run_up(args, _model_dir(args))


def cmd_chat(args: argparse.Namespace) -> int:
    from e2llm_edge.ops.chat import run_chat

    return run_chat(args, _model_dir(args) if args.broker else None)


def add_gateway_args(p: argparse.ArgumentParser, port: int = 8000) -> None:
    """How the OpenAI-compatible HTTP API listens (gateway and up)."""
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=port, help="TCP port of the HTTP API")
    p.add_argument("--api-key-file", help="file of accepted API keys, one per line (Bearer)")
    p.add_argument("--model-id", help="model name clients pass (default: the model directory's)")
    p.add_argument(
        "--max-in-flight", type=int, default=256, help="requests served at once (429 beyond)"
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=120.0,
        help="seconds without an answer from the cluster before 504",
    )
    p.add_argument(
        "--max-body-bytes", type=int, default=1024 * 1024, help="largest request body (413 beyond)"
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    """What runs the model here: which model directory, threads and graph variant."""
    p.add_argument("--model", help="model directory or source (default: SmolLM2-135M)")
    p.add_argument(
        "--threads", type=positive_int, help="onnxruntime threads (default: usable CPUs)"
    )
    p.add_argument(
        "--graph",
        choices=["standard", "contrib"],
        help="graph variant to run (default: the best this machine supports)",
    )
    p.add_argument("--precision", help="fp32 (standard); exact or int8 (contrib)")


def add_broker_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--broker", required=required, help="mqtts://host:8883 (mqtt:// for a lab)")
    p.add_argument("--cluster", default="default", help="topics live under e2llm/<cluster>/")
    add_login_args(p)


def add_login_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--identity",
        metavar="DIR",
        help="this process's identity directory from `e2llm broker init` "
        "(ca.crt, client.crt, client.key): TLS with a client certificate",
    )
    p.add_argument("--username", help="broker user, plaintext lab mode (default: anonymous)")
    p.add_argument("--password-file", help="file holding the broker password (lab mode)")


def build_parser() -> argparse.ArgumentParser:
    from planner.methods import METHODS

    ap = argparse.ArgumentParser(prog="e2llm", description=__doc__)
    ap.add_argument("-v", "--verbose", action="count", default=0)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="cut a model into ONNX segments")
    p.add_argument("source", nargs="?", help="a .gguf file or HF directory (default: SmolLM2-135M)")
    p.add_argument("--out", help="model directory to write (default: the cache)")
    p.add_argument("--ranges", help="extra layer-range segments, e.g. 0-10,10-20,20-30")
    p.add_argument(
        "--graph",
        choices=["standard", "contrib"],
        help="standard ONNX ops (portable) or com.microsoft contrib ops (fast); "
        "default: both, standard/fp32 and contrib/exact (a mixture of experts: contrib only)",
    )
    p.add_argument("--precision", help="fp32 (standard); exact or int8 (contrib)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate locally, or on a cluster with --broker")
    add_generate_args(p)
    add_run_args(p)
    p.add_argument("--broker", help="mqtts://host:8883 of a running cluster")
    p.add_argument("--cluster", default="default")
    add_login_args(p)
    p.add_argument(
        "--timeout", type=positive_float, default=120.0, help="seconds to wait for the answer"
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("agent", help="run a device agent")
    add_broker_args(p)
    p.add_argument("--device-id", required=True)
    p.add_argument(
        "--memory-mb",
        type=positive_float,
        required=True,
        help="memory budget for weights + KV cache announced to the planner",
    )
    add_run_args(p)
    p.add_argument("--bandwidth-mbps", type=positive_float, help="this device's link to the broker")
    p.add_argument("--latency-ms", type=non_negative_float)
    p.add_argument(
        "--request-timeout",
        type=positive_float,
        default=120.0,
        help="seconds without progress before a request's KV cache is freed",
    )
    p.add_argument(
        "--stage-timeout",
        type=positive_float,
        default=30.0,
        help="seconds of queued work without progress before reporting error",
    )
    p.add_argument(
        "--kv-window",
        type=int,
        default=4,
        help="KV chunks of a handoff in flight at once (1: each acknowledged before the next)",
    )
    p.add_argument(
        "--telemetry-interval",
        type=float,
        default=2.0,
        help="seconds between telemetry, state and heartbeat messages",
    )
    p.set_defaults(func=cmd_agent)

    p = sub.add_parser("orchestrator", help="run the fog orchestrator")
    add_broker_args(p)
    p.add_argument("--model", help="model directory (default: the exported default model)")
    p.add_argument("--inventory", help="YAML naming expected devices (hardware, links)")
    p.add_argument(
        "--expect-devices", type=positive_int, help="devices to wait for before planning"
    )
    p.add_argument("--plan", help="pin this plan (YAML) while all its devices are present")
    p.add_argument(
        "--id",
        help="this orchestrator's name, unique per instance (default: orchestrator-<host>-<pid>)",
    )
    p.add_argument(
        "--standby",
        action="store_true",
        help="stand by: take over (no device reloads) when the serving orchestrator dies",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=3.0,
        help="seconds without a lease renewal after which a standby takes over",
    )
    p.add_argument("--method", default="e2llm", choices=METHODS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mean-prompt", type=positive_float, default=256, help="workload: mean prompt tokens"
    )
    p.add_argument(
        "--mean-output", type=positive_float, default=128, help="workload: mean new tokens"
    )
    p.add_argument("--rate", type=positive_float, default=0.5, help="workload: requests per second")
    p.add_argument(
        "--min-tokens-per-s",
        type=positive_float,
        default=15.0,
        help="floor on each request's generation speed a decoder must keep (the paper's 15)",
    )
    p.add_argument(
        "--request-timeout",
        type=positive_float,
        default=60.0,
        help="seconds without progress before a request is restarted",
    )
    p.add_argument(
        "--heartbeat-timeout",
        type=positive_float,
        default=6.0,
        help="seconds of silence before a device of the plan counts as lost",
    )
    p.add_argument(
        "--drain-timeout",
        type=non_negative_float,
        default=10.0,
        help="how long requests in flight may finish before a plan switch",
    )
    p.add_argument(
        "--regroup-after",
        type=non_negative_float,
        default=30.0,
        help="after a device loss, seconds before devices left without a replica "
        "are regrouped by a new plan (the surviving replicas serve at once)",
    )
    p.add_argument(
        "--max-retries",
        type=non_negative_int,
        default=5,
        help="restarts after faults before a request fails",
    )
    p.add_argument(
        "--replan-on-drift",
        action="store_true",
        help="measure the live mix (prompt/output lengths, rate) and re-plan when a switch "
        "pays: preferably a role or concurrency flip (no reload), else a re-layout",
    )
    p.add_argument(
        "--drift-window",
        type=positive_float,
        default=120.0,
        help="seconds of requests the live mix is measured over (default 120)",
    )
    p.add_argument(
        "--drift-check-every",
        type=positive_float,
        default=10.0,
        help="seconds between drift checks (default 10)",
    )
    p.add_argument(
        "--drift-min-requests",
        type=positive_int,
        default=20,
        help="arrivals in the window before the mix is trusted (default 20)",
    )
    p.add_argument(
        "--drift-flips-only",
        action="store_true",
        help="on drift, only flip roles/concurrency on the same layouts (never reload weights)",
    )
    p.set_defaults(func=cmd_orchestrator)

    p = sub.add_parser("profile", help="measure this device's per-layer costs")
    add_run_args(p)
    p.add_argument("--fresh", action="store_true", help="measure even if a profile is cached")
    p.set_defaults(func=cmd_profile)

    p = sub.add_parser("demo", help="a whole cluster on this machine answering a prompt")
    p.add_argument(
        "prompt",
        nargs="?",
        default="Explain in two sentences why small devices can serve a language model together.",
    )
    p.add_argument("--broker", help="use a running broker (anonymous) instead of starting one")
    p.add_argument(
        "--mosquitto",
        action="store_true",
        help="require Mosquitto (the default when installed: TLS, a certificate per process)",
    )
    p.add_argument(
        "--embedded",
        action="store_true",
        help="the embedded pure-Python broker instead (plaintext on loopback, no ACL)",
    )
    p.add_argument("--inventory", help="devices to start (default: the bundled 4-device one)")
    p.add_argument("--model", help="model directory (default: the exported default model)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument(
        "--requests", type=positive_int, default=1, help="concurrent copies of the prompt"
    )
    p.add_argument("--method", default="e2llm", choices=METHODS)
    p.add_argument("--cluster", default="demo")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "gateway", help="OpenAI-compatible HTTP API of a cluster (chat, completions, metrics)"
    )
    add_broker_args(p)
    p.add_argument("--model", help="the model directory the cluster serves (chat template)")
    add_gateway_args(p)
    p.add_argument(
        "--monitor-identity",
        metavar="DIR",
        help="identity for /metrics, read from the monitor topics (default: --identity)",
    )
    p.add_argument("--monitor-username", help="lab mode: broker user for /metrics")
    p.add_argument("--monitor-password-file", help="password file of --monitor-username")
    p.set_defaults(func=cmd_gateway)

    p = sub.add_parser(
        "up", help="broker, orchestrator, agents and the HTTP API on this machine, until Ctrl-C"
    )
    p.add_argument("--agents", type=int, default=2, help="local agent processes (devices)")
    p.add_argument("--model", help="model directory or source (default: SmolLM2-135M)")
    p.add_argument(
        "--broker-kind",
        choices=["auto", "mosquitto", "embedded"],
        default="auto",
        help="Mosquitto when installed (auto), else the embedded pure-Python broker",
    )
    p.add_argument("--logs", help="keep every process's log in this directory")
    p.add_argument("--cluster", default="local")
    add_gateway_args(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("chat", help="interactive multi-turn chat in the terminal")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="an e2llm gateway (or any OpenAI-compatible server)")
    where.add_argument("--broker", help="mqtts://host:8883 of a cluster (no gateway needed)")
    p.add_argument("--cluster", default="default", help="with --broker")
    add_login_args(p)
    p.add_argument("--model", help="with --broker: the model directory (chat template)")
    p.add_argument("--api-key-file", help="with --url: file holding the API key to send")
    p.add_argument("--system", help="a system message opening the conversation")
    p.add_argument("--max-tokens", type=int, default=512, help="longest answer, in tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for an answer")
    p.set_defaults(func=cmd_chat)

    for register in _plugins():
        register(sub)
    return ap


def _plugins() -> list[Any]:
    """Subcommands that live next to the code they drive."""
    import importlib

    regs = []
    for mod in (
        "planner.cli",
        "e2llm_edge.ops.monitor",
        "e2llm_edge.ops.broker_cli",
        "e2llm_edge.ops.testbed.cli",
    ):
        try:
            regs.append(importlib.import_module(mod).register)
        except ImportError as exc:  # an extra this machine did not install
            log.debug("subcommands of %s unavailable: %s", mod, exc)
    return regs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        shown = user_error(exc)
        if shown is None:
            raise
        log.debug("%s", shown, exc_info=exc)
        print(f"error: {shown}", file=sys.stderr)
        return 2


def user_error(exc: BaseException) -> BaseException | None:
    """The error to show in one line if ``exc`` is one raised on purpose (also when a task
    group wrapped it alone), else None: anything else is a bug and keeps its traceback."""
    from planner.errors import PlannerError  # here: the planner imports numpy

    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError) and exc.filename is not None:
        # a path the user named cannot be read or written (e.g. an --out directory)
        return ConfigError(f"{exc.filename}: {exc.strerror}")
    return exc if isinstance(exc, E2LLMError | ExportError | PlannerError) else None


if __name__ == "__main__":
    sys.exit(main())
