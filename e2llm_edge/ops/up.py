"""`e2llm up`: a broker, the orchestrator, N agents and the HTTP API on this machine.

The zero-config way to try the system: the same processes as a real deployment
(``LocalCluster``: every agent and the orchestrator is its own `e2llm` process, every byte
crosses the broker), then the OpenAI-compatible gateway in this process until Ctrl-C,
which stops every process it started. The broker is Mosquitto when it is installed (the
broker the project is built and tested on: TCP_NODELAY, MQTT 5, 2-3.5x faster than the
pure-Python one on KV-cache payloads), otherwise the embedded one, so nothing needs
installing first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from e2llm_edge.device.profile import load_or_measure_profile
from e2llm_edge.errors import BrokerError, E2LLMError
from e2llm_edge.fog.gateway import Gateway, GatewayConfig, read_api_keys, serve
from e2llm_edge.ops.broker import find_mosquitto
from e2llm_edge.ops.demo import describe_plan
from e2llm_edge.ops.localcluster import LocalCluster
from onnx_export.manifest import Manifest

AGENT_MEMORY_MB = 1200
"""Budget per local agent: each can hold the whole model, so N agents form up to N
replicas and the planner chooses their roles (prefill or decode) and split."""


PROFILE_FIELDS = frozenset(
    {"prefill_tokens", "layer_prefill_s", "layer_decode_s", "embed_s", "head_prefill_s"}
    | {"head_decode_s"}
)


def local_inventory(n: int, profile: dict[str, Any]) -> dict[str, Any]:
    """N identical devices on loopback with this machine's measured profile (the cost
    figures of it; the agents announce the same when they start)."""
    costs = {k: v for k, v in profile.items() if k in PROFILE_FIELDS}
    return {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": f"local-{i + 1}", "memory_mb": AGENT_MEMORY_MB, "profile": costs}
            for i in range(n)
        ],
    }


def broker_kind(choice: str) -> str:
    if choice != "auto":
        return choice
    try:
        find_mosquitto()
        return "mosquitto"
    except BrokerError:
        return "embedded"


def examples(url: str, model: str, key: str | None) -> str:
    """The copy-paste lines printed once the API answers."""
    auth = f' -H "Authorization: Bearer {key}"' if key else ""
    api_key = key or "none"
    return f"""\
  curl {url}/v1/chat/completions -H "Content-Type: application/json"{auth} \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python -c 'from openai import OpenAI
c = OpenAI(base_url="{url}/v1", api_key="{api_key}")
r = c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hello!"}}])
print(r.choices[0].message.content)'

  e2llm chat --url {url}"""


@contextlib.contextmanager
def _closed_without_interruption(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """Enter the cluster; on the way out a second Ctrl-C must not cut the shutdown short
    and leave agents running, so SIGINT is ignored while the processes stop."""
    try:
        yield cluster.__enter__()
    finally:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            cluster.close()
        finally:
            signal.signal(signal.SIGINT, previous)


def run_up(args: argparse.Namespace, model_dir: Path) -> int:
    if args.agents < 1:
        print(f"error: --agents must be at least 1, got {args.agents}", file=sys.stderr)
        return 2
    try:
        keys = read_api_keys(Path(args.api_key_file)) if args.api_key_file else frozenset()
    except E2LLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    manifest = Manifest.load(model_dir)
    kind = broker_kind(args.broker_kind)
    print(f"model: {model_dir.name} ({model_dir})", flush=True)
    print("profiling this machine once (cached for the agents)...", flush=True)
    profile = load_or_measure_profile(manifest, threads=1)
    workdir = Path(args.logs) if args.logs else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        with _closed_without_interruption(
            LocalCluster(
                model_dir,
                local_inventory(args.agents, profile),
                broker_kind=kind,
                cluster=args.cluster,
                workdir=workdir,
                verbose=workdir is not None,
            )
        ) as cluster:
            print(f"broker: {cluster.broker_url} ({kind}); {args.agents} agents starting...")
            plan = cluster.wait_serving(timeout=300)
            print(f"plan v{plan.version}: {len(plan.replicas)} replicas")
            for line in describe_plan(plan):
                print("  " + line)
            cfg = GatewayConfig(
                bus=cluster.bus_config(),
                model_dir=model_dir,
                host=args.host,
                port=args.port,
                api_keys=keys,
                model_id=args.model_id,
                max_body_bytes=args.max_body_bytes,
                max_in_flight=args.max_in_flight,
                request_timeout=args.request_timeout,
            )

            def ready(gw: Gateway) -> None:
                key = next(iter(sorted(keys)), None)
                print(f"\nOpenAI-compatible API: {gw.url}/v1 (model {gw.limits.model})")
                print(f"metrics: {gw.url}/metrics; Ctrl-C stops everything\n")
                print(examples(gw.url, gw.limits.model, key), flush=True)

            with contextlib.suppress(asyncio.CancelledError):
                asyncio.run(serve(cfg, ready))
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 0
    except (TimeoutError, RuntimeError, E2LLMError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    print("stopped", file=sys.stderr)
    return 0
