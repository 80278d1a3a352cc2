"""The OpenAI API's shapes without I/O: request validation, stop strings, response bodies.

The gateway's HTTP shell (``fog/gateway.py``) feeds request bodies in and writes what comes
out; everything here is pure and tested in milliseconds. A request becomes a ``Job`` (what
the cluster runs: prompt ids, limits, sampling, stop strings); every defect becomes an
``ApiError`` carrying OpenAI's error shape and the HTTP status to answer with.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

MAX_STOP_STRINGS = 4
"""OpenAI's limit on ``stop`` sequences per request."""
MAX_SEED = 2**63 - 1

Kind = Literal["chat", "completion"]


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_value")


# What the cluster's error codes mean over HTTP: a request the cluster refused as invalid is
# the caller's fault (400); a full queue asks the caller to retry later (429); no plan or
# no orchestrator means the service is unavailable (503); anything else failed upstream.
_CLUSTER_ERRORS: dict[str, tuple[int, str]] = {
    "bad_request": (400, "invalid_request_error"),
    "overloaded": (429, "rate_limit_exceeded"),
    "no_plan": (503, "service_unavailable"),
    "retries_exhausted": (503, "service_unavailable"),
}


def cluster_error(code: str, message: str) -> ApiError:
    """The ApiError for a cluster's ``error`` event with this code."""
    status, kind = _CLUSTER_ERRORS.get(code, (502, "upstream_error"))
    return ApiError(status, f"{code}: {message}", type=kind, code=code)


@dataclass(frozen=True)
class Job:
    """One request as the cluster runs it."""

    kind: Kind
    model: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    """None: the caller asked for none (the shell draws one when sampling)."""
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    return_token_ids: bool = False
    """vLLM's extension: the answer's token ids in each choice (and the prompt's)."""


@dataclass(frozen=True)
class Limits:
    """What this server serves: its model id and the model's context."""

    model: str
    context_length: int
    vocab_size: int


# Parameters OpenAI defines that carry no generation behaviour here; accepted and ignored.
_IGNORED = frozenset(
    {"user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key"}
)
# Parameters accepted only at their neutral value (anything else is refused, by name).
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}
_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "n",
        "stream",
        "stream_options",
        "return_token_ids",
    }
)
_CHAT_ONLY = frozenset({"messages", "max_completion_tokens"})
_CHAT_NEUTRAL = frozenset(_NEUTRAL) - {"echo", "suffix", "best_of"}
_COMPLETION_NEUTRAL = frozenset(
    {"frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "echo", "suffix"}
    | {"best_of"}
)


def _number(body: Mapping[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise bad(name, f"{name} must be a number, got {v!r}")
    if not lo <= v <= hi:
        raise bad(name, f"{name} must be in [{lo:g}, {hi:g}], got {v!r}")
    return float(v)


def _int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"{name} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        raise bad(name, f"{name} must be in [{lo}, {hi}], got {v}")
    return v


def _flag(body: Mapping[str, Any], name: str) -> bool:
    v = body.get(name)
    if v not in (None, True, False):
        raise bad(name, f"{name} must be a boolean, got {v!r}")
    return bool(v)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", f"stop must be a string or a list of strings, got {v!r}")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}")
    if any(not s for s in stops):
        raise bad("stop", "stop strings must not be empty")
    return tuple(dict.fromkeys(stops))


def _check_names(body: Mapping[str, Any], kind: Kind) -> None:
    allowed = _COMMON | (_CHAT_ONLY if kind == "chat" else {"prompt"})
    neutral = _CHAT_NEUTRAL if kind == "chat" else _COMPLETION_NEUTRAL
    for name, value in body.items():
        if name in allowed or name in _IGNORED:
            continue
        if name in neutral:
            if value not in _NEUTRAL[name]:
                raise ApiError(
                    400,
                    f"{name}={value!r} is not supported by this server",
                    param=name,
                    code="unsupported_parameter",
                )
            continue
        raise ApiError(
            400,
            f"unrecognized request argument supplied: {name}",
            param=name,
            code="unknown_parameter",
        )


def _common(body: Mapping[str, Any], kind: Kind, limits: Limits, prompt_ids: list[int]) -> Job:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "model is required (a string; GET /v1/models lists them)")
    if model != limits.model:
        raise ApiError(
            404,
            f"the model {model!r} does not exist; this server serves {limits.model!r}",
            param="model",
            code="model_not_found",
        )
    n = _int(body, "n", 1, 128)
    if n not in (None, 1):
        raise bad("n", f"n must be 1 (this server generates one choice per request), got {n}")
    stream = _flag(body, "stream")
    include_usage = False
    opts = body.get("stream_options")
    if opts is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream=true")
        if not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}:
            raise bad("stream_options", f"stream_options must be {{include_usage}}, got {opts!r}")
        include_usage = opts.get("include_usage") is True
    room = limits.context_length - len(prompt_ids)
    if room < 1:
        raise ApiError(
            400,
            f"the prompt has {len(prompt_ids)} tokens; this model's context is "
            f"{limits.context_length} tokens",
            param="messages" if kind == "chat" else "prompt",
            code="context_length_exceeded",
        )
    names = ("max_completion_tokens", "max_tokens") if kind == "chat" else ("max_tokens",)
    max_tokens = room
    for name in names:
        given = _int(body, name, 1, limits.context_length)
        if given is not None:
            if given > room:
                raise ApiError(
                    400,
                    f"{name}={given} plus the prompt's {len(prompt_ids)} tokens exceeds this "
                    f"model's context of {limits.context_length} tokens",
                    param=name,
                    code="context_length_exceeded",
                )
            max_tokens = given
            break
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:  # only the most likely token is left: greedy
        temperature, top_p = 0.0, 1.0
    return Job(
        kind=kind,
        model=model,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=_int(body, "seed", 0, MAX_SEED),
        stop=_stop(body),
        stream=bool(stream),
        include_usage=include_usage,
        return_token_ids=_flag(body, "return_token_ids"),
    )


def _object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_messages(value: Any) -> list[dict[str, str]]:
    """OpenAI chat messages as ``{role, content}`` with text content, for the template.

    Content may be a string or a list of text parts; ``developer`` is the newer name of
    ``system``. Anything this server cannot show the model (images, tool calls) is refused.
    """
    if not isinstance(value, list) or not value:
        raise bad("messages", "messages must be a non-empty list")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad(where, f"{where} must be an object, got {msg!r}")
        role = _ROLES.get(msg.get("role"))  # type: ignore[arg-type]
        if role is None:
            raise bad(
                f"{where}.role",
                f"{where}.role must be one of {sorted(_ROLES)}, got {msg.get('role')!r}",
            )
        if msg.get("tool_calls") or msg.get("function_call"):
            raise bad(f"{where}.tool_calls", "tool calls are not supported by this server")
        content = msg.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text"):
                    kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                    raise bad(
                        f"{where}.content[{j}]",
                        f"{where}.content[{j}]: only text parts are supported, got {kind!r}",
                    )
                if not isinstance(part.get("text"), str):
                    raise bad(f"{where}.content[{j}].text", "a text part needs a string 'text'")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise bad(f"{where}.content", f"{where}.content must be a string or text parts")
        out.append({"role": role, "content": content})
    return out


def parse_chat(
    body: Any, limits: Limits, encode_messages: Callable[[list[dict[str, str]]], list[int]]
) -> Job:
    """``POST /v1/chat/completions``: the messages through the model's chat template
    (``encode_messages``: ``textio.encode_chat`` bound to the model's tokenizer)."""
    body = _object(body)
    _check_names(body, "chat")
    messages = chat_messages(body.get("messages"))
    try:
        ids = encode_messages(messages)
    except Exception as exc:  # the model's own template raised (e.g. role order)
        raise bad("messages", f"the model's chat template refused these messages: {exc}") from exc
    return _common(body, "chat", limits, ids)


def parse_completion(body: Any, limits: Limits, encode: Callable[[str], list[int]]) -> Job:
    """``POST /v1/completions``: the prompt as is (a string, or token ids), no template."""
    body = _object(body)
    _check_names(body, "completion")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "prompt must not be empty")
        ids = encode(prompt)
    elif (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(x, int) and not isinstance(x, bool) for x in prompt)
    ):
        if not all(0 <= x < limits.vocab_size for x in prompt):
            raise bad("prompt", f"prompt token ids must be in [0, {limits.vocab_size})")
        ids = list(prompt)
    elif isinstance(prompt, list) and len(prompt) > 1:
        raise bad("prompt", "one prompt per request (batches are not supported)")
    else:
        raise bad("prompt", "prompt must be a non-empty string or list of token ids")
    if not ids:
        raise bad("prompt", "the prompt encodes to no tokens")
    return _common(body, "completion", limits, ids)


# --------------------------------------------------------------------------- stop strings


class StopMatcher:
    """Cuts a text stream where a stop string first completes; text is only ever
    released once it cannot be the start of a stop string.

    Works on ``str`` (code points), so a cut never splits a multi-byte character; the
    cluster's text deltas never end inside one either (its decoder holds split bytes back).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._buf = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add a delta; returns the text now safe to release. After a stop matched,
        ``stopped`` is True and the text before the stop is the last returned."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        buf = self._buf + text
        # the stop that completes first wins (on a tie, the longer one): the answer then
        # does not depend on how the text was split into deltas
        found = [(i + len(s), i) for s in self.stops if (i := buf.find(s)) >= 0]
        if found:
            self.stopped, self._buf = True, ""
            return buf[: min(found)[1]]
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._buf = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back tail at the end of the stream (no stop followed it)."""
        rest, self._buf = self._buf, ""
        return "" if self.stopped else rest


# --------------------------------------------------------------------------- responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def response_id(job: Job, request_id: str) -> str:
    return ("chatcmpl-" if job.kind == "chat" else "cmpl-") + request_id


def completion_body(
    job: Job,
    request_id: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """The non-streaming response (``token_ids`` only with ``return_token_ids``)."""
    if job.kind == "chat":
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    out: dict[str, Any] = {
        "id": response_id(job, request_id),
        "object": "chat.completion" if job.kind == "chat" else "text_completion",
        "created": created,
        "model": job.model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
    }
    if job.return_token_ids:
        choice["token_ids"] = list(token_ids or [])
        out["prompt_token_ids"] = job.prompt_ids
    return out


def chunk_body(
    job: Job,
    request_id: str,
    created: int,
    *,
    text: str | None = None,
    first: bool = False,
    finish_reason: str | None = None,
    token_ids: list[int] | None = None,
) -> dict[str, Any]:
    """One streamed chunk: a text delta, or the final one with ``finish_reason``; with
    ``return_token_ids`` it carries the ids of the tokens since the previous chunk."""
    if job.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {
            "index": 0,
            "delta": delta,
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if job.return_token_ids:
        choice["token_ids"] = list(token_ids or [])
    out: dict[str, Any] = {
        "id": response_id(job, request_id),
        "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
        "created": created,
        "model": job.model,
        "choices": [choice],
    }
    if job.include_usage:
        out["usage"] = None
    return out


def usage_chunk(
    job: Job, request_id: str, created: int, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The last chunk with ``stream_options.include_usage``: no choices, the usage."""
    return {
        "id": response_id(job, request_id),
        "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
        "created": created,
        "model": job.model,
        "choices": [],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def models_body(model: str, created: int) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [{"id": model, "object": "model", "created": created, "owned_by": "e2llm-edge"}],
    }


# --------------------------------------------------------------------------- SSE framing

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object (JSON has no raw newlines)."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def parse_sse(lines: Sequence[str]) -> list[Any]:
    """The JSON objects of an SSE stream's ``data:`` lines, stopping at ``[DONE]``
    (what ``e2llm chat --url`` and the tests read)."""
    out: list[Any] = []
    for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        out.append(json.loads(data))
    return out
