"""Every message type that crosses the bus, and ``encode``/``decode`` for all of them.

Messages are frozen keyword-only dataclasses; each field's annotation is its wire contract
(converters compiled once at registration by ``codec.compile_type``), so adding a message is
declaring a class, never writing a validator.

Header mapping: ``seq`` and ``plan_version`` (on every message) travel in the header as
``seq``/``pv``; a class's ``request_id`` field travels as ``rid``; everything else is body.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import numpy as np

from e2llm_edge.errors import CodecError
from e2llm_edge.wire import codec
from e2llm_edge.wire.codec import Converter, Header, array

F32_R3 = Annotated[np.ndarray, array("float32", rank=3)]
F32_R4 = Annotated[np.ndarray, array("float32", rank=4)]

DeviceStatus = Literal["online", "loading", "ready", "offline", "error"]
Role = Literal["prefill", "decoder", "mixed"]


class Kind(IntEnum):
    """Byte-valued message kinds; never renumber, only append."""

    DEVICE_STATE = 1
    DEVICE_PROFILE = 2
    PLAN = 3
    ORCHESTRATOR_STATE = 4
    GENERATE_REQUEST = 10
    RESPONSE_EVENT = 11
    PREFILL_START = 20
    ACTIVATION = 21
    KV_CHUNK = 22
    DECODE_STEP = 23
    TOKEN_OUT = 24
    RELEASE = 25
    ERROR_REPORT = 30
    HEARTBEAT = 31
    TELEMETRY = 32
    REQUEST_EVENT = 33


@dataclass(frozen=True, kw_only=True)
class Message:
    """Base of all messages: header fields shared by every kind."""

    KIND: ClassVar[Kind]
    seq: int = 0
    """Sender's sequence number (per sender and request; receivers drop replays)."""
    plan_version: int = 0
    """Plan version the sender acted under (0: not tied to a plan)."""


@dataclass(frozen=True)
class _Schema:
    cls: type[Message]
    wire_name: str
    has_request_id: bool
    body: tuple[tuple[str, Converter], ...]
    rid: Converter | None


_REGISTRY: dict[int, _Schema] = {}
_BY_CLASS: dict[type[Message], _Schema] = {}
M = TypeVar("M", bound=type[Message])


def register(cls: M) -> M:
    """Class decorator: compile the field converters and add the class to the registry."""
    kind = int(cls.KIND)
    if kind in _REGISTRY:
        raise TypeError(f"kind {kind} registered twice ({_REGISTRY[kind].cls.__name__})")
    hints = typing.get_type_hints(cls, include_extras=True)
    body: list[tuple[str, Converter]] = []
    rid: Converter | None = None
    for f in dataclasses.fields(cls):
        if f.name in ("seq", "plan_version"):
            continue
        conv = codec.compile_type(hints[f.name])
        if f.name == "request_id":
            rid = conv
        else:
            body.append((f.name, conv))
    wire_name = re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", cls.__name__).lower()
    schema = _Schema(cls, wire_name, rid is not None, tuple(body), rid)
    _REGISTRY[kind] = schema
    _BY_CLASS[cls] = schema
    return cls


def message_types() -> tuple[type[Message], ...]:
    """All registered message classes, by kind."""
    return tuple(_REGISTRY[k].cls for k in sorted(_REGISTRY))


def encode(msg: Message, *, max_bytes: int | None = None) -> bytes:
    """Validate ``msg`` against its declared field types and serialise it."""
    schema = _BY_CLASS.get(type(msg))
    if schema is None:
        raise CodecError("message", f"{type(msg).__name__} is not a registered message type")
    name = schema.wire_name
    rid = None
    if schema.rid is not None:
        rid = schema.rid.to_wire(msg.request_id, f"{name}.request_id")  # type: ignore[attr-defined]
    body = {f: conv.to_wire(getattr(msg, f), f"{name}.{f}") for f, conv in schema.body}
    seq = codec.check_header_int(msg.seq, f"{name}.seq")
    pv = codec.check_header_int(msg.plan_version, f"{name}.plan_version")
    header = Header(kind=int(msg.KIND), request_id=rid, seq=seq, plan_version=pv)
    return codec.pack(header, body, max_bytes=max_bytes)


def decode(data: bytes | bytearray | memoryview, *, max_bytes: int | None = None) -> Message:
    """Parse and validate one message; any defect raises CodecError naming the field."""
    header, body = codec.unpack(data, max_bytes=max_bytes)
    schema = _REGISTRY.get(header.kind)
    if schema is None:
        raise CodecError(
            "header.k",
            f"unknown message kind {header.kind}",
            request_id=header.request_id,
            kind=header.kind,
        )
    name = schema.wire_name
    try:
        expected = {f for f, _ in schema.body}
        if set(body) != expected:
            raise CodecError(name, codec.key_diff(expected - set(body), set(body) - expected))
        values: dict[str, Any] = {
            f: conv.from_wire(body[f], f"{name}.{f}") for f, conv in schema.body
        }
        if schema.rid is not None:
            values["request_id"] = schema.rid.from_wire(header.request_id, f"{name}.request_id")
        elif header.request_id is not None:
            raise CodecError("header.rid", f"{name} carries no request id")
    except CodecError as exc:
        exc.request_id = header.request_id
        exc.kind = header.kind
        raise
    return schema.cls(seq=header.seq, plan_version=header.plan_version, **values)


def peek_header(data: bytes | bytearray | memoryview) -> Header | None:
    """Best-effort header of a message that failed to decode (None if unreadable)."""
    try:
        return codec.unpack(data)[0]
    except CodecError:
        return None


# --------------------------------------------------------------------------- control plane


@register
@dataclass(frozen=True, kw_only=True)
class DeviceState(Message):
    """A device's live state; retained, and its last-will is the same with status offline."""

    KIND: ClassVar[Kind] = Kind.DEVICE_STATE
    device_id: str
    status: DeviceStatus
    role: Role | None = None
    replica_id: int | None = None
    layers: tuple[int, int] | None = None
    """Half-open layer range [start, end) this device holds under ``plan_version``."""
    queue_depth: int = 0
    in_flight: int = 0
    tokens_per_s: float = 0.0
    mem_bytes: int = 0
    last_error: str | None = None
    ts: float = 0.0


@register
@dataclass(frozen=True, kw_only=True)
class DeviceProfileMsg(Message):
    """What a device can do: memory and measured per-layer costs; retained."""

    KIND: ClassVar[Kind] = Kind.DEVICE_PROFILE
    device_id: str
    memory_mb: float
    profile: dict[str, Any]
    hardware: dict[str, Any] | None = None
    link: dict[str, Any] | None = None
    capabilities: dict[str, Any] = dataclasses.field(default_factory=dict)


@register
@dataclass(frozen=True, kw_only=True)
class PlanMsg(Message):
    """The planner's ``Plan.to_dict()``; only the orchestrator publishes it (retained)."""

    KIND: ClassVar[Kind] = Kind.PLAN
    plan: dict[str, Any]


@register
@dataclass(frozen=True, kw_only=True)
class OrchestratorState(Message):
    """The orchestrator's liveness; retained, its last-will says offline."""

    KIND: ClassVar[Kind] = Kind.ORCHESTRATOR_STATE
    orchestrator_id: str
    status: Literal["online", "offline", "error"]
    ts: float = 0.0
    detail: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- client API


@register
@dataclass(frozen=True, kw_only=True)
class GenerateRequest(Message):
    """A client's request; exactly one of ``prompt`` (chat-templated) or ``prompt_ids``.

    The reply topic is not a field: the orchestrator derives it from the client id in the
    submission topic, which the broker's ACL ties to the client's username.
    """

    KIND: ClassVar[Kind] = Kind.GENERATE_REQUEST
    request_id: str
    client_id: str
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    raw: bool = False
    """True: ``prompt`` is used as is, without the chat template."""
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@register
@dataclass(frozen=True, kw_only=True)
class ResponseEvent(Message):
    """One event of a response stream: tokens, then exactly one done or error."""

    KIND: ClassVar[Kind] = Kind.RESPONSE_EVENT
    request_id: str
    event: Literal["token", "done", "error"]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    index: int = 0
    """Index of the first token in ``token_ids`` within the generated answer."""
    finish_reason: str | None = None
    error_code: str | None = None
    error: str | None = None
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- data plane


@register
@dataclass(frozen=True, kw_only=True)
class PrefillStart(Message):
    """Orchestrator -> first device of a PREFILL replica: run this prompt."""

    KIND: ClassVar[Kind] = Kind.PREFILL_START
    request_id: str
    token_ids: list[int]
    position_start: int = 0
    decoder_replica: int
    sampling: dict[str, Any] = dataclasses.field(default_factory=dict)
    max_new_tokens: int
    generated: list[int] = dataclasses.field(default_factory=list)
    """Tokens already streamed to the client (re-prefill after a failure resumes here)."""


@register
@dataclass(frozen=True, kw_only=True)
class Activation(Message):
    """Hidden states from one pipeline stage to the next."""

    KIND: ClassVar[Kind] = Kind.ACTIVATION
    request_id: str
    phase: Literal["prefill", "decode"]
    hidden: F32_R3
    """(B, T, hidden) float32."""
    position_start: int
    step: int
    context: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The request's context (sampling, limits, decoder replica) on the first message a
    device sees for a request; empty afterwards."""


@register
@dataclass(frozen=True, kw_only=True)
class KVChunk(Message):
    """A slice along the token axis of one layer's KV cache, PREFILL -> DECODER device."""

    KIND: ClassVar[Kind] = Kind.KV_CHUNK
    request_id: str
    layer: int
    token_start: int
    n_tokens_total: int
    key: F32_R4
    """(B, kv_heads, T_chunk, head_dim) float32."""
    value: F32_R4
    chunk: int
    n_chunks: int
    context: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The request's context (sampling, limits, decoder replica) on the first message a
    device sees for a request; empty afterwards."""


@register
@dataclass(frozen=True, kw_only=True)
class DecodeStep(Message):
    """Decoder replica's first stage: feed this token at this position."""

    KIND: ClassVar[Kind] = Kind.DECODE_STEP
    request_id: str
    token_id: int
    position: int
    step: int
    context: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The request's context (sampling, limits, decoder replica) on the first message a
    device sees for a request; empty afterwards."""


@register
@dataclass(frozen=True, kw_only=True)
class TokenOut(Message):
    """Last decoder stage -> orchestrator: the token sampled at ``index``."""

    KIND: ClassVar[Kind] = Kind.TOKEN_OUT
    request_id: str
    token_id: int
    index: int
    finished: bool = False
    finish_reason: str | None = None
    timings: dict[str, Any] = dataclasses.field(default_factory=dict)


@register
@dataclass(frozen=True, kw_only=True)
class Release(Message):
    """Free everything held for a request (finished, cancelled, failed, timed out)."""

    KIND: ClassVar[Kind] = Kind.RELEASE
    request_id: str
    reason: str


# --------------------------------------------------------------------------- health, telemetry


@register
@dataclass(frozen=True, kw_only=True)
class ErrorReport(Message):
    """A device tells the orchestrator something failed (for a request, or in general)."""

    KIND: ClassVar[Kind] = Kind.ERROR_REPORT
    request_id: str | None = None
    device_id: str
    code: str
    message: str


@register
@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Liveness between state changes."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT
    device_id: str
    ts: float


@register
@dataclass(frozen=True, kw_only=True)
class Telemetry(Message):
    """Free-form figures (per device or cluster summary); never user text."""

    KIND: ClassVar[Kind] = Kind.TELEMETRY
    source: str
    data: dict[str, Any]


@register
@dataclass(frozen=True, kw_only=True)
class RequestEvent(Message):
    """Request lifecycle for monitors (queued, routed, prefilled, done ...); no user text."""

    KIND: ClassVar[Kind] = Kind.REQUEST_EVENT
    request_id: str
    event: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- KV chunking

KV_CHUNK_BYTES = 1024 * 1024
"""Target payload per KV message; ~1 MB is the sweet spot measured on Mosquitto."""

KV_TOKEN_AXIS = 2


def chunk_array_pairs(
    key: np.ndarray,
    value: np.ndarray,
    *,
    axis: int = KV_TOKEN_AXIS,
    target_bytes: int = KV_CHUNK_BYTES,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Split (key, value) along ``axis`` into slices of about ``target_bytes`` together.

    Yields ``(start, key_slice, value_slice)``; at least one slice per token, and one
    (possibly empty) slice for zero tokens.
    """
    if key.shape[axis] != value.shape[axis]:
        raise ValueError(f"key has {key.shape[axis]} tokens, value {value.shape[axis]}")
    n = key.shape[axis]
    per_token = (key.nbytes + value.nbytes) // max(n, 1)
    step = max(1, target_bytes // max(per_token, 1))
    for start in range(0, max(n, 1), step):
        sl = [slice(None)] * key.ndim
        sl[axis] = slice(start, min(n, start + step))
        yield start, key[tuple(sl)], value[tuple(sl)]


def kv_chunks(
    request_id: str,
    layer: int,
    key: np.ndarray,
    value: np.ndarray,
    *,
    token_start: int = 0,
    plan_version: int = 0,
    target_bytes: int = KV_CHUNK_BYTES,
) -> list[KVChunk]:
    """One layer's KV cache (B, H, T, D) as KVChunk messages of about ``target_bytes``."""
    n_total = key.shape[KV_TOKEN_AXIS]
    parts = list(chunk_array_pairs(key, value, target_bytes=target_bytes))
    return [
        KVChunk(
            request_id=request_id,
            layer=layer,
            token_start=token_start + start,
            n_tokens_total=n_total,
            key=k,
            value=v,
            chunk=i,
            n_chunks=len(parts),
            plan_version=plan_version,
            seq=i,
        )
        for i, (start, k, v) in enumerate(parts)
    ]


@dataclass
class _LayerParts:
    n_chunks: int
    n_tokens_total: int
    token_start: int
    parts: dict[int, KVChunk]


class KVAssembler:
    """Collects KVChunk messages per (request, layer) and says when a request is complete.

    Duplicates (QoS 1 redelivery) are ignored; inconsistent chunks raise CodecError so the
    caller can fail the request.
    """

    def __init__(self) -> None:
        self._layers: dict[tuple[str, int], _LayerParts] = {}

    def add(self, chunk: KVChunk) -> bool:
        """Store one chunk; True when its layer is now complete."""
        where = f"kv_chunk[{chunk.request_id} layer {chunk.layer}]"
        if not 0 <= chunk.chunk < chunk.n_chunks:
            raise CodecError(f"{where}.chunk", f"{chunk.chunk} not in [0, {chunk.n_chunks})")
        key = (chunk.request_id, chunk.layer)
        entry = self._layers.get(key)
        if entry is None:
            entry = _LayerParts(chunk.n_chunks, chunk.n_tokens_total, -1, {})
            self._layers[key] = entry
        if (entry.n_chunks, entry.n_tokens_total) != (chunk.n_chunks, chunk.n_tokens_total):
            raise CodecError(
                where,
                f"chunk {chunk.chunk} says {chunk.n_chunks} chunks / "
                f"{chunk.n_tokens_total} tokens, earlier ones "
                f"{entry.n_chunks} / {entry.n_tokens_total}",
            )
        if chunk.key.shape != chunk.value.shape:
            raise CodecError(
                f"{where}.value",
                f"shape {list(chunk.value.shape)} differs from key {list(chunk.key.shape)}",
            )
        entry.parts.setdefault(chunk.chunk, chunk)
        return self.layer_complete(chunk.request_id, chunk.layer)

    def layer_complete(self, request_id: str, layer: int) -> bool:
        entry = self._layers.get((request_id, layer))
        return entry is not None and len(entry.parts) == entry.n_chunks

    def complete(self, request_id: str, layers: range | list[int]) -> bool:
        """True when every layer in ``layers`` has all its chunks."""
        return all(self.layer_complete(request_id, la) for la in layers)

    def take(self, request_id: str, layer: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Remove a complete layer and return ``(token_start, key, value)`` concatenated."""
        entry = self._layers.get((request_id, layer))
        if entry is None or len(entry.parts) != entry.n_chunks:
            raise KeyError(f"layer {layer} of {request_id} is not complete")
        del self._layers[(request_id, layer)]
        parts = [entry.parts[i] for i in range(entry.n_chunks)]
        where = f"kv_chunk[{request_id} layer {layer}]"
        expect = parts[0].token_start
        for p in parts:
            if p.token_start != expect:
                raise CodecError(
                    f"{where}.token_start",
                    f"chunk {p.chunk} starts at {p.token_start}, expected {expect}",
                )
            expect += p.key.shape[KV_TOKEN_AXIS]
        got = expect - parts[0].token_start
        if got != entry.n_tokens_total:
            raise CodecError(
                where, f"chunks hold {got} tokens, n_tokens_total says {entry.n_tokens_total}"
            )
        key = np.concatenate([p.key for p in parts], axis=KV_TOKEN_AXIS)
        value = np.concatenate([p.value for p in parts], axis=KV_TOKEN_AXIS)
        return parts[0].token_start, key, value

    def discard(self, request_id: str) -> int:
        """Drop every partial layer of a request (released or timed out); returns count."""
        doomed = [k for k in self._layers if k[0] == request_id]
        for k in doomed:
            del self._layers[k]
        return len(doomed)

    def pending_bytes(self) -> int:
        return sum(
            p.key.nbytes + p.value.nbytes for e in self._layers.values() for p in e.parts.values()
        )
