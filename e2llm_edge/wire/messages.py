"""Every message type that crosses the bus, the typed structs inside them, and
``encode``/``decode`` for all of them.

Messages are frozen keyword-only dataclasses; each field's annotation is its wire contract
(converters compiled once at registration by ``codec.compile_type``), so adding a message is
declaring a class, never writing a validator. Fields are typed all the way down: nested
structs (``Sampling``, ``RequestContext``, ``DeviceCounters``, ``ClusterSummary``, the
``Plan`` itself ...) are dataclasses whose own constructors check their invariants when a
message is decoded, enums travel as their values, and no payload is a free-form map.

Header mapping: ``seq`` and ``plan_version`` (on every message) travel in the header as
``seq``/``pv``; a class's ``request_id`` field travels as ``rid``; everything else is body.

A request's data-plane messages also carry its ``attempt``: each dispatch of a request to
the devices is a new attempt, so late messages of an abandoned attempt never mix with the
live one (devices key their state by ``AttemptKey``).
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Annotated, ClassVar, Literal, NamedTuple, NewType, TypeVar

import numpy as np

from e2llm_edge.errors import CodecError, ParamError
from e2llm_edge.wire import codec
from e2llm_edge.wire.codec import Converter, Header, array
from planner.plan import Plan

F32_R3 = Annotated[np.ndarray, array("float32", rank=3)]
F32_R4 = Annotated[np.ndarray, array("float32", rank=4)]

RequestId = NewType("RequestId", str)
"""A client's request id (unique per client; also the response topic's last level)."""
DeviceId = NewType("DeviceId", str)
ClientId = NewType("ClientId", str)

Role = Literal["prefill", "decoder", "mixed"]


class AttemptKey(NamedTuple):
    """One dispatch of a request to the devices: what a device keys its state by."""

    request_id: str
    attempt: int

    def __str__(self) -> str:
        return f"{self.request_id}#{self.attempt}"


class DeviceStatus(StrEnum):
    """A device's lifecycle. The orchestrator serves through devices that are ``READY``
    for its plan; ``ERROR`` (a load failed) and ``STUCK`` (holds work, finishes nothing)
    count as lost, ``OFFLINE`` is the last-will."""

    ONLINE = "online"
    LOADING = "loading"
    READY = "ready"
    STUCK = "stuck"
    ERROR = "error"
    OFFLINE = "offline"


class ErrorCode(StrEnum):
    """Why a request (or a device's handling of it) failed; clients branch on these."""

    BAD_REQUEST = "bad_request"
    """The request itself is invalid (empty prompt, too long, bad sampling values)."""
    NO_PLAN = "no_plan"
    """The devices present cannot hold the model."""
    OVERLOADED = "overloaded"
    """A queue is full: try again later."""
    CANCELLED = "cancelled"
    RETRIES_EXHAUSTED = "retries_exhausted"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    # device-side reasons, reported to the orchestrator (which retries the request)
    NOT_READY = "not_ready"
    PLAN_VERSION = "plan_version"
    MISROUTED = "misrouted"
    UNKNOWN_REQUEST = "unknown_request"
    POSITION = "position"
    BAD_MESSAGE = "bad_message"
    KV_TIMEOUT = "kv_timeout"
    LOAD_FAILED = "load_failed"
    BAD_PLAN = "bad_plan"


FinishReason = Literal["stop", "length"]


class Kind(IntEnum):
    """Byte-valued message kinds; never renumber, only append."""

    DEVICE_STATE = 1
    DEVICE_PROFILE = 2
    PLAN = 3
    ORCHESTRATOR_STATE = 4
    ORCHESTRATOR_LEASE = 5
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
    DEVICE_TELEMETRY = 32
    REQUEST_EVENT = 33
    CLUSTER_SUMMARY = 34
    PROBE = 35
    DECODE_BATCH = 36


# --------------------------------------------------------------------------- structs


@dataclass(frozen=True)
class Sampling:
    """How the last stage of a replica picks tokens: greedy when temperature is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (_number(self.temperature) and 0.0 <= self.temperature <= 10.0):
            raise SamplingError(
                "temperature", f"temperature must be in [0, 10], got {self.temperature!r}"
            )
        if not (_number(self.top_p) and 0.0 < self.top_p <= 1.0):
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise SamplingError("seed", f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SamplingError(ParamError):
    """An invalid sampling parameter; ``field`` and the message name it."""


def _number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class RequestContext:
    """What every device on a request's path must know about it; travels with the first
    message a device sees for an attempt. It decides how much KV memory a device
    allocates, so its bounds are checked against the model by the receiving device."""

    sampling: Sampling
    max_new_tokens: int
    eos_token_id: int | None
    prompt_len: int
    """Tokens prefilled by this attempt (the prompt plus any tokens already streamed)."""
    index0: int
    """Index, within the answer, of the token this attempt's prefill produces."""
    decoder_replica: int

    def __post_init__(self) -> None:
        if not (
            self.prompt_len >= 1
            and self.max_new_tokens >= 1
            and 0 <= self.index0 < self.max_new_tokens
            and self.prompt_len - self.index0 >= 1
        ):
            raise ValueError(
                f"request context out of range: prompt {self.prompt_len}, max_new_tokens "
                f"{self.max_new_tokens}, index0 {self.index0}"
            )

    @property
    def capacity(self) -> int:
        """Tokens the KV cache must hold for this attempt."""
        return self.prompt_len + self.max_new_tokens - self.index0


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation, rendered with the model's chat template."""

    role: str
    content: str


@dataclass(frozen=True)
class RequestStats:
    """Figures of one finished request (seconds), sent with its ``done`` event.

    ``waiting_s`` is every moment the request was not being served: queued before its
    prefill, queued at the stages of the prefill pipeline, waiting for its KV cache on the
    decoder; ``queue_wait_s`` is only the first part (arrival to dispatch)."""

    prompt_ids: list[int]
    prompt_tokens: int
    new_tokens: int
    queue_wait_s: float
    waiting_s: float
    ttft_s: float
    total_s: float
    decode_tokens_per_s: float
    prefill_replica: int | None
    decoder_replica: int | None
    plan_version: int
    retries: int
    restarts: int


@dataclass(frozen=True)
class StepTimings:
    """Where a request waited on the devices (seconds): for its first token, in the prefill
    stages and for its KV; for a later token, behind other prompts' prefill."""

    prefill_queued_s: float = 0.0
    """Summed over the prefill stages: time its activation waited behind other work."""
    kv_wait_s: float = 0.0
    """Time its first decode step waited on the decoder for the KV cache to arrive."""
    decode_stall_s: float = 0.0
    """A later decode step: time it waited, summed over the stages, while they prefilled
    other prompts (a mixed replica's stall)."""


@dataclass(frozen=True)
class LinkSpec:
    """A device's link to the broker, as announced to the planner."""

    bandwidth_mbps: float
    latency_ms: float


@dataclass(frozen=True)
class HardwareSpec:
    """Roofline figures of a device (when it has no measured profile)."""

    tflops: float
    mem_bw_gbps: float
    efficiency: float = 0.5


@dataclass(frozen=True)
class ProfileMeta:
    """How a profile was measured."""

    threads: int
    graph: str
    precision: str
    past_tokens: int
    decode_batches: list[int]
    model: str
    at: str
    decode_layers: int = 1
    """Layers a decode step was timed over (enough to overflow the CPU's cache)."""
    prefill_layers: int = 1
    """Layers a prefill was timed over (so a pass's own cost is not counted per layer)."""
    cpu_share: float | None = None
    """The share of a CPU this process got while its message path was probed (a CFS
    quota, a busy machine); None: not probed."""


@dataclass(frozen=True)
class ProfileData:
    """Measured per-layer costs (the inventory schema, see ``planner.inventory``)."""

    prefill_tokens: list[int]
    layer_prefill_s: list[float]
    layer_decode_s: list[float]
    embed_s: float
    head_prefill_s: float
    head_decode_s: list[float]
    pass_s: float = 0.0
    """The agent's own seconds per pass beyond its layers (0: not measured yet)."""
    io_s_per_mb: float = 0.0
    """The agent's own seconds per MB sent or received (0: not measured yet)."""
    measured: ProfileMeta | None = None

    def costs(self) -> dict[str, object]:
        """The inventory's ``profile`` mapping (without ``measured``)."""
        d = dataclasses.asdict(self)
        d.pop("measured")
        return d


@dataclass(frozen=True)
class Capabilities:
    """Graph variants a device holds and the one it runs."""

    variants: list[tuple[str, str]]
    running: tuple[str, str]


@dataclass(frozen=True)
class DeviceCounters:
    """A device's running totals and gauges, published as telemetry."""

    status: DeviceStatus
    requests: int = 0
    """Requests (attempts) holding state on this device now."""
    queue_depth: int = 0
    prefills: int = 0
    decode_steps: int = 0
    decode_batches: int = 0
    kv_chunks_in: int = 0
    kv_chunks_out: int = 0
    kv_bytes_in: int = 0
    kv_bytes_out: int = 0
    kv_pending_bytes: int = 0
    last_kv_send_s: float = 0.0
    last_kv_handoff_s: float = 0.0
    last_kv_wait_s: float = 0.0
    errors: int = 0
    rejected: int = 0
    """Messages refused because the inbound queue was full (each answered)."""
    released: int = 0
    """Attempts freed on a Release (finished, cancelled, failed elsewhere)."""
    timed_out: int = 0
    """Attempts freed because they made no progress for the request timeout."""
    loads: int = 0
    """Times this agent loaded its stage's weights (a role flip or a takeover loads none)."""
    mem_bytes: int = 0


@dataclass(frozen=True)
class ReplicaSummary:
    replica_id: int
    role: Role
    concurrency: int
    devices: list[str]
    prefill_queue_tokens: int
    decoding: int


@dataclass(frozen=True)
class ClusterSummary:
    """The orchestrator's view, for monitors and health checks."""

    orchestrator_id: str
    epoch: int
    phase: str
    """The plan phase (``PlanPhase`` of the fog core)."""
    plan_version: int
    serving: bool
    plan_error: str | None
    devices: dict[str, DeviceStatus]
    replicas: list[ReplicaSummary]
    queued: int
    in_flight: int
    completed: int
    failed: int
    dead_replicas: list[int]
    draining: bool
    restarted: int
    last_recovery_s: float | None
    rss_bytes: int
    mean_wait_s: float | None
    mean_ttft_s: float | None
    tokens_out: int
    uptime_s: float


class RequestEventKind(StrEnum):
    QUEUED = "queued"
    ROUTED = "routed"
    FIRST_TOKEN = "first_token"
    DONE = "done"
    FAILED = "failed"
    REQUEUED = "requeued"


@dataclass(frozen=True)
class RequestEventData:
    """Details of a lifecycle event; only the fields that event has are set. Never user
    text: monitors see ids and figures, not prompts or answers."""

    prompt_tokens: int | None = None
    prefill_replica: int | None = None
    decoder_replica: int | None = None
    plan_version: int | None = None
    retry: int | None = None
    attempt: int | None = None
    ttft_s: float | None = None
    new_tokens: int | None = None
    waiting_s: float | None = None
    total_s: float | None = None
    decode_tokens_per_s: float | None = None
    code: ErrorCode | None = None
    reason: str | None = None
    generated: int | None = None
    fault: bool | None = None


# --------------------------------------------------------------------------- framing


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
        values: dict[str, object] = {
            f: conv.from_wire(body[f], f"{name}.{f}") for f, conv in schema.body
        }
        if schema.rid is not None:
            values["request_id"] = schema.rid.from_wire(header.request_id, f"{name}.request_id")
        elif header.request_id is not None:
            raise CodecError("header.rid", f"{name} carries no request id")
        try:
            return schema.cls(seq=header.seq, plan_version=header.plan_version, **values)
        except (TypeError, ValueError) as exc:  # the message's own invariants
            raise CodecError(name, str(exc)) from None
    except CodecError as exc:
        exc.request_id = header.request_id
        exc.kind = header.kind
        raise


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
    device_id: DeviceId
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
    device_id: DeviceId
    memory_mb: float
    profile: ProfileData | None = None
    hardware: HardwareSpec | None = None
    link: LinkSpec | None = None
    capabilities: Capabilities | None = None


@register
@dataclass(frozen=True, kw_only=True)
class PlanMsg(Message):
    """The plan (checked by ``Plan``'s own invariants on decode); only the orchestrator
    publishes it (retained). ``epoch`` is the publishing orchestrator's lease epoch."""

    KIND: ClassVar[Kind] = Kind.PLAN
    plan: Plan
    epoch: int = 0


@register
@dataclass(frozen=True, kw_only=True)
class OrchestratorState(Message):
    """The orchestrator's liveness; retained, its last-will says offline."""

    KIND: ClassVar[Kind] = Kind.ORCHESTRATOR_STATE
    orchestrator_id: str
    status: Literal["online", "standby", "offline"]
    epoch: int = 0
    """Lease epoch of the orchestrator serving; a client re-sends what is unfinished when
    it sees a new epoch come online (a standby took over)."""
    ts: float = 0.0


@register
@dataclass(frozen=True, kw_only=True)
class OrchestratorLease(Message):
    """Who serves the cluster; retained, renewed every ``renew_s`` by its holder. A
    standby takes over (epoch + 1) when the holder's last-will says offline or the lease
    is not renewed for ``ttl_s``."""

    KIND: ClassVar[Kind] = Kind.ORCHESTRATOR_LEASE
    holder: str
    epoch: int
    ttl_s: float
    released: bool = False
    """True: the holder stopped cleanly and gives the lease up."""


# --------------------------------------------------------------------------- client API


@register
@dataclass(frozen=True, kw_only=True)
class GenerateRequest(Message):
    """A client's request; exactly one of ``prompt`` (a user message, chat-templated unless
    ``raw``), ``messages`` (a conversation, chat-templated) or ``prompt_ids``.

    The reply topic is not a field: the orchestrator derives it from the client id in the
    submission topic, which the broker's ACL ties to the client's username. ``resume``:
    tokens of the answer the client already holds (re-sent to a new orchestrator after a
    takeover, which continues from there instead of starting over).
    """

    KIND: ClassVar[Kind] = Kind.GENERATE_REQUEST
    request_id: RequestId
    client_id: ClientId
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    prompt_ids: list[int] | None = None
    raw: bool = False
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    resume: list[int] = dataclasses.field(default_factory=list)


@register
@dataclass(frozen=True, kw_only=True)
class ResponseEvent(Message):
    """One event of a response stream: tokens, then exactly one done or error."""

    KIND: ClassVar[Kind] = Kind.RESPONSE_EVENT
    request_id: RequestId
    event: Literal["token", "done", "error"]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    index: int = 0
    """Index of the first token in ``token_ids`` within the generated answer."""
    finish_reason: FinishReason | None = None
    error_code: ErrorCode | None = None
    error: str | None = None
    stats: RequestStats | None = None


# --------------------------------------------------------------------------- data plane


@register
@dataclass(frozen=True, kw_only=True)
class PrefillStart(Message):
    """Orchestrator -> the device embedding for a PREFILL replica: run this prompt."""

    KIND: ClassVar[Kind] = Kind.PREFILL_START
    request_id: RequestId
    attempt: int
    token_ids: list[int]
    decoder_replica: int
    sampling: Sampling
    max_new_tokens: int
    generated: list[int] = dataclasses.field(default_factory=list)
    """Tokens already streamed to the client (re-prefill after a failure resumes here)."""


@register
@dataclass(frozen=True, kw_only=True)
class Activation(Message):
    """Hidden states from one pipeline stage to the next."""

    KIND: ClassVar[Kind] = Kind.ACTIVATION
    request_id: RequestId
    attempt: int
    phase: Literal["prefill", "decode"]
    hidden: F32_R3
    """(B, T, hidden) float32."""
    position_start: int
    step: int
    context: RequestContext | None = None
    """On the first message a device sees for an attempt; None afterwards."""
    queued_s: float = 0.0
    """Prefill: time this prompt has waited behind other work at the stages so far."""
    stalled_s: float = 0.0
    """Decode: time this step has waited behind other prompts' prefill at the stages so
    far."""


@register
@dataclass(frozen=True, kw_only=True)
class KVChunk(Message):
    """A slice along the token axis of one layer's KV cache, PREFILL -> DECODER device."""

    KIND: ClassVar[Kind] = Kind.KV_CHUNK
    request_id: RequestId
    attempt: int
    layer: int
    token_start: int
    n_tokens_total: int
    key: F32_R4
    """(B, kv_heads, T_chunk, head_dim) float32."""
    value: F32_R4
    chunk: int
    n_chunks: int
    context: RequestContext | None = None
    sent_at: float = 0.0
    """Wall clock when the sender started the handoff (the receiver times it)."""


@register
@dataclass(frozen=True, kw_only=True)
class DecodeStep(Message):
    """Decoder replica's embedding device: feed this token at this position."""

    KIND: ClassVar[Kind] = Kind.DECODE_STEP
    request_id: RequestId
    attempt: int
    token_id: int
    position: int
    step: int
    context: RequestContext | None = None


MAX_DECODE_BATCH = 256
"""Most steps one `DecodeBatch` may carry (a stage batches at most its replica's
concurrency, and a plan's concurrency is far below this)."""


@register
@dataclass(frozen=True, kw_only=True)
class DecodeBatch(Message):
    """The decode steps a stage ran as one batch, sent on to the next stage as one
    message, so that the next stage runs them as one batch too.

    Sent one message per request, a batch fell apart at every idle stage (it started on
    the first step to arrive, and the rest ran after it): a 4-stage decoder serving 8
    requests measured a mean batch of 1.2 per stage where the planner counts on
    micro-batches of 2. One message is also one broker round trip instead of one per
    request. Each step is checked on its own, as if it had come alone."""

    KIND: ClassVar[Kind] = Kind.DECODE_BATCH
    steps: tuple[Activation | DecodeStep, ...]

    def __post_init__(self) -> None:
        n = len(self.steps)
        if not 1 <= n <= MAX_DECODE_BATCH:
            raise ValueError(f"a decode batch carries 1 to {MAX_DECODE_BATCH} steps, got {n}")
        for s in self.steps:
            if isinstance(s, Activation) and s.phase != "decode":
                raise ValueError(f"a decode batch carries a {s.phase} activation ({s.request_id})")


@register
@dataclass(frozen=True, kw_only=True)
class TokenOut(Message):
    """Last decoder stage -> orchestrator: the token sampled at ``index``."""

    KIND: ClassVar[Kind] = Kind.TOKEN_OUT
    request_id: RequestId
    attempt: int
    token_id: int
    index: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    timings: StepTimings | None = None
    """On the first token of an attempt: where its prefill and handoff waited."""


@register
@dataclass(frozen=True, kw_only=True)
class Release(Message):
    """Free everything held for a request: one attempt, or every attempt when ``attempt``
    is None (finished, cancelled, failed, timed out). From a client on its request topic
    it cancels the request."""

    KIND: ClassVar[Kind] = Kind.RELEASE
    request_id: RequestId
    attempt: int | None = None
    reason: str


@register
@dataclass(frozen=True, kw_only=True)
class Probe(Message):
    """A device's message to itself, through the broker, timing its own message path
    (encode, MQTT, TLS, the socket, decode) once, before it first announces its
    profile: the agent's cost per pass and per MB that the planner adds to its layers."""

    KIND: ClassVar[Kind] = Kind.PROBE
    device_id: DeviceId
    seq: int
    data: Annotated[np.ndarray, array("float32")]


# --------------------------------------------------------------------------- health, telemetry


@register
@dataclass(frozen=True, kw_only=True)
class ErrorReport(Message):
    """A device tells the orchestrator something failed (for an attempt, or in general)."""

    KIND: ClassVar[Kind] = Kind.ERROR_REPORT
    request_id: RequestId | None = None
    attempt: int | None = None
    """The attempt it concerns; None: the request's live one (the sender could not read
    which, e.g. from a malformed message)."""
    device_id: DeviceId
    code: ErrorCode
    message: str


@register
@dataclass(frozen=True, kw_only=True)
class Heartbeat(Message):
    """Liveness between state changes."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT
    device_id: DeviceId
    ts: float


@register
@dataclass(frozen=True, kw_only=True)
class DeviceTelemetry(Message):
    """A device's counters, every telemetry interval."""

    KIND: ClassVar[Kind] = Kind.DEVICE_TELEMETRY
    device_id: DeviceId
    counters: DeviceCounters


@register
@dataclass(frozen=True, kw_only=True)
class ClusterTelemetry(Message):
    """The orchestrator's summary of the cluster."""

    KIND: ClassVar[Kind] = Kind.CLUSTER_SUMMARY
    summary: ClusterSummary


@register
@dataclass(frozen=True, kw_only=True)
class RequestEvent(Message):
    """Request lifecycle for monitors (queued, routed, first token, done ...); no user text."""

    KIND: ClassVar[Kind] = Kind.REQUEST_EVENT
    request_id: RequestId
    event: RequestEventKind
    data: RequestEventData = dataclasses.field(default_factory=RequestEventData)


DATA_PLANE = (PrefillStart, Activation, KVChunk, DecodeStep, TokenOut, Release, ErrorReport)
"""Messages that belong to one attempt of a request."""


def attempt_key(msg: PrefillStart | Activation | KVChunk | DecodeStep | TokenOut) -> AttemptKey:
    return AttemptKey(msg.request_id, msg.attempt)
