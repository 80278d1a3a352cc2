"""Submit prompts to a running cluster and stream the answers.

    async with Client(BusConfig.from_url("mqtt://127.0.0.1:1883")) as c:
        async for ev in c.generate("Hello"):
            print(ev.text, end="")

`generate` yields `token` events and ends after the `done` event; an `error` event raises
`GenerationError` (after the tokens that did arrive). Cancelling the iteration cancels
the request on the cluster.

Across broker restarts: after each reconnect, after `resend_s` seconds without an event,
and when a token arrives ahead of a missing one, the request is sent again under the same
id; the orchestrator answers a request it
knows by sending again what was streamed so far. Token events are yielded strictly in
index order, each index once (duplicates dropped, early ones held until the gap fills;
gaps still open at `done` are filled from its full token list).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import sys
import uuid
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Any, Self

from e2llm_edge.errors import BusTimeout, E2LLMError, SubscriptionRefused
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig

log = logging.getLogger(__name__)


class GenerationError(E2LLMError):
    """The cluster ended a request with an error event (code and message from it)."""

    def __init__(self, code: str, message: str, event: m.ResponseEvent | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.event = code, event


class Client:
    def __init__(
        self, config: BusConfig, client_id: str | None = None, resend_s: float = 10.0
    ) -> None:
        self.id = client_id or config.username or f"client-{uuid.uuid4().hex[:10]}"
        self.config = config
        self.resend_s = resend_s
        """Silence after which a request is sent again (same id; the cluster dedupes)."""
        self._bus: Bus | None = None
        self._streams: dict[str, asyncio.Queue[m.ResponseEvent]] = {}
        self._submitted: dict[str, m.GenerateRequest] = {}
        self._held: dict[str, list[int]] = {}
        """Tokens of each unfinished request already yielded, in order (for a resume)."""
        self._epoch: int | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.resent = 0

    async def __aenter__(self) -> Self:
        self._bus = Bus(self.config)
        await self._bus.__aenter__()
        await self._bus.subscribe(t.RESPONSE, client_id=self.id)
        try:
            await self._bus.subscribe(t.ORCHESTRATOR_STATE)
        except SubscriptionRefused:
            # an ACL from before takeovers existed: unfinished requests are then re-sent
            # after `resend_s` of silence instead of at once when a standby takes over
            log.info("may not read the orchestrator's state: takeovers noticed by silence")
        # owned: cancelled and awaited in __aexit__
        self._tasks = [
            asyncio.create_task(self._read()),
            asyncio.create_task(self._watch_reconnects()),
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._bus is not None:
            await self._bus.__aexit__(exc_type, exc, tb)

    async def _read(self) -> None:
        assert self._bus is not None
        async for env in self._bus:
            msg = env.msg
            if isinstance(msg, m.ResponseEvent):
                q = self._streams.get(msg.request_id)
                if q is not None:
                    # full only if the cluster replays far more than was asked for: the
                    # gap logic asks again for anything dropped here
                    with contextlib.suppress(asyncio.QueueFull):
                        q.put_nowait(msg)
            elif isinstance(msg, m.OrchestratorState) and msg.status == "online":
                if self._epoch is not None and msg.epoch != self._epoch:
                    # another orchestrator took over: it knows nothing of our requests
                    for rid in list(self._submitted):
                        await self._resend(rid)
                self._epoch = msg.epoch

    async def _watch_reconnects(self) -> None:
        """After a reconnect, send every unfinished request again: the first copy, or the
        answers to it, may have died with the broker."""
        assert self._bus is not None
        seen = self._bus.stats.connects
        while True:
            await asyncio.sleep(0.2)
            if self._bus.stats.connects != seen:
                seen = self._bus.stats.connects
                for rid in list(self._submitted):
                    await self._resend(rid)

    async def _resend(self, rid: str) -> None:
        """The request again, with the tokens already received: a new orchestrator
        continues from there, the old one replays what we may have missed."""
        assert self._bus is not None
        req = self._submitted.get(rid)
        if req is None:
            return
        self.resent += 1
        req = dataclasses.replace(req, resume=list(self._held.get(rid, [])))
        with contextlib.suppress(E2LLMError):
            await self._bus.publish(t.REQUEST, req, client_id=self.id)

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: list[m.ChatMessage] | None = None,
        prompt_ids: list[int] | None = None,
        raw: bool = False,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        timeout: float = 120.0,
        request_id: str | None = None,
    ) -> AsyncGenerator[m.ResponseEvent, None]:
        """Stream one request's events; `timeout` bounds the wait for each next event.

        `request_id` (default: a fresh uuid) names the request on the cluster, so a caller
        can correlate its own ids with the monitor's request events; it must be unique.
        """
        assert self._bus is not None
        rid = m.RequestId(request_id or uuid.uuid4().hex)
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in flight on this client")
        q: asyncio.Queue[m.ResponseEvent] = asyncio.Queue(maxsize=4 * max(max_new_tokens, 1) + 64)
        self._streams[rid] = q
        finished = False
        req = m.GenerateRequest(
            request_id=rid,
            client_id=m.ClientId(self.id),
            prompt=prompt,
            messages=messages,
            prompt_ids=prompt_ids,
            raw=raw,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        held: list[int] = []
        try:
            await self._bus.publish(t.REQUEST, req, client_id=self.id)
            self._submitted[rid] = req
            self._held[rid] = held
            early: dict[int, m.ResponseEvent] = {}
            loop = asyncio.get_running_loop()
            silent_since = loop.time()
            gap_asked = -1.0
            while True:
                left = timeout - (loop.time() - silent_since)
                if left <= 0:
                    raise BusTimeout("response", None, timeout)
                try:
                    ev = await asyncio.wait_for(q.get(), min(left, self.resend_s))
                except TimeoutError:
                    if loop.time() - silent_since < timeout:
                        await self._resend(rid)
                    continue
                silent_since = loop.time()
                if ev.event == "token":
                    if ev.index >= len(held):
                        early.setdefault(ev.index, ev)  # the first copy of an index wins
                    while len(held) in early:
                        tok = early.pop(len(held))
                        held.extend(tok.token_ids)
                        yield tok
                    if early and loop.time() - gap_asked > 1.0:
                        gap_asked = loop.time()  # tokens went missing: ask for a replay
                        await self._resend(rid)
                elif ev.event == "done":
                    finished = True
                    for i in range(len(held), len(ev.token_ids)):
                        yield early.get(i) or m.ResponseEvent(
                            request_id=rid, event="token", token_ids=[ev.token_ids[i]], index=i
                        )
                    yield ev
                    return
                else:
                    finished = True
                    raise GenerationError(
                        ev.error_code.value if ev.error_code else "error", ev.error or "", ev
                    )
        finally:
            self._streams.pop(rid, None)
            self._submitted.pop(rid, None)
            self._held.pop(rid, None)
            if not finished and self._bus is not None:
                with contextlib.suppress(E2LLMError):
                    await self._bus.publish(
                        t.REQUEST,
                        m.Release(request_id=rid, reason="cancelled by the client"),
                        client_id=self.id,
                    )


async def collect(client: Client, prompt: str | None = None, **kw: Any) -> dict[str, Any]:
    """Run one request to the end: the same fields as the local `--json` output."""
    new_ids: list[int] = []
    text: list[str] = []
    done: m.ResponseEvent | None = None
    async for ev in client.generate(prompt, **kw):
        if ev.event == "token":
            new_ids.extend(ev.token_ids)
            text.append(ev.text)
        else:
            done = ev
    assert done is not None and done.stats is not None
    stats = dataclasses.asdict(done.stats)
    return {
        "prompt_ids": stats.pop("prompt_ids"),
        "new_ids": new_ids,
        "text": "".join(text),
        "finish_reason": done.finish_reason,
        "stats": stats,
    }


def run_generate_cli(args: argparse.Namespace) -> int:
    """`e2llm generate --broker URL PROMPT`: stream (or --json) an answer from a cluster."""
    from e2llm_edge.cli import _bus_config

    cfg = _bus_config(args)

    async def main() -> int:
        async with Client(cfg) as c:
            kw = dict(
                raw=args.raw,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                timeout=args.timeout,
            )
            try:
                if args.json:
                    print(json.dumps(await collect(c, args.prompt, **kw)))
                    return 0
                async for ev in c.generate(args.prompt, **kw):
                    if ev.event == "token":
                        sys.stdout.write(ev.text)
                        sys.stdout.flush()
                    elif ev.stats is not None:
                        s = ev.stats
                        print()
                        print(
                            f"[{s.prompt_tokens} prompt tokens; {s.new_tokens} new tokens; "
                            f"waiting {s.waiting_s} s, first token {s.ttft_s} s, "
                            f"{s.decode_tokens_per_s} tokens/s]",
                            file=sys.stderr,
                        )
            except GenerationError as exc:
                print(f"\nerror: {exc}", file=sys.stderr)
                return 1
            except BusTimeout as exc:
                print(f"\nerror: {exc}", file=sys.stderr)
                return 1
        return 0

    return asyncio.run(main())
