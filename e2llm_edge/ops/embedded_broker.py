"""An in-process MQTT broker (amqtt, pure Python) for the demo on a machine without Mosquitto.

It runs on its own event loop in a background thread, so the caller's loop is not slowed
by the broker's work. Measured here: 2-3.5x slower than Mosquitto on large payloads and
MQTT 3.1.1 only, with no ACLs: good for trying the system, not for a deployment (use
`--mosquitto` or the compose file's Mosquitto). asyncio sets TCP_NODELAY on its TCP
sockets, so small hops do not pay Nagle's delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from e2llm_edge.errors import BrokerError
from e2llm_edge.ops.broker import free_port

log = logging.getLogger(__name__)


@contextlib.contextmanager
def start_embedded(
    workdir: Path | None = None, host: str = "127.0.0.1", port: int = 0, ready_timeout: float = 10.0
) -> Iterator[str]:
    """Start the broker; yields its URL and stops it on exit."""
    try:
        from amqtt.broker import Broker
    except ImportError as exc:
        raise BrokerError(
            "the embedded broker needs amqtt: pip install 'e2llm-edge[demo]', "
            "or run with --mosquitto (apt-get install mosquitto)"
        ) from exc
    port = port or free_port(host)
    config: dict[str, Any] = {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.WARNING)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="embedded-broker", daemon=True)
    thread.start()
    holder: dict[str, Any] = {}

    async def start() -> None:
        holder["broker"] = Broker(config)
        await holder["broker"].start()

    try:
        asyncio.run_coroutine_threadsafe(start(), loop).result(ready_timeout)
    except Exception as exc:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        raise BrokerError(f"embedded broker did not start on {host}:{port}: {exc}") from exc
    try:
        yield f"mqtt://{host}:{port}"
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(holder["broker"].shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
