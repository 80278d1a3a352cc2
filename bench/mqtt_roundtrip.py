"""Round-trip times through a broker, with and without TCP_NODELAY, side by side.

A round trip is client A -> broker -> echo client B -> broker -> A (two broker hops),
with the project's Bus on both ends. Optionally the same through amqtt (pure Python).

    .venv/bin/python bench/mqtt_roundtrip.py [--n 200] [--amqtt]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from e2llm_edge import messages as m
from e2llm_edge import topics as t
from e2llm_edge.broker import MosquittoBroker, MosquittoConfig, free_port
from e2llm_edge.bus import Bus, BusConfig

SIZES = {"2 KB": (1, 1, 512), "1.2 MB": (1, 520, 576)}


async def roundtrips(port: int, nodelay: bool, shape: tuple[int, int, int], n: int
                     ) -> list[float]:
    cfg = BusConfig(port=port, cluster="bench", tcp_nodelay=nodelay)
    act = m.Activation(request_id="r", phase="decode",
                       hidden=np.ones(shape, np.float32), position_start=0, step=0)
    async with Bus(cfg) as a, Bus(cfg) as b:
        await a.subscribe(t.DEVICE_INBOX, device_id="a")
        await b.subscribe(t.DEVICE_INBOX, device_id="b")

        async def echo() -> None:
            async for env in b:
                await b.publish(t.DEVICE_INBOX, env.msg, device_id="a")

        async with asyncio.TaskGroup() as tg:
            echo_task = tg.create_task(echo())
            times = []
            for i in range(n + 5):
                t0 = time.perf_counter()
                await a.publish(t.DEVICE_INBOX, act, device_id="b")
                await a.recv(timeout=10)
                if i >= 5:  # warm-up
                    times.append(time.perf_counter() - t0)
            echo_task.cancel()
    return times


@contextlib.asynccontextmanager
async def mosquitto(nodelay: bool) -> AsyncIterator[int]:
    async with MosquittoBroker(MosquittoConfig(tcp_nodelay=nodelay)) as broker:
        yield broker.port


@contextlib.asynccontextmanager
async def amqtt_broker() -> AsyncIterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "amqtt.yaml"
        conf.write_text(f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
                        "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
                        "    allow_anonymous: true\n")
        exe = Path(sys.executable).parent / "amqtt"
        proc = await asyncio.to_thread(subprocess.Popen, [str(exe), "-c", str(conf)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(100):
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                    w.close()
                    break
                except OSError:
                    await asyncio.sleep(0.05)
            yield port
        finally:
            proc.terminate()
            await asyncio.to_thread(proc.wait)


def fmt(times: list[float]) -> str:
    ms = sorted(x * 1e3 for x in times)
    return f"median {statistics.median(ms):7.2f} ms  p90 {ms[int(len(ms) * 0.9)]:7.2f} ms"


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200, help="round trips per case")
    ap.add_argument("--amqtt", action="store_true", help="also measure amqtt")
    args = ap.parse_args()
    cases = [("mosquitto, TCP_NODELAY on both sides", mosquitto(True), True),
             ("mosquitto, Nagle (no TCP_NODELAY)", mosquitto(False), False)]
    if args.amqtt:
        cases.append(("amqtt (subprocess), TCP_NODELAY on clients", amqtt_broker(), True))
    for label, broker, nodelay in cases:
        async with broker as port:
            for size, shape in SIZES.items():
                n = args.n if size == "2 KB" else max(20, args.n // 4)
                times = await roundtrips(port, nodelay, shape, n)
                print(f"{label:45s} {size:>7s}  n={n:4d}  {fmt(times)}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
