"""Measurements that prove an emulated link is what the inventory says.

Run inside the namespaces by `Testbed.check` (`python -m e2llm_edge.ops.testbed.probe`):

- `sink` accepts one connection, reads everything, prints the rate it saw (bytes after the
  first chunk over the time from the first chunk to the last: the bucket's initial burst
  and the connection set-up do not count);
- `source` sends N bytes to a sink;
- `rtt` publishes small MQTT messages to itself through a broker address and prints the
  round trip: through a device's relay it crosses the relay twice each way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import time

BUF = 1 << 20


def sink(host: str, port: int, timeout: float) -> dict[str, float]:
    with socket.create_server((host, port)) as srv:
        srv.settimeout(timeout)
        print(json.dumps({"listening": port}), flush=True)
        conn, _ = srv.accept()
        conn.settimeout(timeout)
        buf = bytearray(BUF)
        first = last = 0.0
        total = first_n = 0
        with conn:
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                last = time.perf_counter()
                if not total:
                    first, first_n = last, n
                total += n
    span = last - first
    return {
        "bytes": total,
        "seconds": span,
        "mbps": (total - first_n) * 8 / span / 1e6 if span > 0 else float("nan"),
    }


def source(host: str, port: int, nbytes: int, timeout: float) -> dict[str, float]:
    data = b"\0" * min(nbytes, BUF)
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=timeout) as s:
        left = nbytes
        while left > 0:
            s.sendall(data[: min(left, len(data))])
            left -= min(left, len(data))
    return {"bytes": nbytes, "seconds": time.perf_counter() - t0}


async def rtt(host: str, port: int, n: int, size: int, timeout: float) -> dict[str, float]:
    import aiomqtt

    topic = f"e2llm-testbed/probe/{socket.gethostname()}-{time.monotonic_ns()}"
    payload = b"\0" * size
    times: list[float] = []
    async with aiomqtt.Client(host, port, identifier=topic.rsplit("/", 1)[1]) as c:
        await c.subscribe(topic)
        msgs = c.messages
        for _ in range(n + 2):
            t0 = time.perf_counter()
            await c.publish(topic, payload)
            async with asyncio.timeout(timeout):
                await anext(msgs)
            times.append(time.perf_counter() - t0)
    times = times[2:]  # the first round trips also warm up the path
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "n": n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m e2llm_edge.ops.testbed.probe")
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("sink")
    p.add_argument("--listen", required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    p = sub.add_parser("source")
    p.add_argument("--to", required=True)
    p.add_argument("--bytes", type=int, required=True)
    p.add_argument("--timeout", type=float, default=30.0)
    p = sub.add_parser("rtt")
    p.add_argument("--broker", required=True, help="HOST:PORT")
    p.add_argument("--n", type=int, default=20)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args(argv)
    if args.what == "sink":
        host, _, port = args.listen.rpartition(":")
        out = sink(host, int(port), args.timeout)
    elif args.what == "source":
        host, _, port = args.to.rpartition(":")
        out = source(host, int(port), args.bytes, args.timeout)
    else:
        host, _, port = args.broker.rpartition(":")
        out = asyncio.run(rtt(host, int(port), args.n, args.size, args.timeout))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
