"""The HTTP gateway's cost over the MQTT client, measured side by side in one run.

The same requests (prompt token ids, greedy) go to the cluster directly through `Client`
and through the gateway (`POST /v1/completions`, streamed), alternating so that the
machine's noise hits both alike:

- per request: end to end with 1 new token (prefill and one token), p50 and p99 of each
  path and their difference (goal: < 5 ms at p99);
- per token: median gap between tokens of a longer answer on each path, and the end-to-end
  difference spread over its tokens (goal: < 0.2 ms per token);
- throughput: 32 clients streaming at once, total tokens/s on each path.

Starts Mosquitto, the orchestrator, two agents and an `e2llm gateway` process, unless
given a running cluster and gateway (`--broker URL --cluster C --url http://...`).

    .venv/bin/python bench/gateway_bench.py [--rounds 40] [--tokens 32] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from e2llm_edge.client import Client  # noqa: E402
from e2llm_edge.device.profile import load_or_measure_profile  # noqa: E402
from e2llm_edge.fog.textio import load_tokenizer  # noqa: E402
from e2llm_edge.ops.broker import free_port  # noqa: E402
from e2llm_edge.ops.localcluster import LocalCluster, Proc  # noqa: E402
from e2llm_edge.ops.up import local_inventory  # noqa: E402
from e2llm_edge.wire.bus import BusConfig  # noqa: E402
from onnx_export.export import default_model_dir, export_model  # noqa: E402
from onnx_export.manifest import Manifest  # noqa: E402

PROMPTS = [f"Tell me one thing about the number {n}." for n in range(64)]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Timed:
    """One answer's timings: arrival-relative time of each token and the end."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens: list[float] = []
        self.end = 0.0

    def token(self) -> None:
        self.tokens.append(time.perf_counter() - self.t0)

    def done(self) -> Timed:
        self.end = time.perf_counter() - self.t0
        return self

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.tokens, self.tokens[1:], strict=False)]


async def direct(client: Client, ids: list[int], n: int) -> Timed:
    tm = Timed()
    async for ev in client.generate(prompt_ids=ids, raw=True, max_new_tokens=n, timeout=120):
        if ev.event == "token":
            tm.token()
    return tm.done()


async def via_gateway(
    session: aiohttp.ClientSession, url: str, model: str, ids: list[int], n: int
) -> Timed:
    tm = Timed()
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": n,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,  # count tokens, not chunks (a held-back delta sends none)
    }
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"gateway answered {resp.status}: {await resp.text()}")
        async for line in resp.content:
            if line.startswith(b"data: {"):
                for _ in json.loads(line[6:])["choices"][0]["token_ids"]:
                    tm.token()
    return tm.done()


async def measure(args: argparse.Namespace, bus: BusConfig, url: str, model: str) -> dict[str, Any]:
    tok = load_tokenizer(args.model_dir)
    ids = [tok.encode_prompt(p) for p in PROMPTS]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    out: dict[str, Any] = {}
    async with Client(bus) as client, aiohttp.ClientSession(headers=headers) as s:
        for i in range(2):  # warm both paths
            await direct(client, ids[i], 2)
            await via_gateway(s, url, model, ids[i], 2)
        one: dict[str, list[float]] = {"direct": [], "gateway": []}
        for r in range(args.rounds):
            p = ids[r % len(ids)]
            first, second = ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")
            for path in (first, second):
                tm = await (
                    direct(client, p, 1) if path == "direct" else via_gateway(s, url, model, p, 1)
                )
                one[path].append(tm.end)
        out["request"] = {
            path: {"p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3}
            for path, v in one.items()
        }
        out["request"]["overhead_ms"] = {
            q: out["request"]["gateway"][q] - out["request"]["direct"][q]
            for q in ("p50_ms", "p99_ms")
        }
        gaps: dict[str, list[float]] = {"direct": [], "gateway": []}
        ends: dict[str, list[float]] = {"direct": [], "gateway": []}
        for r in range(max(2, args.rounds // 4)):
            p = ids[r % len(ids)]
            for path in ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct"):
                tm = await (
                    direct(client, p, args.tokens)
                    if path == "direct"
                    else via_gateway(s, url, model, p, args.tokens)
                )
                gaps[path] += tm.gaps()
                ends[path].append(tm.end - tm.tokens[0])
        out["token"] = {
            "gap_median_ms": {k: statistics.median(v) * 1e3 for k, v in gaps.items()},
            "overhead_per_token_ms": (
                statistics.median(ends["gateway"]) - statistics.median(ends["direct"])
            )
            * 1e3
            / max(1, args.tokens - 1),
        }

        async def crowd(path: str) -> tuple[int, float]:
            async def one_client(c: int) -> int:
                n = 0
                for k in range(args.per_client):
                    p = ids[(c * args.per_client + k) % len(ids)]
                    tm = await (
                        direct(client, p, args.crowd_tokens)
                        if path == "direct"
                        else via_gateway(s, url, model, p, args.crowd_tokens)
                    )
                    n += len(tm.tokens)
                return n

            t0 = time.perf_counter()
            counts = await asyncio.gather(*[one_client(c) for c in range(args.clients)])
            return sum(counts), time.perf_counter() - t0

        out["throughput"] = {}
        for path in ("direct", "gateway"):
            n, wall = await crowd(path)
            out["throughput"][path] = {"tokens": n, "seconds": wall, "tokens_per_s": n / wall}
    return out


@contextlib.contextmanager
def own_cluster(args: argparse.Namespace) -> Iterator[tuple[BusConfig, str]]:
    """Mosquitto, orchestrator, two agents and a gateway process, for this run only."""
    profile = load_or_measure_profile(Manifest.load(args.model_dir), threads=1)
    with LocalCluster(args.model_dir, local_inventory(2, profile), cluster="bench") as c:
        c.wait_serving(timeout=300)
        assert c.broker_url is not None and c.workdir is not None
        port = free_port()
        gw = Proc(
            "gateway",
            [
                *(sys.executable, "-m", "e2llm_edge.cli", "gateway", "--broker", c.broker_url),
                *("--cluster", "bench", "--model", str(args.model_dir), "--port", str(port)),
            ],
            c.workdir / "gateway.log",
        )
        gw.start()
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(f"{url}/health", timeout=2).close()
                    break
                if time.monotonic() > deadline or not gw.alive:
                    raise RuntimeError(f"gateway did not start:\n{gw.tail()}")
                time.sleep(0.2)
            yield c.bus_config(), url
        finally:
            gw.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=40, help="1-token requests per path")
    ap.add_argument("--tokens", type=int, default=32, help="answer length for the per-token cost")
    ap.add_argument("--clients", type=int, default=32, help="concurrent clients for throughput")
    ap.add_argument("--per-client", type=int, default=2, help="requests per client")
    ap.add_argument("--crowd-tokens", type=int, default=16, help="answer length in the crowd")
    ap.add_argument("--broker", help="a running cluster's broker (with --url)")
    ap.add_argument("--cluster", default="default")
    ap.add_argument("--url", help="a running gateway in front of that cluster")
    ap.add_argument("--api-key", help="the gateway's API key, if it needs one")
    ap.add_argument("--model", help="model directory (default: the exported default model)")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    args = ap.parse_args(argv)
    if args.model:
        args.model_dir = Path(args.model)
    else:
        args.model_dir = default_model_dir()
        export_model(None, args.model_dir, progress=False)
    model = args.model_dir.name
    if args.broker and args.url:
        res = asyncio.run(
            measure(args, BusConfig.from_url(args.broker, cluster=args.cluster), args.url, model)
        )
    else:
        with own_cluster(args) as (bus, url):
            res = asyncio.run(measure(args, bus, url, model))
    res["load"] = os.getloadavg()
    if args.json:
        print(json.dumps(res))
        return res
    rq, tk, tp = res["request"], res["token"], res["throughput"]
    print(f"load average {res['load'][0]:.2f} {res['load'][1]:.2f} {res['load'][2]:.2f}")
    print(
        f"per request (1 token, {args.rounds} each, alternating): direct p50 "
        f"{rq['direct']['p50_ms']:.1f} ms p99 {rq['direct']['p99_ms']:.1f} ms; gateway p50 "
        f"{rq['gateway']['p50_ms']:.1f} ms p99 {rq['gateway']['p99_ms']:.1f} ms; overhead p50 "
        f"{rq['overhead_ms']['p50_ms']:+.2f} ms, p99 {rq['overhead_ms']['p99_ms']:+.2f} ms"
    )
    print(
        f"per token ({args.tokens}-token answers): median gap direct "
        f"{tk['gap_median_ms']['direct']:.2f} ms, gateway {tk['gap_median_ms']['gateway']:.2f} ms; "
        f"overhead {tk['overhead_per_token_ms']:+.3f} ms per token"
    )
    print(
        f"throughput ({args.clients} clients x {args.per_client} requests x "
        f"{args.crowd_tokens} tokens): direct {tp['direct']['tokens_per_s']:.1f} tokens/s, "
        f"gateway {tp['gateway']['tokens_per_s']:.1f} tokens/s "
        f"({tp['gateway']['tokens_per_s'] / tp['direct']['tokens_per_s']:.2f}x)"
    )
    return res


if __name__ == "__main__":
    main()
