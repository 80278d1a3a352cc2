"""The OpenAI-compatible gateway as users meet it: a real Mosquitto, the orchestrator and
two agents (a PREFILL and a DECODER replica, the KV cache moving between them), the
`e2llm gateway` process, and the official `openai` package (sync and async clients),
raw HTTP where a client must misbehave, and `e2llm chat` in a pseudo-terminal."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import select
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from terminal import as_from_a_terminal

from e2llm_edge.device.profile import load_or_measure_profile
from e2llm_edge.fog.textio import encode_chat, load_tokenizer
from e2llm_edge.ops.broker import MosquittoBroker, free_port
from e2llm_edge.ops.localcluster import LocalCluster, Proc
from e2llm_edge.ops.up import local_inventory
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus
from onnx_export.manifest import Manifest

pytestmark = [pytest.mark.model, pytest.mark.mosquitto, pytest.mark.slow]

KEY = "test-key-1"
CLUSTER = "gw"


@pytest.fixture(scope="module")
def live(mosquitto: MosquittoBroker, default_model: Path) -> Iterator[LocalCluster]:
    profile = load_or_measure_profile(Manifest.load(default_model), threads=1)
    with LocalCluster(
        default_model,
        local_inventory(2, profile),
        broker_url=mosquitto.url,
        cluster=CLUSTER,
        # device counters every 0.25 s: cancellation is checked within 1 s
        agent_args=["--telemetry-interval", "0.25"],
    ) as c:
        c.wait_serving(timeout=180)
        yield c


@pytest.fixture(scope="module")
def gateway(
    live: LocalCluster, default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("gateway")
    keys = d / "keys"
    keys.write_text(f"# rotated keys\n{KEY}\nsecond-key\n")
    port = free_port()
    assert live.broker_url is not None
    proc = Proc(
        "gateway",
        [
            sys.executable,
            "-m",
            "e2llm_edge.cli",
            "gateway",
            "--broker",
            live.broker_url,
            "--cluster",
            CLUSTER,
            "--model",
            str(default_model),
            "--port",
            str(port),
            "--api-key-file",
            str(keys),
            "--max-body-bytes",
            "65536",
        ],
        d / "gateway.log",
    )
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.alive, proc.tail()
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(f"{url}/health", timeout=2) as r,
            ):
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, f"gateway not healthy:\n{proc.tail()}"
            time.sleep(0.2)
        yield {"url": url, "model": default_model.name, "proc": proc, "dir": default_model}
    finally:
        proc.stop()


def client(gw: dict[str, Any], key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def metrics(gw: dict[str, Any]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(gw["url"] + "/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def requests_with(gw: dict[str, Any], status: str, endpoint: str = "/v1/chat/completions") -> float:
    key = ("e2llm_gateway_requests_total", (("endpoint", endpoint), ("status", status)))
    return metrics(gw).get(key, 0.0)


def local_generate(model: Path, prompt: str, n: int, raw: bool = False) -> dict[str, Any]:
    """`e2llm generate --json` as a user runs it (the local reference path)."""
    cmd = [sys.executable, "-m", "e2llm_edge.cli", "generate", prompt, "--json"]
    cmd += ["--model", str(model), "--max-new-tokens", str(n)] + (["--raw"] if raw else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(out.stdout.splitlines()[-1])  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- the API


def test_models_and_health(gateway: dict[str, Any]) -> None:
    models = client(gateway).models.list()
    assert [x.id for x in models.data] == [gateway["model"]]
    with urllib.request.urlopen(gateway["url"] + "/health", timeout=5) as r:
        body = json.loads(r.read())
    assert body["status"] == "ok" and body["serving"] is True


def test_chat_non_streaming_with_usage(gateway: dict[str, Any]) -> None:
    r = client(gateway).chat.completions.create(
        model=gateway["model"],
        messages=[
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What colour is the sky?"},
        ],
        max_tokens=6,
        temperature=0,
    )
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    tok = load_tokenizer(gateway["dir"])
    want_prompt = encode_chat(
        tok,
        [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What colour is the sky?"},
        ],
    )
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(want_prompt)
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    if r.choices[0].finish_reason == "length":
        assert r.usage.completion_tokens == 6


async def test_chat_streaming_async_client_with_usage(gateway: dict[str, Any]) -> None:
    ac = openai.AsyncOpenAI(base_url=gateway["url"] + "/v1", api_key=KEY, max_retries=0)
    async with ac:
        stream = await ac.chat.completions.create(
            model=gateway["model"],
            messages=[{"role": "user", "content": "Count from one to ten."}],
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        whole = await ac.chat.completions.create(
            model=gateway["model"],
            messages=[{"role": "user", "content": "Count from one to ten."}],
            max_tokens=12,
            temperature=0,
        )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == "length" and all(x is None for x in reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 12
    assert text == whole.choices[0].message.content  # streamed = one body, greedy


def test_completions_sync_streaming_and_not(gateway: dict[str, Any]) -> None:
    c = client(gateway)
    r = c.completions.create(
        model=gateway["model"], prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 8
    parts = list(
        c.completions.create(
            model=gateway["model"],
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(p.choices[0].text for p in parts) == r.choices[0].text
    assert parts[-1].choices[0].finish_reason == "length"


def test_greedy_output_equals_generate_json(gateway: dict[str, Any]) -> None:
    """Token for token: a chat message against `e2llm generate --json`, a raw completion
    against `e2llm generate --raw --json` (ids through the `return_token_ids` extension)."""
    c = client(gateway)
    prompt = "What is the capital of France?"
    ref = local_generate(gateway["dir"], prompt, 24)
    r = c.chat.completions.create(
        model=gateway["model"],
        messages=[{"role": "user", "content": prompt}],
        max_tokens=24,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    extra = r.model_extra or {}
    assert extra["prompt_token_ids"] == ref["prompt_ids"]
    assert (r.choices[0].model_extra or {})["token_ids"] == ref["new_ids"]
    assert r.choices[0].message.content == ref["text"]
    raw = "def fibonacci(n):"
    ref = local_generate(gateway["dir"], raw, 16, raw=True)
    rc = c.completions.create(
        model=gateway["model"],
        prompt=raw,
        max_tokens=16,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    assert (rc.choices[0].model_extra or {})["token_ids"] == ref["new_ids"]
    assert rc.choices[0].text == ref["text"]


def test_stop_sequences(gateway: dict[str, Any]) -> None:
    c = client(gateway)
    kw: dict[str, Any] = dict(
        model=gateway["model"],
        messages=[{"role": "user", "content": "List three fruits, one per line."}],
        max_tokens=32,
        temperature=0,
    )
    full = c.chat.completions.create(**kw).choices[0].message.content or ""
    assert len(full) > 12, full
    stop = full[8:11]
    cut = full[: full.index(stop)]
    r = c.chat.completions.create(**kw, stop=[stop, "never-appears"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.completion_tokens < 32
    streamed = list(c.chat.completions.create(**kw, stop=stop, stream=True))
    assert "".join(x.choices[0].delta.content or "" for x in streamed) == cut
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_wrong_or_missing_key_is_401(gateway: dict[str, Any]) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(gateway, key="wrong").models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    req = urllib.request.Request(gateway["url"] + "/v1/chat/completions", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(req, timeout=5)
    assert raw.value.code == 401
    assert json.loads(raw.value.read())["error"]["code"] == "missing_api_key"
    assert client(gateway, key="second-key").models.list().data  # any key of the file


def test_unknown_model_is_404(gateway: dict[str, Any]) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client(gateway).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.code == "model_not_found"


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 3.0}, "temperature"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"logit_bias": {"5": 10}}, "logit_bias"),
    ],
)
def test_bad_parameters_are_400_naming_them(
    gateway: dict[str, Any], kw: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(gateway).chat.completions.create(
            model=gateway["model"], messages=[{"role": "user", "content": "hi"}], **kw
        )
    assert info.value.param == param


def test_bad_bodies(gateway: dict[str, Any]) -> None:
    def post(data: bytes) -> tuple[int, dict[str, Any]]:
        req = urllib.request.Request(
            gateway["url"] + "/v1/chat/completions",
            data=data,
            method="POST",
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    status, body = post(b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = post(json.dumps({"pad": "x" * 70000}).encode())
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = post(b"[]")
    assert status == 400


async def test_32_concurrent_streams_equal_each_request_alone(gateway: dict[str, Any]) -> None:
    prompts = [f"Give me one fact about the number {n}." for n in range(32)]
    ac = openai.AsyncOpenAI(base_url=gateway["url"] + "/v1", api_key=KEY, max_retries=0)

    async def stream(p: str) -> tuple[str, list[int], str | None, int]:
        s = await ac.chat.completions.create(
            model=gateway["model"],
            messages=[{"role": "user", "content": p}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True},
        )
        text, ids, reason, used = [], [], None, -1
        async for c in s:
            if c.usage is not None:
                used = c.usage.completion_tokens
            for ch in c.choices:
                text.append(ch.delta.content or "")
                ids += (ch.model_extra or {}).get("token_ids", [])
                reason = ch.finish_reason or reason
        return "".join(text), ids, reason, used

    async def alone(p: str) -> tuple[str, list[int]]:
        r = await ac.chat.completions.create(
            model=gateway["model"],
            messages=[{"role": "user", "content": p}],
            max_tokens=6,
            temperature=0,
            extra_body={"return_token_ids": True},
        )
        return r.choices[0].message.content or "", (r.choices[0].model_extra or {})["token_ids"]

    async with ac:
        together = await asyncio.gather(*[stream(p) for p in prompts])
        single = [await alone(p) for p in prompts]
    for p, (text, ids, reason, used), (want_text, want_ids) in zip(
        prompts, together, single, strict=True
    ):
        assert reason in ("stop", "length"), p  # the stream completed
        assert ids == want_ids and len(ids) == used, p  # no token lost or duplicated
        assert text == want_text, p


async def test_client_disconnect_cancels_on_the_devices_within_a_second(
    gateway: dict[str, Any], live: LocalCluster
) -> None:
    before = requests_with(gateway, "499")
    seen: dict[str, list[tuple[float, m.DeviceCounters]]] = {}
    async with Bus(live.bus_config()) as bus:
        await bus.subscribe(t.DEVICE_TELEMETRY)

        async def watch() -> None:
            while True:
                env = await bus.recv(timeout=5)
                if isinstance(env.msg, m.DeviceTelemetry):
                    seen.setdefault(env.msg.device_id, []).append(
                        (time.monotonic(), env.msg.counters)
                    )

        watcher = asyncio.create_task(watch())
        try:
            async with aiohttp.ClientSession() as s:
                resp = await s.post(
                    gateway["url"] + "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {KEY}"},
                    json={
                        "model": gateway["model"],
                        "messages": [{"role": "user", "content": "Write a very long story."}],
                        "max_tokens": 1000,
                        "temperature": 0,
                        "stream": True,
                    },
                )
                events = 0
                async for line in resp.content:
                    events += line.startswith(b"data: ")
                    # leave mid-stream once a device's telemetry has shown the request
                    # (every 0.25 s; a fast decode can outrun the first sample)
                    held_now = any(c.requests > 0 for rows in seen.values() for _, c in rows)
                    if events >= 4 and (held_now or events >= 400):
                        break
                resp.close()  # the client goes away mid-stream
                t_gone = time.monotonic()
            await asyncio.sleep(2.0)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    # the request held device state (telemetry every 0.25 s: seen by the time it left)
    held = [c.requests for rows in seen.values() for ts, c in rows if ts <= t_gone]
    assert any(n > 0 for n in held), seen
    for dev, rows in seen.items():
        after = [data for ts, data in rows if ts >= t_gone + 1.0]
        assert after, dev
        assert after[0].requests == 0, (dev, after[0])  # slots and KV freed within 1 s
        assert after[0].decode_steps == after[-1].decode_steps, dev  # no more work
    assert requests_with(gateway, "499") == before + 1


def test_metrics_show_requests_latencies_and_devices(
    gateway: dict[str, Any], live: LocalCluster
) -> None:
    hi = [{"role": "user", "content": "hi"}]
    before = {s: requests_with(gateway, s) for s in ("200", "400", "401", "404")}
    client(gateway).chat.completions.create(model=gateway["model"], messages=hi, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        client(gateway, key="nope").chat.completions.create(model=gateway["model"], messages=hi)
    with pytest.raises(openai.NotFoundError):
        client(gateway).chat.completions.create(model="nope", messages=hi)
    with pytest.raises(openai.BadRequestError):
        client(gateway).chat.completions.create(model=gateway["model"], messages=hi, n=3)
    for status, n in before.items():
        assert requests_with(gateway, status) == n + 1, status
    got = metrics(gateway)
    chat = (("endpoint", "/v1/chat/completions"),)
    for h in ("ttft", "tbt", "e2e"):
        assert got[(f"e2llm_gateway_{h}_seconds_count", chat)] > 0, h
    assert got[("e2llm_gateway_tokens_total", (("kind", "completion"),))] > 0
    assert got[("e2llm_cluster_serving", ())] == 1.0
    assert ("e2llm_cluster_queued", ()) in got
    for dev in live.agents:
        assert got[("e2llm_device_status", (("device", dev), ("status", "ready")))] == 1.0
        assert ("e2llm_device_queue_depth", (("device", dev),)) in got
        assert got[("e2llm_device_memory_budget_bytes", (("device", dev),))] > 0


# --------------------------------------------------------------------------- e2llm chat


class Pty:
    """A program on a pseudo-terminal it owns as its controlling terminal, so Ctrl-C typed
    here reaches it as SIGINT, as in a real terminal."""

    def __init__(self, cmd: list[str]) -> None:
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            cmd,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            preexec_fn=self._terminal,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        os.close(slave)
        self.screen = ""

    @staticmethod
    def _terminal() -> None:
        """In the child: the pty as its controlling terminal, SIGINT at its default."""
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        as_from_a_terminal()

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def read(self, timeout: float) -> None:
        """Add what the program printed within ``timeout`` seconds to ``screen``."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            with contextlib.suppress(OSError):  # OSError: the program exited
                self.screen += os.read(self.master, 4096).decode(errors="replace")

    def until(self, marker: str, timeout: float = 60.0, start: int = 0) -> str:
        """Read until ``marker`` appears after ``start``; returns the screen from there."""
        deadline = time.monotonic() + timeout
        while marker not in self.screen[start:]:
            left = deadline - time.monotonic()
            assert left > 0, f"no {marker!r} on screen:\n{self.screen[-2000:]}"
            self.read(min(left, 0.5))
        return self.screen[start:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        os.close(self.master)


def test_chat_in_a_terminal_keeps_history_and_ctrl_c_stops_an_answer(
    gateway: dict[str, Any], tmp_path: Path
) -> None:
    keys = tmp_path / "key"
    keys.write_text(KEY + "\n")
    tok = load_tokenizer(gateway["dir"])
    prompt_tokens = ("e2llm_gateway_tokens_total", (("kind", "prompt"),))
    term = Pty(
        [
            *(sys.executable, "-m", "e2llm_edge.cli", "chat", "--url", gateway["url"]),
            *("--api-key-file", str(keys), "--max-tokens", "400"),
        ]
    )
    history: list[dict[str, str]] = []

    def say(text: str, interrupt_after: int | None = None) -> tuple[str, float]:
        """Type a line; returns the answer as shown and the prompt tokens it cost."""
        before = metrics(gateway).get(prompt_tokens, 0.0)
        mark = len(term.screen)
        term.type(text + "\r")
        if interrupt_after is not None:
            term.until("assistant> ", start=mark)
            while len(term.screen[mark:].split("assistant> ", 1)[1]) < interrupt_after:
                term.read(0.05)
            term.type("\x03")  # Ctrl-C
            out = term.until("you> ", start=mark)
            # the terminal echoes the Ctrl-C as ^C: not part of the answer
            answer = out.split("assistant> ", 1)[1].split(" [stopped]", 1)[0].removesuffix("^C")
            assert " [stopped]" in out
        else:
            out = term.until("you> ", start=mark)
            answer = out.split("assistant> ", 1)[1].rsplit("\r\n", 1)[0]
        return answer.replace("\r\n", "\n"), metrics(gateway)[prompt_tokens] - before

    try:
        term.until("you> ")
        a1, cost1 = say("Name a colour.")
        history += [{"role": "user", "content": "Name a colour."}]
        assert a1 and cost1 == len(encode_chat(tok, history))
        history.append({"role": "assistant", "content": a1})
        cancelled = requests_with(gateway, "499")
        a2, cost2 = say("Write a long story about a dragon.", interrupt_after=20)
        history += [{"role": "user", "content": "Write a long story about a dragon."}]
        assert cost2 == len(encode_chat(tok, history))  # the whole conversation was sent
        history.append({"role": "assistant", "content": a2})
        deadline = time.monotonic() + 5
        while requests_with(gateway, "499") == cancelled and time.monotonic() < deadline:
            time.sleep(0.1)
        assert requests_with(gateway, "499") == cancelled + 1  # stopped on the cluster too
        a3, cost3 = say("Thanks!")
        history += [{"role": "user", "content": "Thanks!"}]
        assert a3 and cost3 == len(encode_chat(tok, history))  # the stopped answer was kept
        assert term.proc.poll() is None  # Ctrl-C during an answer did not quit
        term.type("\x04")  # Ctrl-D at the prompt quits
        assert term.proc.wait(15) == 0
    finally:
        term.close()


def test_gateway_bench_short(gateway: dict[str, Any], live: LocalCluster) -> None:
    """`bench/gateway_bench.py`, small: both paths answer and every figure is reported."""
    bench = Path(__file__).resolve().parents[2] / "bench"
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    import gateway_bench

    assert live.broker_url is not None
    res = gateway_bench.main(
        [
            *("--broker", live.broker_url, "--cluster", CLUSTER, "--url", gateway["url"]),
            *("--api-key", KEY, "--model", str(gateway["dir"]), "--rounds", "4"),
            *("--tokens", "4", "--clients", "4", "--per-client", "1", "--crowd-tokens", "3"),
        ]
    )
    assert res["throughput"]["gateway"]["tokens"] == res["throughput"]["direct"]["tokens"] == 12
    for path in ("direct", "gateway"):
        assert res["request"][path]["p99_ms"] > 0 and res["token"][path]["p99_ms"] > 0
