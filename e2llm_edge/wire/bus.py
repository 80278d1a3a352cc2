"""Typed MQTT bus: publish and receive ``messages`` on ``topics``, surviving broker restarts.

``Bus`` is an async context manager over ``aiomqtt.Client`` that owns one TaskGroup (the
connection loop and the bad-message worker). It reconnects with capped, jittered
exponential backoff, then resubscribes and re-publishes the retained messages it sent.
Inbound messages are decoded on arrival and queued in a bounded queue (by count and by
bytes); malformed ones are dropped with a rate-limited log and handed to a callback so
the caller can answer the requester.

Timeouts are parameters (not left to callers' ``asyncio.timeout``) because they turn into
``BusTimeout`` naming the operation and topic; hence the ASYNC109 waivers.

Before the first connection the bus says why the broker cannot be reached (refused,
unknown host, no answer, TLS): one-shot tools fail at once with that reason
(``BusConnectError``); services (``wait_for_broker``) log it once and keep retrying.

Delivery is at least once for QoS 1 topics (a publish interrupted by a disconnect is sent
again after reconnecting): receivers drop duplicates by (request id, seq).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import socket
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from e2llm_edge.errors import (
    BusAuthError,
    BusConnectError,
    BusError,
    BusTimeout,
    BusTLSError,
    CodecError,
    ConfigError,
    SubscriptionRefused,
    TopicError,
)
from e2llm_edge.wire import codec, messages, topics
from e2llm_edge.wire.tls import (
    TLSConfig,
    WatchedContext,
    client_context,
    explain,
    read_identity,
    speaks_tls,
)
from e2llm_edge.wire.topics import Topic

log = logging.getLogger(__name__)


class _DropSocketErrors(logging.Filter):
    """paho logs each failed socket read at ERROR; the bus reports the same event in one
    line of its own (the broker's TLS verdict, or the lost connection), so drop paho's."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("failed to receive on socket")


_MQTT_LOG = logging.getLogger(__name__ + ".mqtt")
_MQTT_LOG.addFilter(_DropSocketErrors())
_AUTH_CODES = frozenset({4, 5, 134, 135})  # MQTT 3.1.1 CONNACK 4/5; MQTT 5 0x86/0x87
NODELAY_OPTION = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class BusConfig:
    """How to reach the broker and how the bus behaves."""

    host: str = "127.0.0.1"
    """Broker host name or address."""
    port: int = 1883
    """Broker TCP port."""
    cluster: str = topics.DEFAULT_CLUSTER
    """Cluster name: topics live under ``e2llm/<cluster>/``."""
    client_id: str | None = None
    """MQTT client identifier (None: random, unique per Bus)."""
    username: str | None = None
    """Broker user name (None: anonymous)."""
    password: str | None = None
    """Broker password."""
    tls: TLSConfig | None = None
    """TLS settings (None: plain TCP)."""
    tcp_nodelay: bool = True
    """Disable Nagle's algorithm; without it each small hop can cost ~40 ms."""
    keepalive: int = 10
    """MQTT keepalive in seconds; the broker fires the last-will after 1.5x this silence."""
    queue_size: int = 1024
    """Maximum inbound messages waiting for the consumer; beyond it new ones are dropped."""
    queue_bytes: int = 256 * 1024 * 1024
    """Maximum inbound payload bytes waiting for the consumer."""
    publish_timeout: float = 10.0
    """Default timeout of ``publish`` (including waiting for a reconnect)."""
    connect_timeout: float = 10.0
    """How long one connection attempt may take, and entering the context at most unless
    ``wait_for_broker``."""
    wait_for_broker: bool = False
    """Before the first connection: False (one-shot tools) raises ``BusConnectError`` with
    the reason as soon as an attempt fails; True (services, which may start before their
    broker) logs the reason once and retries with backoff until the broker answers."""
    backoff_initial: float = 0.05
    """First reconnect delay in seconds."""
    backoff_max: float = 2.0
    """Cap on the reconnect delay."""
    max_message_bytes: int = codec.MAX_MESSAGE_BYTES
    """Largest message encoded or accepted."""
    clean_session: bool = True
    """False: the broker keeps this client's subscriptions and QoS 1 backlog across drops."""

    @classmethod
    def from_url(
        cls, url: str, *, identity: str | Path | None = None, **overrides: Any
    ) -> BusConfig:
        """``mqtts://host[:port]`` with ``identity`` (a directory from ``e2llm broker
        init``: TLS with its client certificate, whose name is the user name), plain
        ``mqtts://`` (system CAs, no certificate), or ``mqtt://[user:password@]host[:port]``
        (the plaintext lab mode)."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts", "tcp") or not parts.netloc:
            raise ConfigError(
                f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]"
            )
        try:
            port = parts.port
        except ValueError as exc:  # not a number, or outside 0-65535
            raise ConfigError(f"broker URL {url!r}: bad port ({exc})") from None
        if not parts.hostname:
            raise ConfigError(f"broker URL {url!r}: no host name")
        tls = TLSConfig() if parts.scheme == "mqtts" else None
        if identity is not None:
            if tls is None:
                raise BusTLSError(
                    "bad_identity", url, f"an identity needs TLS: use mqtts://, not {url}"
                )
            tls = TLSConfig.from_identity(identity)
            overrides.setdefault("username", read_identity(identity)["name"])
        values: dict[str, Any] = {
            "host": parts.hostname,
            "port": port or (8883 if tls else 1883),
            "tls": tls,
        }
        if parts.username:
            values["username"] = unquote(parts.username)
            values["password"] = unquote(parts.password) if parts.password else None
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Will:
    """A last-will: the broker publishes ``msg`` on ``topic`` if this client vanishes."""

    topic: Topic
    msg: messages.Message
    ids: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Envelope:
    """One inbound message with the topic family it arrived on and the topic's ids."""

    topic: Topic
    ids: Mapping[str, str]
    msg: messages.Message
    topic_str: str
    retained: bool


@dataclass(frozen=True)
class BadMessage:
    """An inbound payload that failed validation, for callers that answer with an error."""

    topic_str: str
    topic: Topic | None
    ids: Mapping[str, str] | None
    error: CodecError | TopicError
    size: int


@dataclass
class BusStats:
    """Counters for tests, telemetry and the monitor."""

    connects: int = 0
    published: int = 0
    received: int = 0
    dropped_invalid: int = 0
    dropped_overflow: int = 0
    dropped_unsubscribed: int = 0


class RateLimitedLog:
    """Logs the first event per key, then at most one summary per ``interval`` seconds."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self._log = logger
        self._interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, fmt: str, *args: object) -> None:
        now = time.monotonic()
        last, suppressed = self._last.get(key, (-math.inf, 0))
        if now - last < self._interval:
            self._last[key] = (last, suppressed + 1)
            return
        if len(self._last) > 1024:  # keys come from the network: keep this bounded
            self._last.clear()
        self._last[key] = (now, 0)
        if suppressed:
            fmt += " (%d similar suppressed)"
            args = (*args, suppressed)
        self._log.warning(fmt, *args)


class _ConnectionLost(Exception):
    pass


@dataclass
class _Connection:
    client: aiomqtt.Client
    lost: asyncio.Event = field(default_factory=asyncio.Event)


class _Client(aiomqtt.Client):
    """aiomqtt's client, also saying when its socket closes: before a CONNACK that is a
    refusal (a TLS port answering plaintext, a broker shedding load), which aiomqtt would
    only report at its connect timeout."""

    on_close: Callable[[], object] | None = None

    def _on_socket_close(self, client: Any, userdata: Any, sock: Any) -> None:
        super()._on_socket_close(client, userdata, sock)
        if self.on_close is not None:
            self.on_close()


class _Attempt:
    """The wait for one connection's CONNACK, cut short by ``fail()`` (from any thread)
    once the attempt is known to have failed, instead of running to the timeout."""

    def __init__(self) -> None:
        self._deadline = asyncio.timeout(None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._settled = False

    async def __aenter__(self) -> Self:
        self._loop = asyncio.get_running_loop()
        await self._deadline.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._settled = True
        await self._deadline.__aexit__(exc_type, exc, tb)

    def connected(self) -> None:
        """From now on a failure is a lost connection, reported as such."""
        self._settled = True

    def fail(self) -> None:
        if not self._settled and self._loop is not None:
            self._loop.call_soon_threadsafe(self._expire)

    def _expire(self) -> None:
        if not self._settled and not self._deadline.expired():
            self._deadline.reschedule(-1.0)


BadMessageHook = Callable[[BadMessage], Awaitable[None] | None]


class Bus:
    """Typed, self-healing MQTT connection. Use as ``async with Bus(cfg) as bus:``."""

    def __init__(
        self,
        config: BusConfig,
        *,
        will: Will | None = None,
        on_bad_message: BadMessageHook | None = None,
        publish_will_on_close: bool = True,
    ) -> None:
        self.config = (
            config
            if config.client_id
            else replace(config, client_id=f"e2llm-{uuid.uuid4().hex[:12]}")
        )
        self.stats = BusStats()
        self._will = will
        self._will_payload: tuple[str, bytes] | None = None
        if will is not None:
            self._will_payload = (
                will.topic.format(cluster=config.cluster, **will.ids),
                messages.encode(will.msg, max_bytes=config.max_message_bytes),
            )
        self._publish_will_on_close = publish_will_on_close
        self._on_bad = on_bad_message
        self._subs: dict[str, Topic] = {}
        self._retained: dict[str, bytes] = {}
        self._queue: asyncio.Queue[tuple[Envelope, int]] = asyncio.Queue(maxsize=config.queue_size)
        self._queued_bytes = 0
        self._bad_queue: asyncio.Queue[BadMessage] = asyncio.Queue(maxsize=64)
        self._conn: _Connection | None = None
        self._up = asyncio.Event()
        self._fatal: BaseException | None = None
        self._fatal_event = asyncio.Event()
        self._closing = False
        self._stack: contextlib.AsyncExitStack | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ratelog = RateLimitedLog(log)

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        tg = await stack.enter_async_context(asyncio.TaskGroup())
        self._stack = stack
        self._tasks = [
            tg.create_task(self._connection_loop(), name="bus-connection"),
            tg.create_task(self._bad_message_worker(), name="bus-bad-messages"),
        ]
        try:
            if self.config.wait_for_broker:
                await self.wait_connected(None)
            else:
                try:
                    await self.wait_connected(self.config.connect_timeout)
                except BusTimeout:
                    raise BusConnectError(
                        self.config.host,
                        self.config.port,
                        f"no answer within {self.config.connect_timeout:.3g} s",
                    ) from None
        except BaseException:
            await self._shutdown()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._publish_will_on_close and self._will_payload and self.connected:
            topic, payload = self._will_payload
            with contextlib.suppress(BusError):
                await self.publish_raw(
                    topic,
                    payload,
                    qos=1,
                    retain=self._will is not None and self._will.topic.retain,
                    timeout=2.0,
                )
        await self._shutdown()

    async def _shutdown(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    @property
    def connected(self) -> bool:
        return self._up.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        """Wait until connected; BusAuthError if the broker refused the credentials,
        BusConnectError if it could not be reached at first (unless ``wait_for_broker``),
        BusTLSError if the TLS handshake failed (with the reason)."""
        up = asyncio.ensure_future(self._up.wait())
        fatal = asyncio.ensure_future(self._fatal_event.wait())
        try:
            done, _ = await asyncio.wait(
                {up, fatal}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            up.cancel()
            fatal.cancel()
        if self._fatal is not None:
            raise self._fatal
        if not done:
            if await self._expects_tls():
                raise self._expects_tls_error()
            raise BusTimeout("connect", f"{self.config.host}:{self.config.port}", timeout or 0.0)

    async def _expects_tls(self) -> bool:
        """A plaintext client that got no answer: is it talking to a TLS port?"""
        cfg = self.config
        return cfg.tls is None and await asyncio.to_thread(speaks_tls, cfg.host, cfg.port)

    def _expects_tls_error(self) -> BusTLSError:
        where = f"{self.config.host}:{self.config.port}"
        return BusTLSError(
            "expects_tls",
            where,
            f"the broker speaks TLS on this port: use mqtts://{where} with --identity DIR",
        )

    def tcp_nodelay_active(self) -> bool:
        """Whether the live socket has TCP_NODELAY set (read back from the kernel)."""
        conn = self._conn
        sock = conn.client._client.socket() if conn else None
        if not isinstance(sock, socket.socket):
            return False
        return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    # ----------------------------------------------------------------- publishing

    async def publish(
        self,
        topic: Topic,
        msg: messages.Message,
        *,
        timeout: float | None = None,
        **ids: str,
    ) -> None:
        """Encode ``msg`` and publish it on ``topic`` with the topic's QoS and retain flag.

        Waits for a reconnect if needed; raises BusTimeout after ``timeout`` seconds.
        """
        if not topic.accepts(msg):
            raise CodecError(
                "message", f"{type(msg).__name__} may not be sent on topic {topic.name}"
            )
        topic_str = topic.format(cluster=self.config.cluster, **ids)
        data = messages.encode(msg, max_bytes=self.config.max_message_bytes)
        if topic.retain:
            self._retained[topic_str] = data
        await self.publish_raw(topic_str, data, qos=topic.qos, retain=topic.retain, timeout=timeout)

    async def publish_raw(
        self,
        topic_str: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Publish bytes as they are (tooling and tests; code uses ``publish``)."""
        if len(payload) > self.config.max_message_bytes:
            # the broker would drop the connection, and the retry loop would resend forever
            raise CodecError(
                "payload", f"size {len(payload)} B exceeds limit {self.config.max_message_bytes} B"
            )
        limit = self.config.publish_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                while True:
                    await self._up.wait()
                    conn = self._conn
                    if conn is None:
                        continue
                    try:
                        await _until_lost(
                            conn.client.publish(
                                topic_str, payload, qos=qos, retain=retain, timeout=math.inf
                            ),
                            conn.lost,
                        )
                        break
                    except (_ConnectionLost, aiomqtt.MqttError) as exc:
                        if not conn.lost.is_set() and not isinstance(exc, _ConnectionLost):
                            raise BusError(f"publish on {topic_str!r} failed: {exc}") from exc
                        log.debug("publish on %s interrupted by disconnect; retrying", topic_str)
        except TimeoutError:
            raise BusTimeout("publish", topic_str, limit) from None
        self.stats.published += 1

    def forget_retained(self, topic: Topic, **ids: str) -> None:
        """Stop re-publishing a retained message after reconnects."""
        self._retained.pop(topic.format(cluster=self.config.cluster, **ids), None)

    # ----------------------------------------------------------------- subscribing

    async def subscribe(
        self,
        topic: Topic,
        *,
        timeout: float | None = None,
        **ids: str,
    ) -> str:
        """Subscribe to a topic family (ids given are fixed, the rest ``+``); returns the
        filter. Kept across reconnects. SubscriptionRefused if the broker's ACL denies it.
        """
        flt = topic.filter(cluster=self.config.cluster, **ids)
        self._subs[flt] = topic
        if self.connected and self._conn is not None:
            limit = self.config.publish_timeout if timeout is None else timeout
            try:
                await _subscribe(self._conn.client, flt, topic.qos, limit)
            except SubscriptionRefused:
                del self._subs[flt]
                raise
        return flt

    async def unsubscribe(self, topic: Topic, **ids: str) -> None:
        flt = topic.filter(cluster=self.config.cluster, **ids)
        if self._subs.pop(flt, None) is not None and self._conn is not None:
            with contextlib.suppress(aiomqtt.MqttError):
                await self._conn.client.unsubscribe(flt, timeout=self.config.publish_timeout)

    # ----------------------------------------------------------------- receiving

    def __aiter__(self) -> AsyncIterator[Envelope]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Envelope]:
        while True:
            yield await self.recv()

    async def recv(self, timeout: float | None = None) -> Envelope:
        """Next valid inbound message; BusTimeout if none arrives within ``timeout``."""
        try:
            async with asyncio.timeout(timeout):
                env, size = await self._queue.get()
        except TimeoutError:
            raise BusTimeout("receive", None, timeout or 0.0) from None
        self._queued_bytes -= size
        return env

    def pending(self) -> int:
        """Messages waiting in the inbound queue."""
        return self._queue.qsize()

    def _dispatch(self, raw: aiomqtt.Message) -> None:
        topic_str = raw.topic.value
        payload = raw.payload if isinstance(raw.payload, bytes) else b""
        self.stats.received += 1
        if not any(aiomqtt.Topic(topic_str).matches(f) for f in self._subs):
            # Not what we subscribed to: a broker quirk (amqtt delivers other retained
            # topics), not a sender's fault. Nobody to answer; count and move on.
            self.stats.dropped_unsubscribed += 1
            return
        topic: Topic | None = None
        ids: Mapping[str, str] | None = None
        try:
            topic, ids = topics.resolve(
                topic_str, set(self._subs.values()), cluster=self.config.cluster
            )
            msg = messages.decode(payload, max_bytes=self.config.max_message_bytes)
            if not topic.accepts(msg):
                raise CodecError(
                    "header.k",
                    f"{type(msg).__name__} is not allowed on topic {topic.name}",
                    kind=int(msg.KIND),
                    request_id=getattr(msg, "request_id", None),
                )
        except (CodecError, TopicError) as exc:
            self.stats.dropped_invalid += 1
            self._ratelog.warning(
                f"bad:{topic.name if topic else topic_str}",
                "dropped invalid message on %s (%d B): %s",
                topic_str,
                len(payload),
                exc,
            )
            if self._on_bad is not None:
                with contextlib.suppress(asyncio.QueueFull):
                    self._bad_queue.put_nowait(BadMessage(topic_str, topic, ids, exc, len(payload)))
            return
        env = Envelope(topic, ids, msg, topic_str, bool(raw.retain))
        if self._queue.full() or self._queued_bytes + len(payload) > self.config.queue_bytes:
            self.stats.dropped_overflow += 1
            self._ratelog.warning(
                "overflow",
                "inbound queue full (%d messages, %d B); dropped %s on %s",
                self._queue.qsize(),
                self._queued_bytes,
                type(msg).__name__,
                topic_str,
            )
            return
        self._queue.put_nowait((env, len(payload)))
        self._queued_bytes += len(payload)

    async def _bad_message_worker(self) -> None:
        while True:
            bad = await self._bad_queue.get()
            if self._on_bad is None:
                continue
            try:
                result = self._on_bad(bad)
                if inspect.isawaitable(result):
                    await result
            except Exception:  # a failing hook must not take the bus down
                log.exception("bad-message hook failed for %s", bad.topic_str)

    # ----------------------------------------------------------------- connection

    def _new_client(self) -> tuple[_Client, WatchedContext | None]:
        cfg = self.config
        will = None
        if self._will_payload is not None and self._will is not None:
            will = aiomqtt.Will(
                self._will_payload[0],
                self._will_payload[1],
                qos=self._will.topic.qos,
                retain=self._will.topic.retain,
            )
        tls_context = None
        if cfg.tls is not None:
            tls_context = client_context(cfg.tls, f"{cfg.host}:{cfg.port}")
        client = _Client(
            cfg.host,
            cfg.port,
            username=cfg.username,
            password=cfg.password,
            identifier=cfg.client_id,
            will=will,
            clean_session=cfg.clean_session,
            keepalive=cfg.keepalive,
            timeout=cfg.connect_timeout,
            tls_context=tls_context,
            socket_options=[NODELAY_OPTION] if cfg.tcp_nodelay else [],
            # Bounded too, but drained at once by _dispatch; the real bound is self._queue.
            max_queued_incoming_messages=cfg.queue_size * 4,
            logger=_MQTT_LOG,
        )
        # paho's TCP connect has its own 5 s limit; one limit per attempt is less surprising
        client._client.connect_timeout = cfg.connect_timeout
        return client, tls_context

    def _give_up(self, exc: BusError) -> bool:
        """At the first connect a refusal is final (the caller hears it at once); later,
        the broker may be mid-restart or the files renewed: warn and keep trying."""
        if self.stats.connects == 0:
            self._fatal = exc
            self._fatal_event.set()
            return True
        self._ratelog.warning("connect", "%s", exc)
        return False

    async def _connection_loop(self) -> None:
        delay = self.config.backoff_initial
        last_reason: str | None = None
        while not self._closing:
            conn: _Connection | None = None
            tls: WatchedContext | None = None
            client: _Client | None = None
            try:
                client, tls = self._new_client()
                async with _Attempt() as attempt:
                    client.on_close = attempt.fail
                    if tls is not None:  # the broker's verdict on our certificate
                        tls.on_failure = attempt.fail
                    async with client:
                        attempt.connected()
                        if tls is not None:
                            tls.connected()
                        conn = _Connection(client)
                        await self._restore(client)
                        self._conn = conn
                        self._up.set()
                        self.stats.connects += 1
                        delay = self.config.backoff_initial
                        if last_reason is not None:  # close the warning the user saw
                            last_reason = None
                            log.warning(
                                "the broker at %s:%d answers now",
                                self.config.host,
                                self.config.port,
                            )
                        log.info(
                            "connected to %s:%d as %s (connect #%d)",
                            self.config.host,
                            self.config.port,
                            self.config.client_id,
                            self.stats.connects,
                        )
                        async for raw in client.messages:
                            self._dispatch(raw)
            except asyncio.CancelledError:
                if conn is None and client is not None:
                    _abandon_connect(client)
                raise
            except BusTLSError as exc:  # this identity's files cannot be loaded
                if self._give_up(exc):
                    return
            except (aiomqtt.MqttError, BusError, TimeoutError) as exc:
                cfg = self.config
                if tls is not None and tls.failure is not None:
                    assert cfg.tls is not None
                    if self._give_up(explain(tls.failure, cfg.tls, cfg.host, cfg.port)):
                        return
                elif self.stats.connects == 0:
                    if isinstance(exc, MqttConnectError) and _rc_value(exc) in _AUTH_CODES:
                        where = f"broker at {cfg.host}:{cfg.port}"
                        self._fatal = BusAuthError(cfg.username, f"{exc} ({where})")
                        self._fatal_event.set()
                        return
                    if await self._expects_tls():
                        self._give_up(self._expects_tls_error())
                        return
                    reason = connect_failure(exc, cfg.connect_timeout)
                    if not cfg.wait_for_broker:
                        self._fatal = BusConnectError(cfg.host, cfg.port, reason)
                        self._fatal_event.set()
                        return
                    if reason != last_reason:  # one line per cause, not one per attempt
                        last_reason = reason
                        log.warning(
                            "cannot reach the broker at %s:%d: %s; retrying until it answers",
                            cfg.host,
                            cfg.port,
                            reason,
                        )
                elif isinstance(exc, MqttConnectError):
                    self._ratelog.warning("connect", "broker refused connection: %s", exc)
                else:
                    self._ratelog.warning("connect", "broker connection lost or failed: %s", exc)
            finally:
                self._up.clear()
                self._conn = None
                if conn is not None:
                    conn.lost.set()
            delay = min(self.config.backoff_max, delay * 2)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _restore(self, client: aiomqtt.Client) -> None:
        """After (re)connecting: subscriptions first, then the retained state we own."""
        for flt, topic in list(self._subs.items()):
            try:
                await _subscribe(client, flt, topic.qos, self.config.publish_timeout)
            except SubscriptionRefused as exc:
                log.error("%s; dropping it", exc)
                self._subs.pop(flt, None)
        if self.stats.connects:
            for topic_str, data in list(self._retained.items()):
                await client.publish(
                    topic_str, data, qos=1, retain=True, timeout=self.config.publish_timeout
                )


async def _subscribe(
    client: aiomqtt.Client,
    flt: str,
    qos: int,
    timeout: float,
) -> None:
    try:
        granted = await client.subscribe(flt, qos=qos, timeout=timeout)
    except aiomqtt.MqttError as exc:
        raise BusError(f"subscribe {flt!r} failed: {exc}") from exc
    for code in granted:
        value = code.value if hasattr(code, "value") else int(code)
        if value >= 0x80:
            raise SubscriptionRefused(flt, value)


async def _until_lost(coro: Coroutine[Any, Any, None], lost: asyncio.Event) -> None:
    """Await ``coro`` unless the connection it runs on drops first."""
    if lost.is_set():
        coro.close()
        raise _ConnectionLost
    work = asyncio.ensure_future(coro)
    watch = asyncio.ensure_future(lost.wait())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if work.done() and not work.cancelled():
        work.result()
        return
    raise _ConnectionLost


def _rc_value(exc: aiomqtt.MqttCodeError) -> int:
    rc = exc.rc
    if rc is None:
        return -1
    return int(rc.value) if hasattr(rc, "value") else int(rc)


def connect_failure(exc: BaseException, timeout: float) -> str:
    """Why a connection attempt failed, in words a user can act on.

    aiomqtt turns the socket's OSError into a bare MqttError (``raise ... from None``);
    the original stays reachable as the exception's context, and its type is what tells a
    refused connection from an unknown host, a silent one or a TLS failure.
    """
    cause: BaseException | None = exc
    for _ in range(4):
        if cause is None or isinstance(cause, OSError):
            break
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, socket.gaierror):
        return f"unknown host ({cause.strerror})"
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, TimeoutError):
        return f"no answer within {timeout:.3g} s"
    if isinstance(cause, ssl.SSLError):
        return f"TLS failed: {cause.reason or cause}"
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror[0].lower() + cause.strerror[1:]
    if isinstance(exc, MqttConnectError):
        return f"the broker refused the connection: {exc}"
    if "timed out" in str(exc):  # TCP connected but no CONNACK: not an MQTT broker?
        return f"no MQTT answer within {timeout:.3g} s (is it an MQTT broker?)"
    return str(exc) or type(exc).__name__


def _abandon_connect(client: aiomqtt.Client) -> None:
    """Close a client whose connect was cancelled before the CONNACK.

    aiomqtt keeps the socket registered and its CONNACK future cancelled; the socket's next
    event then calls ``exception()`` on that future and asyncio logs a traceback. Closing
    the socket and resetting the future (as aiomqtt does after a failed connect) avoids it.
    """
    client._connected = asyncio.get_running_loop().create_future()
    client._client._sock_close()
