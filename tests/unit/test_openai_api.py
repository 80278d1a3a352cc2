"""The gateway's pure parts: request validation and mapping, stop strings, response shapes
and SSE framing (no network, no model)."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from e2llm_edge.fog import openai_api as api

LIMITS = api.Limits(model="m", context_length=64, vocab_size=1000)


def encode(text: str) -> list[int]:
    """One id per character: prompt lengths are easy to reason about."""
    return [ord(c) % 1000 for c in text]


def encode_messages(messages: list[dict[str, str]]) -> list[int]:
    return encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


def chat(**kw: Any) -> api.Job:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return api.parse_chat(body, LIMITS, encode_messages)


def refused(fn: Any, *args: Any) -> api.ApiError:
    with pytest.raises(api.ApiError) as info:
        fn(*args)
    return info.value


def test_chat_maps_to_a_job_with_openai_defaults() -> None:
    job = chat()
    assert job.kind == "chat" and job.model == "m"
    assert job.prompt_ids == encode("<user>hi<assistant>")
    assert job.max_tokens == LIMITS.context_length - len(job.prompt_ids)  # the rest of the context
    assert (job.temperature, job.top_p, job.seed) == (1.0, 1.0, None)
    assert job.stop == () and not job.stream and not job.include_usage


def test_chat_parameters_map() -> None:
    job = chat(
        max_completion_tokens=5,
        temperature=0,
        top_p=0.5,
        seed=7,
        stop=["a", "b", "a"],
        stream=True,
        stream_options={"include_usage": True},
        n=1,
        user="u1",
        frequency_penalty=0,
    )
    assert (job.max_tokens, job.temperature, job.top_p, job.seed) == (5, 0.0, 0.5, 7)
    assert job.stop == ("a", "b") and job.stream and job.include_usage
    assert chat(max_tokens=3).max_tokens == 3
    assert chat(stop="x").stop == ("x",)
    assert chat(top_p=0).temperature == 0.0  # only the top token left: greedy


def test_multi_turn_messages_and_text_parts() -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "c"},
            {"role": "user", "content": "d"},
        ],
    }
    job = api.parse_chat(body, LIMITS, encode_messages)
    assert job.prompt_ids == encode("<system>be brief<user>ab<assistant>c<user>d<assistant>")


@pytest.mark.parametrize(
    ("change", "param", "status"),
    [
        ({"model": "other"}, "model", 404),
        ({"model": None}, "model", 400),
        ({"n": 2}, "n", 400),
        ({"temperature": 2.5}, "temperature", 400),
        ({"temperature": "hot"}, "temperature", 400),
        ({"top_p": 1.5}, "top_p", 400),
        ({"seed": -1}, "seed", 400),
        ({"max_tokens": 0}, "max_tokens", 400),
        ({"max_tokens": 60}, "max_tokens", 400),  # prompt + 60 > context of 64
        ({"stop": ["a"] * 5}, "stop", 400),
        ({"stop": [""]}, "stop", 400),
        ({"stop": 3}, "stop", 400),
        ({"stream": "yes"}, "stream", 400),
        ({"stream_options": {"include_usage": True}}, "stream_options", 400),  # without stream
        ({"logprobs": True}, "logprobs", 400),
        ({"tools": [{"type": "function"}]}, "tools", 400),
        ({"frequency_penalty": 0.5}, "frequency_penalty", 400),
        ({"no_such_thing": 1}, "no_such_thing", 400),
        ({"messages": []}, "messages", 400),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", 400),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", 400),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages[0].content[0]",
            400,
        ),
    ],
)
def test_bad_chat_requests_name_the_parameter(
    change: dict[str, Any], param: str, status: int
) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **change}
    err = refused(api.parse_chat, body, LIMITS, encode_messages)
    assert (err.status, err.param) == (status, param), err.message
    shape = err.body()["error"]
    assert set(shape) == {"message", "type", "param", "code"} and shape["message"]


def test_long_prompt_and_body_shape_refused() -> None:
    err = refused(
        api.parse_chat,
        {"model": "m", "messages": [{"role": "user", "content": "x" * 80}]},
        LIMITS,
        encode_messages,
    )
    assert err.status == 400 and err.code == "context_length_exceeded"
    assert refused(api.parse_chat, [1, 2], LIMITS, encode_messages).status == 400


def test_a_template_that_refuses_is_a_bad_request() -> None:
    def strict(messages: list[dict[str, str]]) -> list[int]:
        raise ValueError("Conversation roles must alternate user/assistant")

    err = refused(
        api.parse_chat,
        {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        LIMITS,
        strict,
    )
    assert err.status == 400 and "alternate" in err.message


def test_completion_prompts() -> None:
    base = {"model": "m", "max_tokens": 4}
    assert api.parse_completion({**base, "prompt": "ab"}, LIMITS, encode).prompt_ids == encode("ab")
    assert api.parse_completion({**base, "prompt": ["ab"]}, LIMITS, encode).prompt_ids == encode(
        "ab"
    )
    assert api.parse_completion({**base, "prompt": [5, 6]}, LIMITS, encode).prompt_ids == [5, 6]
    assert api.parse_completion({**base, "prompt": [[5, 6]]}, LIMITS, encode).prompt_ids == [5, 6]
    for prompt in ("", [], ["a", "b"], [1, 2000], [True], None):
        err = refused(api.parse_completion, {**base, "prompt": prompt}, LIMITS, encode)
        assert err.status == 400 and err.param == "prompt", prompt
    for extra in ({"echo": True}, {"best_of": 2}, {"suffix": "x"}, {"messages": []}):
        assert (
            refused(api.parse_completion, {**base, "prompt": "a", **extra}, LIMITS, encode).status
            == 400
        )


def test_cluster_errors_map_to_http_codes() -> None:
    assert api.cluster_error("bad_request", "x").status == 400
    assert api.cluster_error("overloaded", "x").status == 429
    assert api.cluster_error("no_plan", "x").status == 503
    assert api.cluster_error("kv_timeout", "x").status == 502


# --------------------------------------------------------------------------- stop strings


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = api.StopMatcher(stops)
    out = []
    for p in pieces:
        out.append(m.push(p))
        if m.stopped:
            break
    out.append(m.flush())
    return "".join(out), m.stopped


def test_stop_split_across_deltas() -> None:
    assert run_matcher(["END"], ["abc E", "N", "D more"]) == ("abc ", True)
    assert run_matcher(["END"], ["abc EN", "X"]) == ("abc ENX", False)  # a false start is released
    assert run_matcher(["\n\n", "##"], ["a\n", "b#", "#c"]) == ("a\nb", True)
    assert run_matcher(["ü"], ["naïve ", "über"]) == ("naïve ", True)


def test_held_text_is_released_only_when_safe() -> None:
    m = api.StopMatcher(["STOP"])
    assert m.push("go ST") == "go "
    assert m.push("O") == ""
    assert m.push("P!") == "" and m.stopped
    m = api.StopMatcher(["STOP"])
    assert m.push("go ST") == "go "
    assert m.flush() == "ST"  # the stream ended: what was held is the answer's tail


@given(
    text=st.text(alphabet="ab€😀\n", max_size=40),
    stops=st.lists(st.text(alphabet="ab€😀\n", min_size=1, max_size=4), min_size=1, max_size=4),
    cuts=st.lists(st.integers(min_value=0, max_value=40), max_size=10),
)
def test_stop_matching_equals_cutting_the_whole_text(
    text: str, stops: list[str], cuts: list[int]
) -> None:
    """However the text is split into deltas, the answer is the text read one character
    at a time up to where a stop string first completes (the longer one on a tie)."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    want = (text, False)
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            want = (text[: end - max(map(len, done))], True)
            break
    got = run_matcher(stops, pieces)
    assert got == want
    assert got[0].encode("utf-8").decode("utf-8") == got[0]  # whole characters only


# --------------------------------------------------------------------------- responses


def test_response_and_chunk_shapes() -> None:
    job = chat(stream=True, stream_options={"include_usage": True}, return_token_ids=True)
    body = api.completion_body(job, "r1", 5, "hello", "length", 3, 2, [7, 8])
    assert body["id"] == "chatcmpl-r1" and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert body["choices"][0]["token_ids"] == [7, 8] and body["prompt_token_ids"] == job.prompt_ids
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    first = api.chunk_body(job, "r1", 5, text="", first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["usage"] is None  # include_usage: every chunk says usage null until the last
    last = api.usage_chunk(job, "r1", 5, 3, 2)
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 5
    comp = api.parse_completion({"model": "m", "prompt": "x", "max_tokens": 2}, LIMITS, encode)
    c = api.chunk_body(comp, "r2", 5, text="y", finish_reason="stop")
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "y"
    assert "usage" not in c and "token_ids" not in c["choices"][0]


def test_sse_framing_round_trips() -> None:
    objs = [{"a": "line\nbreak", "b": [1, 2]}, {"c": "ü"}]
    frames = b"".join(api.sse(o) for o in objs) + api.SSE_DONE
    assert frames.count(b"\n\n") == 3 and frames.endswith(b"data: [DONE]\n\n")
    lines = frames.decode().splitlines()
    assert api.parse_sse([*lines, 'data: {"after": "done"}']) == objs
    assert json.loads(api.sse(objs[0])[6:]) == objs[0]
