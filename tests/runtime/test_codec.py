"""Wire format: round trips, zero-copy arrays, strict validation, limits, fuzzing."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from e2llm_edge.device.kv_transfer import KV_CHUNK_BYTES, KVAssembler, kv_chunks
from e2llm_edge.errors import CodecError
from e2llm_edge.wire import codec
from e2llm_edge.wire import messages as m

from .factories import assert_same, examples, f32

KEY = m.AttemptKey("r", 0)


def _tamper(msg: m.Message, **changes: Any) -> bytes:
    """Encode ``msg``, then rewrite parts of the raw map (``b.key`` for body fields)."""
    raw = msgpack.unpackb(m.encode(msg), raw=False)
    for path, value in changes.items():
        target = raw
        *parents, last = path.split("__")
        for p in parents:
            target = target[p]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return msgpack.packb(raw, use_bin_type=True)


_DELETE = object()


def test_every_registered_type_has_an_example() -> None:
    assert {type(x) for x in examples()} == set(m.message_types())


@pytest.mark.parametrize("msg", examples(), ids=lambda x: type(x).__name__)
def test_round_trip(msg: m.Message) -> None:
    data = m.encode(msg)
    back = m.decode(data)
    assert_same(msg, back)
    assert m.encode(back) == data


def test_header_fields_travel_in_header() -> None:
    msg = m.DecodeStep(
        request_id=m.RequestId("abc"),
        attempt=0,
        token_id=1,
        position=2,
        step=3,
        seq=9,
        plan_version=5,
    )
    raw = msgpack.unpackb(m.encode(msg), raw=False)
    assert {k: raw[k] for k in ("v", "k", "rid", "seq", "pv")} == {
        "v": 1,
        "k": int(m.Kind.DECODE_STEP),
        "rid": "abc",
        "seq": 9,
        "pv": 5,
    }
    assert "request_id" not in raw["b"]


def test_arrays_decode_without_copy_and_read_only() -> None:
    hidden = f32(1, 4, 576)
    data = m.encode(
        m.Activation(
            request_id="r", attempt=0, phase="decode", hidden=hidden, position_start=3, step=1
        )
    )
    back = m.decode(data)
    assert isinstance(back, m.Activation)
    arr = back.hidden
    assert not arr.flags.owndata and not arr.flags.writeable
    # the array views the bytes object msgpack produced for the "b" field, no extra copy
    base = arr
    while isinstance(base, np.ndarray) and base.base is not None:
        base = base.base
    assert isinstance(base, bytes) and len(base) == hidden.nbytes


def test_big_endian_and_non_contiguous_arrays_are_normalised() -> None:
    key = f32(1, 3, 10, 64)
    big = key.astype(">f4")[:, :, ::2]
    msg = m.KVChunk(
        request_id="r",
        attempt=0,
        layer=0,
        token_start=0,
        n_tokens_total=5,
        key=big,
        value=big,
        chunk=0,
        n_chunks=1,
    )
    back = m.decode(m.encode(msg))
    assert isinstance(back, m.KVChunk)
    assert back.key.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(back.key, key[:, :, ::2])


def _kv(**kw: Any) -> m.KVChunk:
    base: dict[str, Any] = dict(
        request_id="r",
        attempt=0,
        layer=0,
        token_start=0,
        n_tokens_total=5,
        key=f32(1, 3, 5, 64),
        value=f32(1, 3, 5, 64),
        chunk=0,
        n_chunks=1,
    )
    base.update(kw)
    return m.KVChunk(**base)


def test_shape_byte_mismatch_names_field_and_counts() -> None:
    data = _tamper(_kv(), b__key__b=b"\0" * (912 * 4))
    with pytest.raises(CodecError) as info:
        m.decode(data)
    assert str(info.value) == "kv_chunk.key: shape [1, 3, 5, 64] has 960 elements, bytes hold 912"
    assert info.value.field == "kv_chunk.key"
    assert info.value.request_id == "r" and info.value.kind == int(m.Kind.KV_CHUNK)


@pytest.mark.parametrize(
    ("changes", "field", "needle"),
    [
        ({"v": 2}, "header.v", "version 2 not supported"),
        ({"v": "1"}, "header.v", "expected int"),
        ({"k": 250}, "header.k", "unknown message kind 250"),
        ({"seq": -1}, "header.seq", "non-negative"),
        ({"rid": 5}, "header.rid", "expected str"),
        ({"extra": 1}, "header", "unexpected ['extra']"),
        ({"b__layer": "3"}, "kv_chunk.layer", "expected int, got str"),
        ({"b__layer": True}, "kv_chunk.layer", "expected int, got bool"),
        ({"b__key__dt": "float64"}, "kv_chunk.key", "dtype 'float64' not allowed"),
        ({"b__key__sh": [1, 3, 5]}, "kv_chunk.key", "expected rank 4"),
        ({"b__key__sh": [1, -3, 5, 64]}, "kv_chunk.key", "non-negative ints"),
        ({"b__key__b": "text"}, "kv_chunk.key", "must be bin"),
        ({"b__key": [1, 2]}, "kv_chunk.key", "expected an array map"),
        ({"b__chunk": _DELETE}, "kv_chunk", "missing ['chunk']"),
        ({"b__bogus": 1}, "kv_chunk", "unexpected ['bogus']"),
        ({"b": [1]}, "body", "expected a map"),
    ],
)
def test_validation_errors_name_the_field(changes: dict[str, Any], field: str, needle: str) -> None:
    with pytest.raises(CodecError) as info:
        m.decode(_tamper(_kv(), **changes))
    assert info.value.field == field
    assert needle in info.value.reason


@pytest.mark.parametrize(
    ("msg", "field"),
    [
        (m.DeviceState(device_id="d", status="sleeping"), "device_state.status"),  # type: ignore[arg-type]
        (
            m.DeviceState(device_id="d", status=m.DeviceStatus.READY, layers=(1,)),  # type: ignore[arg-type]
            "device_state.layers",
        ),
        (m.Heartbeat(device_id=3, ts=1.0), "heartbeat.device_id"),  # type: ignore[arg-type]
        (
            m.DeviceTelemetry(device_id="x", counters={"a": 1}),  # type: ignore[arg-type]
            "device_telemetry.counters",
        ),
        (
            m.DeviceTelemetry(
                device_id="x",
                counters=m.DeviceCounters(status="busy"),  # type: ignore[arg-type]
            ),
            "device_telemetry.counters.status",
        ),
        (_kv(key=np.zeros((1, 3, 5, 64), np.float64)), "kv_chunk.key"),
        (_kv(key=f32(3, 5, 64)), "kv_chunk.key"),
        (
            m.DecodeStep(request_id="r", attempt=0, token_id=2**70, position=0, step=0),
            "decode_step.token_id",
        ),
        (
            m.DecodeStep(request_id=None, attempt=0, token_id=1, position=0, step=0),  # type: ignore[arg-type]
            "decode_step.request_id",
        ),
        (
            m.DecodeStep(request_id="r", attempt=0, token_id=1, position=0, step=0, seq=-1),
            "decode_step.seq",
        ),
    ],
)
def test_encoder_validates_too(msg: m.Message, field: str) -> None:
    with pytest.raises(CodecError) as info:
        m.encode(msg)
    assert info.value.field == field


def test_numpy_scalars_and_int_floats_are_accepted() -> None:
    msg = m.DecodeStep(request_id="r", attempt=0, token_id=np.int64(5), position=1, step=0)  # type: ignore[arg-type]
    back = m.decode(m.encode(msg))
    assert isinstance(back, m.DecodeStep) and back.token_id == 5
    gen = m.decode(m.encode(m.GenerateRequest(request_id="r", client_id="c", temperature=1)))
    assert isinstance(gen, m.GenerateRequest)
    assert gen.temperature == 1.0 and type(gen.temperature) is float


def test_size_limit_enforced_on_encode_and_decode() -> None:
    big = m.Activation(
        request_id="r",
        attempt=0,
        phase="prefill",
        hidden=f32(1, 512, 576),
        position_start=0,
        step=0,
    )  # ~1.2 MB
    data = m.encode(big)
    assert 1_100_000 < len(data) < codec.MAX_MESSAGE_BYTES
    with pytest.raises(CodecError, match="exceeds limit 1000000"):
        m.encode(big, max_bytes=1_000_000)
    with pytest.raises(CodecError, match="exceeds limit 1000000"):
        m.decode(data, max_bytes=1_000_000)
    too_big = m.Activation(
        request_id="r",
        attempt=0,
        phase="prefill",
        hidden=f32(1, 2000, 576),
        position_start=0,
        step=0,
    )  # 4.6 MB > 4 MiB default
    with pytest.raises(CodecError) as info:
        m.encode(too_big)
    assert info.value.field == "payload"


def test_nested_and_odd_msgpack_is_codec_error() -> None:
    deep = b"\x91" * 5000 + b"\xc0"  # 5000 nested one-element arrays
    for payload in (
        b"",
        b"\xc1",
        deep,
        msgpack.packb([1, 2]),
        msgpack.packb({"v": 1}) + b"trailing",
        msgpack.packb(msgpack.ExtType(5, b"x")),
        b"\xd6\xff\0\0\0\0",
    ):  # the last: a timestamp extension
        with pytest.raises(CodecError):
            m.decode(payload)
    with pytest.raises(CodecError):
        m.decode("not bytes")  # type: ignore[arg-type]


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_arbitrary_bytes_only_raise_codec_error(data: bytes) -> None:
    with contextlib.suppress(CodecError):
        m.decode(data)


_plain = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from([int(k) for k in m.Kind] + [0, 99]),
    rid=st.none() | st.text(max_size=4) | st.integers(),
    body=st.dictionaries(
        st.sampled_from(
            [
                "device_id",
                "status",
                "layers",
                "key",
                "value",
                "hidden",
                "token_ids",
                "plan",
                "data",
                "layer",
                "chunk",
                "n_chunks",
                "phase",
                "event",
                "ts",
                "x",
            ]
        ),
        _plain
        | st.fixed_dictionaries(
            {
                "dt": st.sampled_from(["float32", "bool", "x"]),
                "sh": st.lists(st.integers(-2, 5), max_size=4),
                "b": st.binary(max_size=64),
            }
        ),
        max_size=8,
    ),
)
def test_fuzz_well_framed_garbage_only_raises_codec_error(
    kind: int, rid: Any, body: dict[str, Any]
) -> None:
    try:
        data = msgpack.packb(
            {"v": 1, "k": kind, "rid": rid, "seq": 0, "pv": 0, "b": body}, use_bin_type=True
        )
    except (OverflowError, ValueError):
        return
    with contextlib.suppress(CodecError):
        m.decode(data)


# --------------------------------------------------------------------------- typed structs


def _raw(msg: m.Message) -> dict[str, Any]:
    return msgpack.unpackb(m.encode(msg), raw=False)  # type: ignore[no-any-return]


def _repack(raw: dict[str, Any]) -> bytes:
    return msgpack.packb(raw, use_bin_type=True)  # type: ignore[no-any-return]


def test_nested_struct_invariants_are_checked_on_decode() -> None:
    """A decoded struct is built by its own constructor: its checks run on every message."""
    act = next(x for x in examples() if isinstance(x, m.Activation))
    raw = _raw(act)
    raw["b"]["context"]["index0"] = 99  # beyond max_new_tokens: no sane KV size follows
    with pytest.raises(CodecError) as info:
        m.decode(_repack(raw))
    assert info.value.field == "activation.context" and "out of range" in info.value.reason
    raw = _raw(act)
    raw["b"]["context"]["sampling"]["top_p"] = 0.0
    with pytest.raises(CodecError) as info:
        m.decode(_repack(raw))
    assert info.value.field == "activation.context.sampling"
    assert "top_p must be in (0, 1]" in info.value.reason
    raw = _raw(act)
    del raw["b"]["context"]["decoder_replica"]
    with pytest.raises(CodecError, match=r"missing \['decoder_replica'\]"):
        m.decode(_repack(raw))


def test_plan_invariants_are_checked_on_decode() -> None:
    plan = next(x for x in examples() if isinstance(x, m.PlanMsg))
    raw = _raw(plan)
    raw["b"]["plan"]["replicas"][0]["stages"][1]["layer_start"] = 14  # overlapping stages
    with pytest.raises(CodecError) as info:
        m.decode(_repack(raw))
    assert info.value.field == "plan_msg.plan" and "must start at 15" in info.value.reason
    raw = _raw(plan)
    raw["b"]["plan"]["replicas"][1]["stages"][0]["device_id"] = "a"  # one device, two replicas
    with pytest.raises(CodecError, match="already used by replica 0"):
        m.decode(_repack(raw))


def test_enums_travel_as_values_and_unknown_values_are_refused() -> None:
    err = next(x for x in examples() if isinstance(x, m.ErrorReport))
    raw = _raw(err)
    assert raw["b"]["code"] == "internal"
    raw["b"]["code"] = "meltdown"
    with pytest.raises(CodecError) as info:
        m.decode(_repack(raw))
    assert info.value.field == "error_report.code" and "not one of ErrorCode" in info.value.reason


def test_no_message_field_is_a_free_form_map() -> None:
    """Every field is typed all the way down: no dict[str, Any] crosses the bus."""
    import typing

    def loose(tp: Any, seen: set[Any]) -> bool:
        if tp is Any:
            return True
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Annotated:
            return False
        if origin is not None:
            return any(loose(a, seen) for a in args if a is not Ellipsis)
        if dataclasses.is_dataclass(tp) and tp not in seen:
            seen.add(tp)
            hints = typing.get_type_hints(tp, include_extras=True)
            return any(loose(hints[f.name], seen) for f in dataclasses.fields(tp))
        return False

    for cls in m.message_types():
        assert not loose(cls, set()), cls.__name__


# --------------------------------------------------------------------------- KV chunking


def test_kv_chunks_are_about_target_size_and_reassemble() -> None:
    key, value = f32(1, 3, 700, 64), f32(1, 3, 700, 64)  # 1536 B/token for K+V
    chunks = kv_chunks(KEY, 4, key, value, target_bytes=256 * 1024, plan_version=2)
    assert len(chunks) == 5
    assert all(len(m.encode(c)) <= 256 * 1024 + 1024 for c in chunks)
    asm = KVAssembler()
    decoded = [m.decode(m.encode(c)) for c in reversed(chunks)]
    assert all(isinstance(c, m.KVChunk) for c in decoded)
    kv = [c for c in decoded if isinstance(c, m.KVChunk)]
    done = [asm.add(c) for c in kv]
    assert done == [False] * 4 + [True]
    assert asm.add(kv[0]) is True  # redelivered duplicate is harmless
    assert asm.layer_complete(KEY, 4) and not asm.layer_complete(KEY, 5)
    start, k2, v2 = asm.take(KEY, 4)
    assert start == 0
    np.testing.assert_array_equal(k2, key)
    np.testing.assert_array_equal(v2, value)
    assert asm.pending_bytes() == 0


def test_kv_default_target_is_one_mib_per_message() -> None:
    key = f32(1, 3, 2048, 64)
    chunks = kv_chunks(KEY, 0, key, key)
    sizes = [len(m.encode(c)) for c in chunks]
    assert len(chunks) == 4  # 3 MiB of K+V
    assert max(sizes) <= KV_CHUNK_BYTES + 1024 and min(sizes) > 1000


def test_kv_assembler_rejects_inconsistent_chunks_and_discards() -> None:
    a, b = kv_chunks(KEY, 0, f32(1, 3, 10, 64), f32(1, 3, 10, 64), target_bytes=8000)
    asm = KVAssembler()
    asm.add(a)
    with pytest.raises(CodecError, match="chunks"):
        asm.add(_kv(layer=0, n_chunks=7))
    assert asm.discard(KEY) == 1
    with pytest.raises(KeyError):
        asm.take(KEY, 0)
    assert b.token_start == 5


def test_a_decode_batch_is_checked_step_by_step() -> None:
    """A batch's steps are the same structs as lone steps, with the same checks; a batch
    of none, or one carrying a prompt's activation, names what is wrong."""
    act = m.Activation(
        request_id=m.RequestId("r"),
        attempt=0,
        phase="decode",
        hidden=f32(1, 1, 8),
        position_start=4,
        step=1,
    )
    batch = m.DecodeBatch(steps=(act,))
    raw = msgpack.unpackb(m.encode(batch), raw=False)
    cases = [
        ([], "decode_batch", "1 to 256 steps, got 0"),
        ([{**raw["b"]["steps"][0], "phase": "prefill"}], "decode_batch", "prefill activation"),
        ([{**raw["b"]["steps"][0], "step": "1"}], "decode_batch.steps[0]", "expected"),
        ([{"token_id": 1}], "decode_batch.steps[0]", "expected"),
    ]
    for steps, field, needle in cases:
        with pytest.raises(CodecError) as info:
            m.decode(_tamper(batch, b__steps=steps))
        assert info.value.field == field, steps
        assert needle in info.value.reason, info.value.reason
    with pytest.raises(ValueError, match="1 to 256"):
        m.DecodeBatch(steps=())
