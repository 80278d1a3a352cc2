"""The `e2llm` command. Each subcommand is a small function; the work lives in the modules."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from onnx_export.errors import ExportError

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
    m = export_model(args.source, args.out, ranges=args.ranges, progress=not args.quiet,
                     graph_name=args.graph, precision=args.precision)
    total = sum(s.bytes for s in m.segments)
    print(f"{m.directory}: {len(m.segments)} segments, {total / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.1f} s")
    return 0


def _sampling(args: argparse.Namespace) -> object:
    from e2llm_edge.sampling import Sampling

    return Sampling(temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.broker:
        from e2llm_edge.client import run_generate_cli

        return run_generate_cli(args)
    from e2llm_edge.local import GenerationStats, LocalModel
    from e2llm_edge.sampling import Sampling
    from e2llm_edge.textio import ChatTokenizer, StreamDecoder

    sampling = _sampling(args)
    assert isinstance(sampling, Sampling)
    model = LocalModel(_model_dir(args), threads=args.threads)
    tok = ChatTokenizer(model.manifest)
    ids = tok.encode_prompt(args.prompt, raw=args.raw)
    stats = GenerationStats()
    stream = StreamDecoder(tok)
    new_ids: list[int] = []
    for t in model.generate(ids, args.max_new_tokens, sampling, stats):
        new_ids.append(t)
        if not args.json:
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()
    if args.json:
        print(json.dumps({"prompt_ids": ids, "new_ids": new_ids, "text": tok.decode(new_ids),
                          "stats": {"prompt_tokens": stats.prompt_tokens,
                                    "new_tokens": stats.new_tokens,
                                    "prefill_s": round(stats.prefill_s, 4),
                                    "decode_tokens_per_s": round(stats.decode_tokens_per_s, 2)}}))
    else:
        print()
        print(f"[{stats.prompt_tokens} prompt tokens, prefill {stats.prefill_s * 1e3:.0f} ms; "
              f"{stats.new_tokens} new tokens, {stats.decode_tokens_per_s:.1f} tokens/s]",
              file=sys.stderr)
    return 0


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="the prompt (a user message unless --raw)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="e2llm", description=__doc__)
    ap.add_argument("-v", "--verbose", action="count", default=0)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("export", help="cut a model into ONNX segments")
    p.add_argument("source", nargs="?", help="a .gguf file or HF directory (default: SmolLM2-135M)")
    p.add_argument("--out", help="model directory to write (default: the cache)")
    p.add_argument("--ranges", help="extra layer-range segments, e.g. 0-10,10-20,20-30")
    p.add_argument("--graph", default="standard", choices=["standard", "contrib"],
                   help="standard ONNX ops (portable) or com.microsoft contrib ops (fast)")
    p.add_argument("--precision", default="fp32",
                   help="fp32 (standard); exact or int8 (contrib)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("generate", help="generate locally, or on a cluster with --broker")
    add_generate_args(p)
    p.add_argument("--model", help="model directory or source (default: SmolLM2-135M)")
    p.add_argument("--threads", type=int, help="onnxruntime threads (default: usable CPUs)")
    p.add_argument("--broker", help="mqtt://[user:pass@]host:port of a running cluster")
    p.add_argument("--cluster", default="default")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the answer")
    p.set_defaults(func=cmd_generate)

    for register in _plugins():
        register(sub)
    return ap


def _plugins() -> list:  # type: ignore[type-arg]
    """Subcommands that live next to the code they drive."""
    regs = []
    try:
        from planner.cli import register as planner_register

        regs.append(planner_register)
    except ImportError:  # the planner needs deap, which devices do not install
        pass
    return regs


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
