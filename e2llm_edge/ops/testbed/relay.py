"""A TCP relay that delays every byte by a fixed time in each direction: link latency where
the kernel has no netem.

One relay per device runs on the fog node in front of the broker; the device's agent
connects to it instead of the broker. Data crosses the device's shaped veth first (tc tbf:
the link's rate), then waits here until `delay` after it arrived, so one way costs
latency + bytes / rate, which is what the planner's `Link.one_way_s` assumes.

Threads, not asyncio: a thread sleeps to the microsecond, while an asyncio loop wakes on
a millisecond grid (epoll's timeout), which would turn a 0.3 ms link into ~1 ms. Each
direction is a reader that stamps chunks and a writer that sends each when it is due;
the queue between them is bounded, so a slow receiver slows the sender down (TCP
back-pressure) instead of filling memory.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import queue
import signal
import socket
import threading
import time
from types import FrameType

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
MAX_QUEUED = 64
"""Chunks in flight per direction (at most 16 MiB)."""
IDLE_S = 600.0
"""A connection silent this long is closed (MQTT clients ping every few seconds)."""
CONNECT_S = 5.0
SEND_S = 30.0

_EOF = b""


def _nodelay(s: socket.socket) -> None:
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Direction:
    """src -> dst, each chunk sent `delay` seconds after it was read."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float, name: str) -> None:
        self.src, self.dst, self.delay = src, dst, delay
        self.q: queue.Queue[tuple[float, bytes]] = queue.Queue(MAX_QUEUED)
        self.threads = [
            threading.Thread(target=self._read, name=f"{name}-read", daemon=True),
            threading.Thread(target=self._write, name=f"{name}-write", daemon=True),
        ]
        self.failed = threading.Event()

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        for t in self.threads:
            t.join()

    def _read(self) -> None:
        try:
            while not self.failed.is_set():
                data = self.src.recv(CHUNK)
                due = time.monotonic() + self.delay
                while not self.failed.is_set():
                    try:
                        self.q.put((due, data), timeout=1.0)
                        break
                    except queue.Full:
                        continue
                if not data:
                    return
        except OSError:
            self.failed.set()
            with contextlib.suppress(queue.Full):
                self.q.put_nowait((0.0, _EOF))

    def _write(self) -> None:
        try:
            while True:
                try:
                    due, data = self.q.get(timeout=1.0)
                except queue.Empty:
                    if self.failed.is_set():
                        return
                    continue
                if not data:
                    with contextlib.suppress(OSError):
                        self.dst.shutdown(socket.SHUT_WR)
                    return
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                self.dst.sendall(data)
        except OSError:
            self.failed.set()


def _serve_one(client: socket.socket, upstream: tuple[str, int], delay: float) -> None:
    try:
        server = socket.create_connection(upstream, timeout=CONNECT_S)
    except OSError as exc:
        log.warning("cannot reach %s:%d: %s", *upstream, exc)
        client.close()
        return
    for s, t in ((client, IDLE_S), (server, IDLE_S)):
        _nodelay(s)
        s.settimeout(t)
    up = _Direction(client, server, delay, "up")
    down = _Direction(server, client, delay, "down")
    up.start()
    down.start()
    # when one direction fails, the other must not wait out its idle timeout
    while not (up.failed.is_set() or down.failed.is_set()):
        if not any(t.is_alive() for t in up.threads + down.threads):
            break
        time.sleep(0.2)
    for s in (client, server):
        with contextlib.suppress(OSError):
            s.shutdown(socket.SHUT_RDWR)
    up.join()
    down.join()
    client.close()
    server.close()


def serve(
    listen: tuple[str, int], upstream: tuple[str, int], delay_s: float, stop: threading.Event
) -> None:
    """Accept connections on `listen` and relay each to `upstream`, until `stop` is set."""
    with socket.create_server(listen) as srv:
        srv.settimeout(0.5)
        log.info("relay %s:%d -> %s:%d, %.3f ms each way", *listen, *upstream, delay_s * 1e3)
        while not stop.is_set():
            try:
                client, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(
                target=_serve_one, args=(client, upstream, delay_s), daemon=True
            ).start()


def _hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


def main(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    serve(_hostport(args.listen), _hostport(args.to), args.delay_ms / 1e3, stop)
    return 0
