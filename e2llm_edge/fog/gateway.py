"""`e2llm gateway`: the OpenAI-compatible HTTP API of a cluster, speaking to it over MQTT.

An aiohttp server on the fog node. Each request is validated and mapped by the pure
``openai_api`` module, tokenized here (the model's chat template for chat messages), and
run through one shared ``Client`` (one MQTT connection for every HTTP request); text deltas
pass a stop-string matcher and go out as one JSON body or as server-sent events. A client
that goes away cancels its request on the devices: aiohttp cancels the handler, and leaving
``Client.generate`` sends the cancel the orchestrator forwards to the devices. A second
connection (the monitor's topics) feeds a ``ClusterView`` for /health and /metrics.

Why aiohttp: handler cancellation on disconnect is plain asyncio (one CancelledError,
so the cancel is still published from the generator's ``finally``; an anyio cancel scope
would cancel that publish too), it is one well-kept dependency with a C HTTP parser, and
its client serves `e2llm chat --url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import signal
import sys
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

from aiohttp import web

from e2llm_edge.client import Client, GenerationError
from e2llm_edge.errors import BusError, BusTimeout, E2LLMError, SubscriptionRefused
from e2llm_edge.fog import openai_api as api
from e2llm_edge.fog.metrics import GatewayMetrics
from e2llm_edge.fog.textio import ChatTokenizer, encode_chat
from e2llm_edge.ops.monitor import MONITOR_TOPICS, ClusterView
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig
from onnx_export.manifest import Manifest

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})
"""Served without an API key: they carry no prompt or answer text."""


@dataclass(frozen=True)
class GatewayConfig:
    """How the gateway listens and reaches its cluster."""

    bus: BusConfig
    """The login requests are sent under (a client user)."""
    model_dir: Path
    """The exported model the cluster serves (tokenizer and chat template)."""
    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """TCP port to listen on (0: any free port, see ``Gateway.url``)."""
    api_keys: frozenset[str] = frozenset()
    """Accepted bearer tokens; empty: no authentication."""
    model_id: str | None = None
    """The model name clients pass (default: the model directory's name)."""
    monitor_bus: BusConfig | None = None
    """The login the cluster view reads the monitor topics with (default: ``bus``)."""
    max_body_bytes: int = 1024 * 1024
    """Largest request body accepted (413 beyond)."""
    max_in_flight: int = 256
    """Requests served at once; more are refused with 429."""
    request_timeout: float = 120.0
    """Seconds without any event from the cluster before a request fails with 504."""
    orchestrator_grace_s: float = 3.0
    """How long after start an unseen orchestrator is not yet taken as absent."""


def read_api_keys(path: Path) -> frozenset[str]:
    """One key per line (several allow rotation); blank lines and ``#`` comments skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise E2LLMError(f"{path}: cannot read the API key file ({exc.strerror})") from exc
    keys = frozenset(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
    if not keys:
        raise E2LLMError(f"{path}: no API key in the file (one key per line)")
    return keys


@dataclass
class _Run:
    """One request's progress, shared by the streaming and the one-body answers."""

    job: api.Job
    request_id: str
    t0: float
    endpoint: str
    tokens: int = 0
    finish_reason: str = "stop"
    last_token: float | None = None
    token_ids: list[int] = field(default_factory=list)
    sent_ids: int = 0
    """How many of ``token_ids`` went out in chunks so far."""

    def new_ids(self) -> list[int] | None:
        """The ids since the last chunk (None unless the caller asked for ids)."""
        if not self.job.return_token_ids:
            return None
        ids, self.sent_ids = self.token_ids[self.sent_ids :], len(self.token_ids)
        return ids


class Gateway:
    """``async with Gateway(cfg) as gw: await gw.serve_forever()``; ``gw.url`` once entered."""

    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        manifest = Manifest.load(cfg.model_dir)
        self.tokenizer = ChatTokenizer(manifest)
        self.limits = api.Limits(
            model=cfg.model_id or Path(manifest.directory).resolve().name,
            context_length=self.tokenizer.context_length,
            vocab_size=int(manifest.config["vocab_size"]),
        )
        self.view = ClusterView(cfg.bus.cluster)
        self.metrics = GatewayMetrics(self.view)
        self.client = Client(cfg.bus, resend_s=min(10.0, cfg.request_timeout))
        self.created = int(time.time())
        self.in_flight = 0
        self.view_sees_orchestrator = False
        self._started = time.monotonic()
        self._stack = contextlib.AsyncExitStack()
        self._tasks: list[asyncio.Task[None]] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self) -> Self:
        try:
            await self._stack.enter_async_context(self.client)
            # owned: cancelled and awaited in __aexit__
            self._tasks.append(asyncio.create_task(self._watch_cluster()))
            self._runner = web.AppRunner(
                self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=1.0
            )
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port)
            await site.start()
            host, port = self._runner.addresses[0][:2]
            self.url = f"http://{host}:{port}"
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self._stack.aclose()

    async def serve_forever(self) -> None:
        await asyncio.Event().wait()

    async def _watch_cluster(self) -> None:
        """Feed the cluster view from the monitor topics; reconnects are the Bus's job,
        a failed first connection is retried here."""
        cfg = self.cfg.monitor_bus or self.cfg.bus
        while True:
            try:
                async with Bus(cfg, publish_will_on_close=False) as bus:
                    for topic in MONITOR_TOPICS:
                        try:
                            await bus.subscribe(topic)
                            if topic is t.ORCHESTRATOR_STATE:
                                self.view_sees_orchestrator = True
                        except SubscriptionRefused as exc:
                            log.warning("cluster view: %s (metrics will miss %s)", exc, topic.name)
                    while True:
                        with contextlib.suppress(BusTimeout):
                            self.view.update(await bus.recv(timeout=5.0))
            except BusError as exc:
                log.warning("cluster view: %s; retrying in 5 s", exc)
                self.view_sees_orchestrator = False
                await asyncio.sleep(5.0)

    # ------------------------------------------------------------------ HTTP

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.cfg.max_body_bytes,
            middlewares=[self._count, self._errors, self._auth],
        )
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._model)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        return app

    @web.middleware
    async def _count(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Requests by route and status; 499 when the client went away first."""
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499
            raise
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()

    @web.middleware
    async def _errors(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Every error leaves in OpenAI's JSON shape with its HTTP status, never a traceback."""
        try:
            return await handler(request)
        except api.ApiError as exc:
            return _error_response(exc)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}
            text = exc.reason
            if exc.status == 413:
                text = f"request body larger than {self.cfg.max_body_bytes} bytes"
            elif exc.status == 404:
                text = f"no route {request.method} {request.path}"
            return _error_response(
                api.ApiError(exc.status, text, code=code.get(exc.status, str(exc.status)))
            )
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception as exc:
            log.exception("%s %s failed", request.method, request.path)
            return _error_response(
                api.ApiError(500, f"internal error: {type(exc).__name__}", type="server_error")
            )

    @web.middleware
    async def _auth(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if self.cfg.api_keys and request.path not in OPEN_PATHS:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                raise api.ApiError(
                    401,
                    "missing API key: send 'Authorization: Bearer <key>'",
                    code="missing_api_key",
                )
            # compare against every key so the time taken does not say which one matched
            ok = [hmac.compare_digest(token.encode(), k.encode()) for k in self.cfg.api_keys]
            if not any(ok):
                raise api.ApiError(401, "incorrect API key provided", code="invalid_api_key")
        return await handler(request)

    async def _models(self, request: web.Request) -> web.Response:
        return _json(api.models_body(self.limits.model, self.created))

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.limits.model:
            raise api.ApiError(
                404, f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        return _json(api.models_body(self.limits.model, self.created)["data"][0])

    async def _health(self, request: web.Request) -> web.Response:
        unavailable = self.unavailable()
        s = self.view.summary
        body = {
            "status": "unavailable" if unavailable else "ok",
            "detail": unavailable,
            "model": self.limits.model,
            "cluster": self.cfg.bus.cluster,
            "serving": s.serving if s else None,
            "plan_version": s.plan_version if s else None,
            "queued": s.queued if s else None,
            "in_flight": self.in_flight,
        }
        return _json(body, status=503 if unavailable else 200)

    async def _metrics(self, request: web.Request) -> web.Response:
        data, ctype = self.metrics.render()
        return web.Response(body=data, headers={"Content-Type": ctype})

    def unavailable(self) -> str | None:
        """Why requests cannot be served now, as known from the topics (None: they can)."""
        if not self.view_sees_orchestrator:
            return None  # this login cannot see the orchestrator: let the cluster answer
        orch = self.view.orchestrator
        if orch is None:
            if time.monotonic() - self._started < self.cfg.orchestrator_grace_s:
                return None
            return f"no orchestrator on cluster {self.cfg.bus.cluster!r}"
        if orch.status != "online":
            return f"the orchestrator is {orch.status}"
        summary = self.view.summary
        if summary is not None and summary.plan_error:
            return f"no plan: {summary.plan_error}"
        return None

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "chat")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "completion")

    async def _serve(self, request: web.Request, kind: api.Kind) -> web.StreamResponse:
        t0 = time.perf_counter()
        job = self._parse(kind, await _read_json(request))
        why = self.unavailable()
        if why is not None:
            raise api.ApiError(503, why, type="service_unavailable", code="unavailable")
        if self.in_flight >= self.cfg.max_in_flight:
            raise api.ApiError(
                429,
                f"{self.in_flight} requests in flight; retry later",
                type="rate_limit_exceeded",
                code="too_many_requests",
            )
        run = _Run(job, uuid.uuid4().hex, t0, request.path)
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            return await (self._stream(request, run) if job.stream else self._answer(run))
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    def _parse(self, kind: api.Kind, body: Any) -> api.Job:
        if kind == "chat":
            return api.parse_chat(body, self.limits, lambda msgs: encode_chat(self.tokenizer, msgs))
        return api.parse_completion(body, self.limits, self.tokenizer.encode_raw)

    async def _deltas(self, run: _Run) -> AsyncGenerator[str, None]:
        """Released text per token (empty while a stop string may be starting); ends after
        the last token, a stop string, or raises ApiError."""
        job = run.job
        seed = job.seed
        if seed is None:
            # without a seed OpenAI's sampling differs per request; greedy ignores it
            seed = secrets.randbits(31) if job.temperature > 0 else 0
        matcher = api.StopMatcher(job.stop)
        m = self.metrics
        try:
            events = self.client.generate(
                prompt_ids=job.prompt_ids,
                raw=True,
                max_new_tokens=job.max_tokens,
                temperature=job.temperature,
                top_p=job.top_p,
                seed=seed,
                timeout=self.cfg.request_timeout,
                request_id=run.request_id,
            )
            async with contextlib.aclosing(events):
                async for ev in events:
                    if ev.event != "token":
                        run.finish_reason = "length" if ev.finish_reason == "length" else "stop"
                        tail = matcher.flush()
                        if tail:
                            yield tail
                        return
                    now = time.perf_counter()
                    if run.last_token is None:
                        m.ttft.labels(run.endpoint).observe(now - run.t0)
                    else:
                        m.tbt.labels(run.endpoint).observe(now - run.last_token)
                    run.last_token = now
                    run.tokens += len(ev.token_ids)
                    run.token_ids += ev.token_ids
                    yield matcher.push(ev.text)
                    if matcher.stopped:
                        run.finish_reason = "stop"
                        return  # leaving generate() cancels the rest on the cluster
        except GenerationError as exc:
            msg = exc.event.error if exc.event is not None and exc.event.error else str(exc)
            raise api.cluster_error(exc.code, msg or exc.code) from exc
        except BusTimeout as exc:
            raise api.ApiError(
                504,
                f"no answer from the cluster for {self.cfg.request_timeout:.0f} s",
                type="timeout",
                code="timeout",
            ) from exc
        except BusError as exc:
            raise api.ApiError(
                503, f"the cluster is unreachable: {exc}", type="service_unavailable"
            ) from exc
        finally:
            if run.last_token is not None:
                m.e2e.labels(run.endpoint).observe(time.perf_counter() - run.t0)
            m.tokens.labels("completion").inc(run.tokens)

    async def _answer(self, run: _Run) -> web.Response:
        deltas = self._deltas(run)
        async with contextlib.aclosing(deltas):
            text = "".join([d async for d in deltas])
        self.metrics.tokens.labels("prompt").inc(len(run.job.prompt_ids))
        body = api.completion_body(
            run.job,
            run.request_id,
            int(time.time()),
            text,
            run.finish_reason,
            len(run.job.prompt_ids),
            run.tokens,
            run.token_ids,
        )
        return _json(body, headers={"X-Request-Id": run.request_id})

    async def _stream(self, request: web.Request, run: _Run) -> web.StreamResponse:
        """SSE; the status line waits for the first token so that an early refusal (bad
        request, overload, timeout) is still an HTTP error, not an event."""
        job, rid, created = run.job, run.request_id, int(time.time())
        deltas = self._deltas(run)
        async with contextlib.aclosing(deltas):
            first = await anext(deltas, None)
            resp = web.StreamResponse(
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Request-Id": rid,
                }
            )
            await resp.prepare(request)
            self.metrics.tokens.labels("prompt").inc(len(job.prompt_ids))
            if job.kind == "chat":  # the role comes first, as OpenAI sends it
                await resp.write(api.sse(api.chunk_body(job, rid, created, text="", first=True)))
            try:
                if first:
                    await resp.write(
                        api.sse(
                            api.chunk_body(job, rid, created, text=first, token_ids=run.new_ids())
                        )
                    )
                async for d in deltas:
                    if d:
                        chunk = api.chunk_body(job, rid, created, text=d, token_ids=run.new_ids())
                        await resp.write(api.sse(chunk))
            except api.ApiError as exc:  # after the status line: an error event ends it
                await resp.write(api.sse(exc.body()))
                await resp.write_eof()
                return resp
        final = api.chunk_body(
            job, rid, created, finish_reason=run.finish_reason, token_ids=run.new_ids()
        )
        await resp.write(api.sse(final))
        if job.include_usage:
            n_prompt = len(job.prompt_ids)
            await resp.write(api.sse(api.usage_chunk(job, rid, created, n_prompt, run.tokens)))
        await resp.write(api.SSE_DONE)
        await resp.write_eof()
        return resp


async def _read_json(request: web.Request) -> Any:
    raw = await request.read()  # bounded by client_max_size (413)
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise api.ApiError(400, f"the request body is not valid JSON: {exc}") from exc


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(body, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _error_response(exc: api.ApiError) -> web.Response:
    headers = {"Retry-After": "1"} if exc.status in (429, 503) else None
    return _json(exc.body(), status=exc.status, headers=headers)


def _login(
    args: argparse.Namespace,
    user: str | None,
    password_file: str | None,
    identity: str | None = None,
) -> BusConfig:
    over: dict[str, Any] = {"cluster": args.cluster}
    if user:
        over["username"] = user
    if password_file:
        over["password"] = Path(password_file).read_text().strip()
    return BusConfig.from_url(args.broker, identity=identity, **over)


def config_from_args(args: argparse.Namespace, model_dir: Path) -> GatewayConfig:
    """The gateway's settings from `e2llm gateway`'s options."""
    monitor = None
    if args.monitor_identity or args.monitor_username:
        monitor = _login(
            args, args.monitor_username, args.monitor_password_file, args.monitor_identity
        )
    return GatewayConfig(
        bus=_login(args, args.username, args.password_file, args.identity),
        model_dir=model_dir,
        host=args.host,
        port=args.port,
        api_keys=read_api_keys(Path(args.api_key_file)) if args.api_key_file else frozenset(),
        model_id=args.model_id,
        monitor_bus=monitor,
        max_body_bytes=args.max_body_bytes,
        max_in_flight=args.max_in_flight,
        request_timeout=args.request_timeout,
    )


async def serve(cfg: GatewayConfig, on_ready: Callable[[Gateway], None] | None = None) -> None:
    """Run a gateway until cancelled (SIGTERM and Ctrl-C end it cleanly)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    async with Gateway(cfg) as gw:
        if on_ready is not None:
            on_ready(gw)
        await gw.serve_forever()


def cmd_gateway(args: argparse.Namespace, model_dir: Path) -> int:
    """`e2llm gateway`: serve until Ctrl-C or SIGTERM."""
    try:
        cfg = config_from_args(args, model_dir)
    except (OSError, E2LLMError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    def ready(gw: Gateway) -> None:
        auth = "API key required" if cfg.api_keys else "no API key (use --api-key-file)"
        print(
            f"gateway: {gw.url}/v1 serving model {gw.limits.model!r} from cluster "
            f"{cfg.bus.cluster!r} at {args.broker}; {auth}",
            file=sys.stderr,
            flush=True,
        )

    try:
        asyncio.run(serve(cfg, ready))
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    except OSError as exc:  # e.g. the port is taken
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 2
    except E2LLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
