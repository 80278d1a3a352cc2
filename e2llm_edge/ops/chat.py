"""`e2llm chat`: an interactive multi-turn chat in the terminal.

Talks to a gateway (`--url`, any OpenAI-compatible server) or straight to a cluster over
MQTT (`--broker`, the chat template applied here). The conversation is kept and sent
whole each turn; tokens print as they come. Ctrl-C during an answer stops it (the request
is cancelled on the cluster) and keeps what was shown; Ctrl-C or Ctrl-D at the prompt
quits; `/reset` starts over.

The terminal stays in the main thread (``input`` with its line editing and Ctrl-C), the
network on an event loop in a second thread, so the MQTT connection keeps its keepalive
while the user types.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import sys
import threading
from collections.abc import AsyncGenerator, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, Self, TextIO, TypeVar

from e2llm_edge.errors import BusError, E2LLMError

T = TypeVar("T")
Message = dict[str, str]


class ChatError(E2LLMError):
    """The server refused or failed a turn; the message says why."""


class Backend(Protocol):
    where: str
    model: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    def reply(self, messages: list[Message]) -> AsyncGenerator[str, None]: ...


class HttpBackend:
    """An OpenAI-compatible server: streamed chat completions over HTTP."""

    def __init__(
        self, url: str, api_key: str | None, max_tokens: int, temperature: float, timeout: float
    ) -> None:
        self.base = url.rstrip("/").removesuffix("/v1")
        self.where = self.base
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.max_tokens, self.temperature, self.timeout = max_tokens, temperature, timeout
        self.model = ""
        self._session: Any = None

    async def __aenter__(self) -> Self:
        import aiohttp

        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.timeout),
            headers=self.headers,
        )
        try:
            async with self._session.get(f"{self.base}/v1/models") as resp:
                body = await resp.json(content_type=None)
                if resp.status != 200:
                    raise ChatError(f"{self.base}/v1/models: {_error_text(body, resp.status)}")
                self.model = body["data"][0]["id"]
        except aiohttp.ClientError as exc:
            await self._session.close()
            raise ChatError(f"cannot reach {self.base}: {exc}") from exc
        except BaseException:
            await self._session.close()
            raise
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._session.close()

    async def reply(self, messages: list[Message]) -> AsyncGenerator[str, None]:
        import aiohttp

        from e2llm_edge.fog.openai_api import parse_sse

        body = {
            "model": self.model,
            "messages": messages,
            "stream": True,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        try:
            async with self._session.post(f"{self.base}/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    err = await resp.json(content_type=None)
                    raise ChatError(_error_text(err, resp.status))
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line == "data: [DONE]":
                        return
                    for chunk in parse_sse([line]):
                        if "error" in chunk:
                            raise ChatError(_error_text(chunk, 200))
                        for choice in chunk.get("choices", []):
                            text = choice.get("delta", {}).get("content")
                            if text:
                                yield text
        except aiohttp.ClientError as exc:
            raise ChatError(f"{self.base}: {exc}") from exc
        except TimeoutError as exc:
            raise ChatError(f"{self.base}: no answer for {self.timeout:.0f} s") from exc


class BrokerBackend:
    """A cluster over MQTT: the chat template applied here, the prompt sent as token ids."""

    def __init__(
        self, args: argparse.Namespace, model_dir: Path, max_tokens: int, temperature: float
    ) -> None:
        from e2llm_edge.cli import _bus_config
        from e2llm_edge.client import Client
        from e2llm_edge.fog.textio import load_tokenizer
        from e2llm_edge.wire.bus import BusConfig

        cfg = _bus_config(args)
        assert isinstance(cfg, BusConfig)
        self.tokenizer = load_tokenizer(model_dir)
        self.client = Client(cfg)
        self.where = f"{args.broker} (cluster {args.cluster})"
        self.model = model_dir.name
        self.max_tokens, self.temperature, self.timeout = max_tokens, temperature, args.timeout

    async def __aenter__(self) -> Self:
        await self.client.__aenter__()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.client.__aexit__(et, e, tb)

    async def reply(self, messages: list[Message]) -> AsyncGenerator[str, None]:
        from e2llm_edge.client import GenerationError
        from e2llm_edge.fog.textio import encode_chat

        ids = encode_chat(self.tokenizer, messages)
        room = self.tokenizer.context_length - len(ids)
        if room < 1:
            raise ChatError("the conversation fills the model's context; /reset to start over")
        events = self.client.generate(
            prompt_ids=ids,
            raw=True,
            max_new_tokens=min(self.max_tokens, room),
            temperature=self.temperature,
            timeout=self.timeout,
        )
        try:
            async with contextlib.aclosing(events):
                async for ev in events:
                    if ev.event == "token" and ev.text:
                        yield ev.text
        except (GenerationError, BusError) as exc:
            raise ChatError(str(exc)) from exc


def _error_text(body: Any, status: int) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return f"{status}: {body['error'].get('message')}"
    return f"HTTP {status}"


class Repl:
    """The terminal loop; the backend runs on its own event loop thread."""

    def __init__(self, backend: Backend, system: str | None, out: TextIO = sys.stdout) -> None:
        self.backend = backend
        self.out = out
        self.system = system
        self.history: list[Message] = []
        self.reset()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="chat-io", daemon=True)

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def _call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def run(self) -> int:
        self.thread.start()
        try:
            self._call(self.backend.__aenter__(), timeout=60)
        except E2LLMError as exc:
            print(f"error: {exc}", file=sys.stderr)
            self._stop_loop()
            return 1
        try:
            print(
                f"chat with {self.backend.model} at {self.backend.where}\n"
                "Ctrl-C stops an answer; Ctrl-D (or Ctrl-C here, or /exit) quits; /reset forgets",
                file=self.out,
                flush=True,
            )
            while self._turn():
                pass
        finally:
            with contextlib.suppress(Exception):
                self._call(self.backend.__aexit__(None, None, None), timeout=10)
            self._stop_loop()
        return 0

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def _turn(self) -> bool:
        """One exchange; False when the user quits."""
        try:
            line = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=self.out)
            return False
        if line in ("/exit", "/quit"):
            return False
        if line == "/reset":
            self.reset()
            print("(conversation cleared)", file=self.out, flush=True)
            return True
        if not line:
            return True
        self.history.append({"role": "user", "content": line})
        shown: list[str] = []
        ended = threading.Event()
        self.out.write("assistant> ")
        self.out.flush()
        fut = asyncio.run_coroutine_threadsafe(self._answer(shown, ended), self.loop)
        try:
            while True:
                try:
                    fut.result(timeout=0.1)
                    break
                except concurrent.futures.TimeoutError:
                    continue
        except KeyboardInterrupt:
            fut.cancel()  # leaving the stream cancels the request on the cluster
            ended.wait(10)
            self.out.write(" [stopped]")
        except ChatError as exc:
            self.out.write(f"\nerror: {exc}")
            if not shown:
                self.history.pop()  # nothing came back: the turn did not happen
        except concurrent.futures.CancelledError:
            self.out.write(" [stopped]")
        if shown:
            self.history.append({"role": "assistant", "content": "".join(shown)})
        self.out.write("\n")
        self.out.flush()
        return True

    async def _answer(self, shown: list[str], ended: threading.Event) -> None:
        try:
            stream = self.backend.reply(list(self.history))
            async with contextlib.aclosing(stream):
                async for text in stream:
                    shown.append(text)
                    self.out.write(text)
                    self.out.flush()
        finally:
            ended.set()


def run_chat(args: argparse.Namespace, model_dir: Path | None) -> int:
    """`e2llm chat --url URL | --broker URL`."""
    backend: Backend
    if args.url:
        key = None
        if args.api_key_file:
            from e2llm_edge.fog.gateway import read_api_keys

            try:
                key = sorted(read_api_keys(Path(args.api_key_file)))[0]
            except E2LLMError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
        backend = HttpBackend(args.url, key, args.max_tokens, args.temperature, args.timeout)
    else:
        assert model_dir is not None
        backend = BrokerBackend(args, model_dir, args.max_tokens, args.temperature)
    return Repl(backend, args.system).run()
