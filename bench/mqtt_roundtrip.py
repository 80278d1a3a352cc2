"""Round-trip times through a broker, with and without TCP_NODELAY, side by side.

A round trip is client A -> broker -> echo client B -> broker -> A (two broker hops),
with the project's Bus on both ends. Optionally the same through amqtt (pure Python).

    .venv/bin/python bench/mqtt_roundtrip.py [--n 200] [--amqtt] [--pauses 0,5,20] [--tls]

`--tls` compares TLS with client certificates against plaintext with passwords, both
with the cluster's ACL (A and B are devices), in alternating rounds: what TLS alone costs.

`--pauses` adds the case a pipeline lives in: the echo client in another process, and a
pause (ms) before each ping, as stages idle between their turns. Each hop is timed on its
own (CLOCK_MONOTONIC is shared between processes): on a VM where idle processes wake
slowly, both hops grow with the pause though the broker and the code are the same.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np

from e2llm_edge.ops import broker_cli
from e2llm_edge.ops.broker import (
    BrokerTLS,
    Credentials,
    MosquittoBroker,
    MosquittoConfig,
    free_port,
)
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig

SIZES = {"2 KB": (1, 1, 512), "1.2 MB": (1, 520, 576)}


async def roundtrips(
    port: int,
    nodelay: bool,
    shape: tuple[int, int, int],
    n: int,
    logins: tuple[dict[str, Any], dict[str, Any]] = ({}, {}),
) -> list[float]:
    """``n`` round trips of a ``shape`` activation; ``logins``: A's and B's BusConfig
    fields (identity or password)."""
    a_cfg, b_cfg = (
        BusConfig.from_url(
            f"{'mqtts' if 'identity' in login else 'mqtt'}://127.0.0.1:{port}",
            cluster="bench",
            tcp_nodelay=nodelay,
            **login,
        )
        for login in logins
    )
    act = m.Activation(
        request_id="r",
        attempt=0,
        phase="decode",
        hidden=np.ones(shape, np.float32),
        position_start=0,
        step=0,
    )
    async with Bus(a_cfg) as a, Bus(b_cfg) as b:
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


Logins = tuple[dict[str, Any], dict[str, Any]]


@contextlib.asynccontextmanager
async def secured(tls: bool) -> AsyncIterator[tuple[int, Logins]]:
    """Mosquitto as `e2llm broker init` secures it (TLS with a certificate per device, or
    the plaintext lab mode's passwords; the same ACL either way); yields its port and the
    logins of devices "a" and "b"."""
    with tempfile.TemporaryDirectory() as tmp:
        secrets = Path(tmp) / "secrets"
        broker_cli.init(["a", "b"], secrets, cluster="bench", clients=[], force=False, tls=tls)
        if tls:
            cfg = MosquittoConfig(acl_file=secrets / "acl", tls=BrokerTLS.from_dir(secrets))

            def login(d: str) -> dict[str, Any]:
                return {"identity": broker_cli.identity_dir(secrets, d)}
        else:
            users = Credentials.load(secrets / "credentials.json").users
            cfg = MosquittoConfig(password_file=secrets / "passwd", acl_file=secrets / "acl")

            def login(d: str) -> dict[str, Any]:
                return {"username": d, "password": users[d]}

        logins = (login("a"), login("b"))
        async with MosquittoBroker(cfg) as broker:
            yield broker.port, logins


async def tls_case(n: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    """Round trips (s) per size and transport ("plaintext", "tls"), measured in
    alternating rounds of ``n // rounds``; printed as they come."""
    out: dict[str, dict[str, list[float]]] = {}
    async with secured(False) as plain, secured(True) as tls:
        for size, shape in SIZES.items():
            k = max(10, (n if size == "2 KB" else max(20, n // 4)) // rounds)
            got: dict[str, list[float]] = {"plaintext": [], "tls": []}
            for _ in range(rounds):
                for name, (port, logins) in (("plaintext", plain), ("tls", tls)):
                    got[name] += await roundtrips(port, True, shape, k, logins)
            ratio = statistics.median(got["tls"]) / statistics.median(got["plaintext"])
            for name, label in (
                ("plaintext", "mosquitto, plaintext + passwords + ACL"),
                ("tls", "mosquitto, TLS + client certificates + ACL"),
            ):
                print(f"{label:45s} {size:>7s}  n={len(got[name]):4d}  {fmt(got[name])}")
            print(f"{'  TLS / plaintext (median round trip)':45s} {size:>7s}  {ratio:.2f}x")
            out[size] = got
    return out


@contextlib.asynccontextmanager
async def amqtt_broker() -> AsyncIterator[int]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "amqtt.yaml"
        conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
            "    allow_anonymous: true\n"
        )
        exe = Path(sys.executable).parent / "amqtt"
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [str(exe), "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
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


def _us() -> int:
    return int(time.monotonic() * 1e6)


async def echo_process(port: int) -> None:
    """The other process: answer every Activation at once, stamped with its arrival."""
    async with Bus(BusConfig(port=port, cluster="bench", tcp_nodelay=True)) as b:
        await b.subscribe(t.DEVICE_INBOX, device_id="b")
        while True:
            env = await b.recv(timeout=60)
            got = _us()
            assert isinstance(env.msg, m.Activation)
            await b.publish(t.DEVICE_INBOX, dataclasses.replace(env.msg, step=got), device_id="a")


async def paused_hops(port: int, pause_s: float, n: int) -> tuple[list[float], list[float]]:
    """(there, back) hop times in s, ping -> broker -> echo process and back."""
    there: list[float] = []
    back: list[float] = []
    async with Bus(BusConfig(port=port, cluster="bench", tcp_nodelay=True)) as a:
        await a.subscribe(t.DEVICE_INBOX, device_id="a")
        for i in range(n + 5):
            await asyncio.sleep(pause_s)
            t0 = _us()
            await a.publish(
                t.DEVICE_INBOX,
                m.Activation(
                    request_id="r",
                    attempt=0,
                    phase="decode",
                    hidden=np.ones((1, 1, 576), np.float32),
                    position_start=t0,
                    step=0,
                ),
                device_id="b",
            )
            env = await a.recv(timeout=10)
            t2 = _us()
            assert isinstance(env.msg, m.Activation)
            if i >= 5:  # warm-up
                there.append((env.msg.step - t0) / 1e6)
                back.append((t2 - env.msg.step) / 1e6)
    return there, back


async def pauses_case(pauses_ms: list[float], n: int) -> None:
    async with mosquitto(True) as port:
        proc = await asyncio.create_subprocess_exec(sys.executable, __file__, "--echo", str(port))
        try:
            await asyncio.sleep(1.5)  # the echo process connects and subscribes
            for ms in pauses_ms:
                there, back = await paused_hops(port, ms / 1e3, n)
                print(
                    f"two processes, {ms:4.0f} ms pause before each ping, 2 KB: hop there "
                    f"{fmt(there)}; hop back {fmt(back)}",
                    flush=True,
                )
        finally:
            proc.kill()
            await proc.wait()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200, help="round trips per case")
    ap.add_argument("--amqtt", action="store_true", help="also measure amqtt")
    ap.add_argument(
        "--pauses",
        default="",
        help="comma list of pauses (ms) for the two-process case, e.g. 0,5,20",
    )
    ap.add_argument(
        "--tls", action="store_true", help="TLS + certificates vs plaintext + passwords"
    )
    ap.add_argument("--rounds", type=int, default=4, help="alternating rounds with --tls")
    ap.add_argument("--echo", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo is not None:
        await echo_process(args.echo)
        return
    if args.tls:
        await tls_case(args.n, args.rounds)
        return
    if args.pauses:
        await pauses_case([float(x) for x in args.pauses.split(",")], min(args.n, 100))
    cases = [
        ("mosquitto, TCP_NODELAY on both sides", mosquitto(True), True),
        ("mosquitto, Nagle (no TCP_NODELAY)", mosquitto(False), False),
    ]
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
