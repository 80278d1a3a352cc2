"""The HTTP gateway's cost over the MQTT client, measured side by side in one run.

The same requests (prompt token ids, greedy) go to the cluster directly through `Client`
and through the gateway (`POST /v1/completions`, streamed), alternating so that the
machine's noise hits both alike:

- per request: the time a path adds around the broker (from the caller's call to its
  request on the broker, and from the final event on the broker to the caller having the
  answer), timed by a third subscriber on the same clock, so the cluster's own speed and
  noise drop out; p50 and p99 of each path and their difference (goal: < 5 ms at p99);
- per token: from each token event on the broker to the caller having it (goal: the
  gateway adds < 0.2 ms per token);
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
import sys
import time
import urllib.request
import uuid
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
from e2llm_edge.wire import messages as m  # noqa: E402
from e2llm_edge.wire import topics as t  # noqa: E402
from e2llm_edge.wire.bus import Bus, BusConfig  # noqa: E402
from onnx_export.export import default_model_dir, export_model  # noqa: E402
from onnx_export.manifest import Manifest  # noqa: E402

PROMPTS = [f"Tell me one thing about the number {n}." for n in range(64)]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


class Tap:
    """A third subscriber on the broker that timestamps every request and response message
    on the same clock as the bench's callers: a path's own cost is then the time from the
    caller's call to the request on the broker, plus from each event on the broker to the
    caller having it, whatever the cluster's speed (noise there cancels out)."""

    def __init__(self) -> None:
        self.request: dict[str, float] = {}
        self.event: dict[tuple[str, int | str], float] = {}

    async def run(self, bus: Bus) -> None:
        await bus.subscribe(t.REQUEST)
        await bus.subscribe(t.RESPONSE)
        async for env in bus:
            now = time.perf_counter()
            msg = env.msg
            if isinstance(msg, m.GenerateRequest):
                self.request.setdefault(msg.request_id, now)
            elif isinstance(msg, m.ResponseEvent):
                key = msg.index if msg.event == "token" else msg.event
                self.event.setdefault((msg.request_id, key), now)


class Timed:
    """One answer as its caller saw it: call time, token arrival times, end time."""

    def __init__(self) -> None:
        self.rid = ""
        self.t0 = time.perf_counter()
        self.tokens: list[float] = []
        self.end = 0.0

    def costs(self, tap: Tap) -> tuple[float, list[float]]:
        """(request overhead: call to broker + done on broker to the end; per-token delays)"""
        req = tap.request[self.rid] - self.t0 + self.end - tap.event[(self.rid, "done")]
        per_token = [at - tap.event[(self.rid, i)] for i, at in enumerate(self.tokens)]
        return req, per_token


async def direct(client: Client, ids: list[int], n: int) -> Timed:
    tm = Timed()
    tm.rid = uuid.uuid4().hex
    events = client.generate(
        prompt_ids=ids, raw=True, max_new_tokens=n, timeout=120, request_id=tm.rid
    )
    async for ev in events:
        if ev.event == "token":
            tm.tokens.append(time.perf_counter())
    tm.end = time.perf_counter()
    return tm


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
        tm.rid = resp.headers["X-Request-Id"]
        async for line in resp.content:
            if line.startswith(b"data: {"):
                now = time.perf_counter()
                for _ in json.loads(line[6:])["choices"][0]["token_ids"]:
                    tm.tokens.append(now)
    tm.end = time.perf_counter()
    return tm


async def measure(args: argparse.Namespace, bus: BusConfig, url: str, model: str) -> dict[str, Any]:
    tok = load_tokenizer(args.model_dir)
    ids = [tok.encode_prompt(p) for p in PROMPTS]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    out: dict[str, Any] = {}
    tap = Tap()
    async with (
        Bus(bus) as tap_bus,
        Client(bus) as client,
        aiohttp.ClientSession(headers=headers) as s,
        asyncio.TaskGroup() as tg,
    ):
        tap_task = tg.create_task(tap.run(tap_bus))
        await asyncio.sleep(0.5)  # subscriptions in place
        for i in range(2):  # warm both paths
            await direct(client, ids[i], 2)
            await via_gateway(s, url, model, ids[i], 2)
        req: dict[str, list[float]] = {"direct": [], "gateway": []}
        tok_cost: dict[str, list[float]] = {"direct": [], "gateway": []}
        for r in range(args.rounds):
            p = ids[r % len(ids)]
            for path in ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct"):
                tm = await (
                    direct(client, p, args.tokens)
                    if path == "direct"
                    else via_gateway(s, url, model, p, args.tokens)
                )
                await asyncio.sleep(0.05)  # the tap has seen the last messages
                one, each = tm.costs(tap)
                req[path].append(one)
                tok_cost[path] += each
        out["request"] = {
            path: {"p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3}
            for path, v in req.items()
        }
        out["token"] = {
            path: {"p50_ms": pct(v, 0.5) * 1e3, "p99_ms": pct(v, 0.99) * 1e3}
            for path, v in tok_cost.items()
        }
        for key in ("request", "token"):
            d = out[key]
            d["overhead_ms"] = {q: d["gateway"][q] - d["direct"][q] for q in ("p50_ms", "p99_ms")}

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
        tap_task.cancel()
    return out


@contextlib.contextmanager
def own_cluster(args: argparse.Namespace) -> Iterator[tuple[BusConfig, str]]:
    """Mosquitto, orchestrator, two agents and a gateway process, for this run only."""
    profile = load_or_measure_profile(Manifest.load(args.model_dir), threads=1)
    # plain TCP: both paths cross the same broker, and the tap must read every topic
    with LocalCluster(args.model_dir, local_inventory(2, profile), cluster="bench", tls=False) as c:
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
    ap.add_argument("--rounds", type=int, default=40, help="requests per path")
    ap.add_argument("--tokens", type=int, default=16, help="answer length of those requests")
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
    for name, d, unit in (("per request", rq, "request"), ("per token", tk, "token")):
        print(
            f"{name} ({args.rounds} {args.tokens}-token answers per path, alternating; "
            f"time the path adds around the broker): direct p50 {d['direct']['p50_ms']:.3f} "
            f"p99 {d['direct']['p99_ms']:.3f} ms; gateway p50 {d['gateway']['p50_ms']:.3f} "
            f"p99 {d['gateway']['p99_ms']:.3f} ms; gateway overhead per {unit} p50 "
            f"{d['overhead_ms']['p50_ms']:+.3f} ms, p99 {d['overhead_ms']['p99_ms']:+.3f} ms"
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
