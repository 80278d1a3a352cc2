"""A device agent's decisions, apart from doing them ("sans-I/O"): the scheduler half of
the agent. The shell (`device.agent`) feeds it messages and results and executes what it
returns; the model runs in the shell's engine.

The core decides: which plan placement it holds and whether a new plan needs a reload
(a role or concurrency change keeps the weights); which messages it admits (a bounded
inbox; an overloaded device answers instead of queueing without end); which attempt a
message belongs to and whether it is a replay; what to compute next (one prefill, or one
batch of decode steps whose KV is here); where results go (next stage, the KV handoff to
the decoder replica, the sampled token to the orchestrator and the next step); and when to
give up on a request (no progress, KV that never arrives) or on itself (holding work but
finishing none: stuck).

Protocol with the shell:
- `accept(msg, now)` for every inbox message; `plan(plan, now)` for every plan.
- `next_job(now)` when the engine is free: a `Compute` (or None), plus commands.
- `computed(result, now)` with the engine's output for that job.
- `loaded(version, error, now)` after a `Load`; `tick(now)` periodically.
Each returns the commands to execute, in order: sends, engine operations on caches,
state publications. Nothing here touches a socket, a file, a thread or the clock.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from e2llm_edge.device.kv_transfer import KVAssembler, kv_chunks
from e2llm_edge.device.sampling import sample
from e2llm_edge.errors import CodecError
from e2llm_edge.wire import messages as m
from e2llm_edge.wire.messages import AttemptKey, DeviceStatus, ErrorCode, RequestContext
from planner.plan import Plan, Replica, micro_batch
from planner.plan import Stage as PlanStage

Work = m.PrefillStart | m.Activation | m.KVChunk | m.DecodeStep | m.Release
Incoming = Work | m.DecodeBatch
"""What `accept` takes: work, or a batch of decode steps (unpacked into the inbox)."""


@dataclass(frozen=True)
class DeviceConfig:
    device_id: str
    vocab_size: int
    max_position: int
    hidden_size: int
    eos_token_id: int | None
    max_batch: int = 16
    """Largest decode batch run in one pass."""
    max_inbox: int = 4096
    """Messages waiting beyond this are refused, each answered (ErrorCode.OVERLOADED)."""
    request_timeout: float = 120.0
    """Seconds without progress after which an attempt's state and KV cache are freed."""
    kv_wait_timeout: float = 30.0
    """Seconds a decode step may wait for its KV cache to arrive."""
    stage_timeout: float = 30.0
    """Seconds the device may hold queued work without finishing any before it reports
    itself stuck."""


@dataclass(frozen=True)
class Placement:
    """This device's part of a plan."""

    version: int
    replica: Replica
    index: int
    plan: Plan

    @property
    def stage(self) -> PlanStage:
        return self.replica.stages[self.index]

    @property
    def is_last(self) -> bool:
        return self.index == len(self.replica.stages) - 1

    def next_device(self) -> str:
        return self.replica.stages[self.index + 1].device_id

    def replica_by_id(self, rid: int) -> Replica:
        return self.plan.replica(rid)

    @property
    def slots(self) -> int:
        """KV slots to pool for batched decode (prefill replicas keep none)."""
        return self.replica.concurrency if self.replica.role != "prefill" else 0


def find_placement(plan: Plan, device_id: str) -> Placement | None:
    for r in plan.replicas:
        for i, s in enumerate(r.stages):
            if s.device_id == device_id:
                return Placement(plan.version, r, i, plan)
    return None


def embed_device(replica: Replica) -> str:
    return next(s.device_id for s in replica.stages if s.embed)


def layer_owner(replica: Replica, layer: int) -> str:
    return next(s.device_id for s in replica.stages if s.layer_start <= layer < s.layer_end)


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Send:
    """A message to a peer device's inbox."""

    device_id: str
    msg: m.Activation | m.KVChunk | m.DecodeStep | m.DecodeBatch | m.Release


@dataclass(frozen=True)
class Report:
    """A message to the orchestrator (tokens, errors)."""

    msg: m.TokenOut | m.ErrorReport


@dataclass(frozen=True)
class PublishState:
    """The device's retained state changed."""


@dataclass(frozen=True)
class Load:
    """Load (slow: off the event loop) the sessions for a stage; answer with `loaded`."""

    version: int
    layers: tuple[int, int]
    embed: bool
    head: bool
    slots: int


@dataclass(frozen=True)
class Configure:
    """Same weights, new KV pool size (a role or concurrency change): no reload."""

    slots: int


@dataclass(frozen=True)
class WriteKV:
    """Put one layer of a received KV cache into the attempt's cache (allocate it first,
    with `capacity` tokens, if it has none)."""

    key: AttemptKey
    layer: int
    token_start: int
    k: np.ndarray
    v: np.ndarray
    capacity: int


@dataclass(frozen=True)
class FreeCache:
    key: AttemptKey


@dataclass(frozen=True)
class DropAllCaches:
    """Every attempt is dropped (a new plan)."""


@dataclass(frozen=True)
class Log:
    level: str
    key: str
    text: str


Command = (
    Send | Report | PublishState | Load | Configure | WriteKV | FreeCache | DropAllCaches | Log
)


# --------------------------------------------------------------------------- jobs


@dataclass(frozen=True)
class Row:
    """One sequence of a compute job."""

    key: AttemptKey
    start: int
    """Position of its first token (= tokens its cache holds before this run)."""
    ids: np.ndarray | None = None
    """(1, T) token ids to embed first, or None when `hidden` is given."""
    hidden: np.ndarray | None = None
    """(1, T, H) hidden states from the previous stage."""
    new_cache: int | None = None
    """Allocate a cache of this many tokens for `key` before running."""


@dataclass(frozen=True)
class Compute:
    """Work for the engine: embed (rows with ids) then, if `layers`, run this device's
    layers on each row's cache, then, if `head`, the head on each row's last position.
    Returns hidden states (or logits) in row order; `read_kv`: also every layer's KV of that
    attempt's cache (for a handoff)."""

    job: int
    rows: tuple[Row, ...]
    layers: bool
    head: bool
    read_kv: AttemptKey | None = None
    threaded: bool = False
    """Long (a prefill): run off the event loop so the connection keeps being served."""


@dataclass(frozen=True)
class Computed:
    """The engine's answer to `Compute` `job`: one output row per input row, or an error."""

    job: int
    out: np.ndarray | None
    kv: dict[int, tuple[int, np.ndarray, np.ndarray]] | None = None
    error: str | None = None


# --------------------------------------------------------------------------- state


@dataclass
class Attempt:
    """What this device holds for one attempt of a request."""

    ctx: RequestContext
    cached: int = 0
    """Tokens its KV cache holds here."""
    has_cache: bool = False
    kv_ready: bool = False
    kv_layers: set[int] = field(default_factory=set)
    waiting: list[tuple[Work, float]] = field(default_factory=list)
    """Decode steps that arrived before the KV cache did (with their arrival time)."""
    last_step: int = -1
    touched: float = 0.0
    prefilled_here: bool = False


@dataclass(frozen=True)
class _Pending:
    """What to do with a job's output."""

    kind: Literal["prefill_embed", "prefill", "decode_embed", "decode"]
    items: tuple[tuple[Work, float], ...]
    """The messages behind the rows, with the time their wait ended (queue wait known)."""
    waits: tuple[float, ...]
    stalls: tuple[float, ...] = ()
    """Decode rows: seconds each has waited behind prompts' prefill passes so far (on
    this device, plus what the message carried from the stages before)."""
    started: float = 0.0
    """When the job was handed to the engine."""


PREFILL_RUNS_KEPT = 64
"""Recent prefill passes a device remembers, to tell how long a decode step waited
behind them (a step waits behind at most the few passes queued before it)."""


@dataclass
class Inbound:
    msg: Work
    arrived: float


class Failure(Exception):
    """Processing one message failed; reported to the orchestrator with `code`."""

    def __init__(self, code: ErrorCode, text: str) -> None:
        super().__init__(text)
        self.code = code


class DeviceCore:
    def __init__(self, cfg: DeviceConfig, now: float = 0.0) -> None:
        self.cfg = cfg
        self.id = cfg.device_id
        self.status = DeviceStatus.ONLINE
        self.last_error: str | None = None
        self.placement: Placement | None = None
        self.loading: Placement | None = None
        self.queued_plan: Plan | None = None
        self.attempts: dict[AttemptKey, Attempt] = {}
        self.kv = KVAssembler()
        self.inbox: deque[Inbound] = deque()
        self.busy: int | None = None
        """The job the engine is running (None: idle)."""
        self.pending: dict[int, _Pending] = {}
        self.prefill_runs: deque[tuple[float, float]] = deque(maxlen=PREFILL_RUNS_KEPT)
        """(start, end) of this device's recent prefill passes."""
        self._jobs = itertools.count(1)
        self.beat = now
        """Last time the worker finished something or had nothing to do."""
        self.tokens_done = 0
        self.now = now
        self.wall_clock = 0.0
        """Wall-clock seconds, set by the shell before each call: a KV handoff is timed
        across devices (monotonic clocks of two machines do not compare)."""
        self.counters: dict[str, float] = dict.fromkeys(
            (
                "prefills",
                "decode_steps",
                "decode_batches",
                "kv_chunks_in",
                "kv_chunks_out",
                "kv_bytes_in",
                "kv_bytes_out",
                "last_kv_send_s",
                "last_kv_handoff_s",
                "last_kv_wait_s",
                "errors",
                "rejected",
                "released",
                "timed_out",
                "loads",
            ),
            0,
        )
        self._out: list[Command] = []
        self._gather: dict[str, tuple[int, list[m.Activation | m.DecodeStep]]] | None = None
        """While a decode batch's results go out: per next device, the index in `_out`
        of its send and the steps it carries (they leave as one `DecodeBatch`)."""

    # ------------------------------------------------------------------ helpers

    def _emit(self, cmd: Command) -> None:
        self._out.append(cmd)

    def _take(self) -> list[Command]:
        out, self._out = self._out, []
        return out

    def _set_status(self, status: DeviceStatus, error: str | None = None) -> None:
        if error is not None:
            self.last_error = error
        if status != self.status:
            self.status = status
            self._emit(PublishState())

    def _fail(self, key: AttemptKey | None, code: ErrorCode, text: str) -> None:
        """An attempt cannot go on here: free it and tell the orchestrator (which retries)."""
        self.counters["errors"] += 1
        self.last_error = f"{code.value}: {text}"
        self._emit(Log("warning", f"fail:{code.value}", f"{self.id}: {key}: {code.value}: {text}"))
        if key is not None:
            self._free(key)
        self._emit(
            Report(
                m.ErrorReport(
                    request_id=m.RequestId(key.request_id) if key else None,
                    attempt=key.attempt if key else None,
                    device_id=m.DeviceId(self.id),
                    code=code,
                    message=text,
                    plan_version=self.placement.version if self.placement else 0,
                )
            )
        )

    def _free(self, key: AttemptKey) -> None:
        st = self.attempts.pop(key, None)
        self.kv.discard(key)
        if st is not None and st.has_cache:
            self._emit(FreeCache(key))

    def _drop_all(self) -> None:
        """A new plan: attempts of the old one cannot continue (messages already queued
        for the old version fail their version check when their turn comes)."""
        self.attempts.clear()
        self.kv = KVAssembler()
        self._emit(DropAllCaches())

    # ------------------------------------------------------------------ plans

    def plan(self, plan: Plan, now: float) -> list[Command]:
        """A plan arrived (retained or new). Loads happen one at a time: a plan arriving
        during a load is applied after it."""
        self.now = now
        if self.loading is not None:
            self.queued_plan = plan
            return self._take()
        self._apply(plan, now)
        return self._take()

    def _apply(self, plan: Plan, now: float) -> None:
        place = find_placement(plan, self.id)
        old = self.placement
        if old is not None and plan.version <= old.version and self.status == DeviceStatus.READY:
            # the retained plan again (our reconnect, or re-published after a broker
            # restart), or an older one: keep the requests running
            self._emit(PublishState())
            return
        # requests of an older plan may not continue under a different one
        self._drop_all()
        if place is None:
            self.placement = None
            self.status = DeviceStatus.ONLINE
            self._emit(PublishState())
            return
        same_weights = (
            old is not None
            and (old.stage.layer_start, old.stage.layer_end, old.stage.embed, old.stage.head)
            == (place.stage.layer_start, place.stage.layer_end, place.stage.embed, place.stage.head)
            and self.status in (DeviceStatus.READY, DeviceStatus.STUCK)
        )
        if same_weights:
            assert old is not None
            if old.slots != place.slots:
                self._emit(Configure(place.slots))
            self.placement = place
            self.status = DeviceStatus.READY
            self._emit(PublishState())
            self._emit(Log("info", "plan", self._describe(place)))
            return
        self.placement = None
        self.loading = place
        self.status = DeviceStatus.LOADING
        self._emit(PublishState())
        self._emit(
            Load(
                place.version,
                (place.stage.layer_start, place.stage.layer_end),
                place.stage.embed,
                place.stage.head,
                place.slots,
            )
        )

    def loaded(self, version: int, error: str | None, now: float) -> list[Command]:
        place, self.loading = self.loading, None
        if place is None or place.version != version:
            return self._take()
        if error is not None:
            self._set_status(DeviceStatus.ERROR, error)
            self._emit(Log("warning", "load", f"{self.id}: loading plan v{version}: {error}"))
        else:
            self.counters["loads"] += 1
            self.placement = place
            self.last_error = None
            self.status = DeviceStatus.READY
            self.beat = now
            self._emit(PublishState())
            self._emit(Log("info", "plan", self._describe(place)))
        if self.queued_plan is not None:
            plan, self.queued_plan = self.queued_plan, None
            self._apply(plan, now)
        return self._take()

    def _describe(self, p: Placement) -> str:
        return (
            f"{self.id}: plan v{p.version}, replica {p.replica.replica_id} ({p.replica.role}) "
            f"stage {p.index} layers [{p.stage.layer_start}, {p.stage.layer_end})"
            f"{' +embed' if p.stage.embed else ''}{' +head' if p.stage.head else ''}"
        )

    # ------------------------------------------------------------------ inbox

    def accept(self, msg: Incoming, now: float) -> list[Command]:
        """An inbox message arrived. Releases act at once (they free memory); KV chunks are
        assembled at once (bookkeeping only); the rest waits in the bounded inbox, a
        decode batch's steps side by side (so they are batched again here)."""
        self.now = now
        if isinstance(msg, m.DecodeBatch):
            for step in msg.steps:
                self._enqueue(step, now)
        else:
            self._enqueue(msg, now)
        return self._take()

    def _enqueue(self, msg: Work, now: float) -> None:
        if isinstance(msg, m.Release):
            self._release(msg)
        elif isinstance(msg, m.KVChunk):
            self._guard(msg, lambda: self._kv_chunk(msg, now))
        elif len(self.inbox) >= self.cfg.max_inbox:
            self.counters["rejected"] += 1
            self._fail(
                AttemptKey(msg.request_id, msg.attempt),
                ErrorCode.OVERLOADED,
                f"device {self.id} has {len(self.inbox)} messages waiting",
            )
        else:
            self.inbox.append(Inbound(msg, now))

    def reject_malformed(self, request_id: str | None, error: str) -> list[Command]:
        """A message for us failed to decode. If it named a request, whatever this device
        holds of it cannot go on (its attempt was in the unreadable body: the report
        applies to the request's live attempt)."""
        self.counters["errors"] += 1
        self.last_error = f"bad message: {error}"
        if request_id is not None:
            for k in [k for k in self.attempts if k.request_id == request_id]:
                self._free(k)
            self._emit(
                Report(
                    m.ErrorReport(
                        request_id=m.RequestId(request_id),
                        attempt=None,
                        device_id=m.DeviceId(self.id),
                        code=ErrorCode.BAD_MESSAGE,
                        message=f"malformed message: {error}",
                        plan_version=self.placement.version if self.placement else 0,
                    )
                )
            )
        return self._take()

    def engine_failed(self, key: AttemptKey, error: str) -> list[Command]:
        """The engine could not apply an operation (e.g. received KV that does not fit)."""
        self._fail(key, ErrorCode.INTERNAL, error)
        return self._take()

    def _release(self, msg: m.Release) -> None:
        keys = [
            k
            for k in self.attempts
            if k.request_id == msg.request_id and msg.attempt in (None, k.attempt)
        ]
        for k in keys:
            self.counters["released"] += 1
            self._free(k)
        self.inbox = deque(
            x
            for x in self.inbox
            if not (
                x.msg.request_id == msg.request_id
                and msg.attempt in (None, getattr(x.msg, "attempt", None))
            )
        )

    def _guard(self, msg: Work, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except Failure as exc:
            self._fail(_key(msg), exc.code, str(exc))
        except (CodecError, ValueError) as exc:
            self._fail(_key(msg), ErrorCode.BAD_REQUEST, str(exc))

    def _check_plan(self, msg: Work) -> Placement:
        place = self.placement
        if place is None or self.status != DeviceStatus.READY:
            raise Failure(ErrorCode.NOT_READY, f"device {self.id} holds no stage of a plan")
        if msg.plan_version != place.version:
            raise Failure(
                ErrorCode.PLAN_VERSION,
                f"message for plan v{msg.plan_version}, device {self.id} runs v{place.version}",
            )
        return place

    def _check_context(self, place: Placement, ctx: RequestContext) -> None:
        """A context from the network decides how much KV memory we allocate: bound it."""
        if ctx.capacity > self.cfg.max_position:
            raise Failure(
                ErrorCode.BAD_REQUEST,
                f"request needs {ctx.capacity} tokens of context, the model has "
                f"{self.cfg.max_position}",
            )
        try:
            decoder = place.replica_by_id(ctx.decoder_replica)
        except KeyError:
            raise Failure(
                ErrorCode.BAD_REQUEST,
                f"plan v{place.version} has no replica {ctx.decoder_replica}",
            ) from None
        if decoder.role == "prefill":
            raise Failure(ErrorCode.BAD_REQUEST, f"replica {ctx.decoder_replica} does not decode")

    # ------------------------------------------------------------------ scheduling

    def next_job(self, now: float) -> tuple[Compute | None, list[Command]]:
        """The next compute job from the inbox (None: nothing runnable). Messages that
        need no compute or fail validation are handled on the way."""
        self.now = now
        while self.busy is None and self.loading is None and self.inbox:
            first = self.inbox.popleft()
            if _is_decode(first.msg):
                batch = [first]
                cap = self._decode_cap()
                while self.inbox and len(batch) < cap and _is_decode(self.inbox[0].msg):
                    batch.append(self.inbox.popleft())
                job = self._decode_job(batch, now)
            else:
                job = self._prefill_job(first, now)
            if job is not None:
                self.busy = job.job
                return job, self._take()
        if not self.inbox and self.busy is None:
            self.beat = now
        return None, self._take()

    def _decode_cap(self) -> int:
        """Most decode steps in one batch: the micro-batch of the requests held here (n
        requests on k stages: n over min(k, n)), so that they circulate as min(k, n)
        micro-batches and every stage has one to work on, as the planner's decode model
        has it. Merging every step that queued instead would leave fewer, bigger batches
        and stages idle while they travel."""
        cap = self.cfg.max_batch
        p = self.placement
        if p is not None and p.slots > 0:
            held = min(max(1, len(self.attempts)), p.slots)
            cap = min(cap, micro_batch(held, len(p.replica.stages)))
        return max(1, cap)

    def _new_job(self, pending: _Pending, **kw: object) -> Compute:
        job = next(self._jobs)
        self.pending[job] = dataclasses.replace(pending, started=self.now)
        return Compute(job=job, **kw)  # type: ignore[arg-type]

    def _prefill_job(self, item: Inbound, now: float) -> Compute | None:
        msg = item.msg
        try:
            place = self._check_plan(msg)
            if isinstance(msg, m.PrefillStart):
                return self._prefill_start(place, msg, item, now)
            if isinstance(msg, m.Activation):
                return self._prefill_activation(place, msg, item, now)
            raise Failure(ErrorCode.BAD_MESSAGE, f"{type(msg).__name__} is not work here")
        except Failure as exc:
            self._fail(_key(msg), exc.code, str(exc))
        except (CodecError, ValueError) as exc:
            self._fail(_key(msg), ErrorCode.BAD_REQUEST, str(exc))
        return None

    def _prefill_start(
        self, place: Placement, msg: m.PrefillStart, item: Inbound, now: float
    ) -> Compute | None:
        if not place.stage.embed:
            raise Failure(ErrorCode.MISROUTED, f"device {self.id} does not hold the embedding")
        if not msg.token_ids:
            raise Failure(ErrorCode.BAD_REQUEST, "prefill with no tokens")
        vocab = self.cfg.vocab_size
        if min(msg.token_ids) < 0 or max(msg.token_ids) >= vocab:
            raise Failure(ErrorCode.BAD_REQUEST, f"token ids must be in [0, {vocab})")
        ctx = RequestContext(
            sampling=msg.sampling,
            max_new_tokens=msg.max_new_tokens,
            eos_token_id=self.cfg.eos_token_id,
            prompt_len=len(msg.token_ids),
            index0=len(msg.generated),
            decoder_replica=msg.decoder_replica,
        )
        self._check_context(place, ctx)
        key = AttemptKey(msg.request_id, msg.attempt)
        ids = np.asarray([msg.token_ids], np.int64)
        queued = now - item.arrived
        if place.index != 0:
            # embedding next to the head: embed here, stage 0 runs the layers
            carry = m.Activation(
                request_id=msg.request_id,
                attempt=msg.attempt,
                phase="prefill",
                hidden=np.zeros((1, 0, self.cfg.hidden_size), np.float32),
                position_start=0,
                step=0,
                context=ctx,
                plan_version=place.version,
            )
            return self._new_job(
                _Pending("prefill_embed", ((carry, now),), (queued,)),
                rows=(Row(key, 0, ids=ids),),
                layers=False,
                head=False,
                threaded=True,
            )
        if key in self.attempts:
            return None  # QoS 1 redelivery
        self.attempts[key] = Attempt(ctx=ctx, has_cache=True, prefilled_here=True, touched=now)
        return self._prefill_compute(
            place, key, ctx, msg, Row(key, 0, ids=ids, new_cache=ctx.capacity), queued
        )

    def _prefill_activation(
        self, place: Placement, msg: m.Activation, item: Inbound, now: float
    ) -> Compute | None:
        if msg.phase != "prefill":
            raise Failure(ErrorCode.BAD_REQUEST, "decode activation outside a batch")
        ctx = msg.context
        if ctx is None:
            raise Failure(ErrorCode.BAD_REQUEST, "prefill activation without a request context")
        key = AttemptKey(msg.request_id, msg.attempt)
        if key in self.attempts and self.attempts[key].prefilled_here:
            return None  # QoS 1 redelivery
        self._check_context(place, ctx)
        if (
            msg.hidden.shape[0] != 1
            or msg.hidden.shape[1] != ctx.prompt_len
            or (msg.hidden.shape[2] != self.cfg.hidden_size)
        ):
            raise Failure(
                ErrorCode.BAD_REQUEST,
                f"prefill activation of shape {list(msg.hidden.shape)} for a "
                f"{ctx.prompt_len}-token prompt",
            )
        self.attempts[key] = Attempt(ctx=ctx, has_cache=True, prefilled_here=True, touched=now)
        queued = msg.queued_s + (now - item.arrived)
        row = Row(key, 0, hidden=msg.hidden, new_cache=ctx.capacity)
        return self._prefill_compute(place, key, ctx, msg, row, queued)

    def _prefill_compute(
        self,
        place: Placement,
        key: AttemptKey,
        ctx: RequestContext,
        msg: Work,
        row: Row,
        queued: float,
    ) -> Compute:
        handoff = place.replica_by_id(ctx.decoder_replica).replica_id != place.replica.replica_id
        return self._new_job(
            _Pending("prefill", ((msg, 0.0),), (queued,)),
            rows=(row,),
            layers=True,
            head=place.is_last,
            read_kv=key if handoff else None,
            threaded=True,
        )

    def _decode_job(self, batch: list[Inbound], now: float) -> Compute | None:
        place0 = self.placement
        rows: list[Row] = []
        items: list[tuple[Work, float]] = []
        waits: list[float] = []
        stalls: list[float] = []
        embed_only: list[Inbound] = []
        for item in batch:
            msg = item.msg
            try:
                place = self._check_plan(msg)
                assert isinstance(msg, m.DecodeStep | m.Activation)
                if isinstance(msg, m.DecodeStep) and place.index != 0:
                    embed_only.append(item)  # embedding next to the head: feed stage 0
                    continue
                st = self._decode_state(place, msg, now)
                if st is None:
                    continue  # a replay of a step already run
                if not st.kv_ready:
                    st.waiting.append((msg, item.arrived))
                    continue
                pos = _position(msg)
                if st.cached != pos:
                    raise Failure(
                        ErrorCode.POSITION,
                        f"step at position {pos}, the cache holds {st.cached} tokens",
                    )
                key = AttemptKey(msg.request_id, msg.attempt)
                if isinstance(msg, m.DecodeStep):
                    if not place.stage.embed:
                        raise Failure(ErrorCode.MISROUTED, f"device {self.id} cannot embed")
                    rows.append(Row(key, pos, ids=np.asarray([[msg.token_id]], np.int64)))
                else:
                    rows.append(Row(key, pos, hidden=msg.hidden))
                items.append((msg, item.arrived))
                carried = msg.queued_s if isinstance(msg, m.Activation) else 0.0
                waits.append(carried + (now - item.arrived))
                stalled = msg.stalled_s if isinstance(msg, m.Activation) else 0.0
                stalls.append(stalled + self._behind_prefill(item.arrived, now))
            except Failure as exc:
                self._fail(_key(msg), exc.code, str(exc))
            except (CodecError, ValueError) as exc:
                self._fail(_key(msg), ErrorCode.BAD_REQUEST, str(exc))
        if embed_only and not rows:
            # embedding next to the head: embed the steps together, for stage 0 to run
            # them together
            embed_rows: list[Row] = []
            embed_items: list[tuple[Work, float]] = []
            for item in embed_only:
                msg = item.msg
                assert isinstance(msg, m.DecodeStep)
                key = AttemptKey(msg.request_id, msg.attempt)
                ids = np.asarray([[msg.token_id]], np.int64)
                embed_rows.append(Row(key, msg.position, ids=ids))
                embed_items.append((msg, item.arrived))
            stalls = [self._behind_prefill(item.arrived, now) for item in embed_only]
            return self._new_job(
                _Pending(
                    "decode_embed",
                    tuple(embed_items),
                    (0.0,) * len(embed_items),
                    tuple(stalls),
                ),
                rows=tuple(embed_rows),
                layers=False,
                head=False,
            )
        for item in reversed(embed_only):  # they go next, in front of what is left
            self.inbox.appendleft(item)
        if not rows:
            return None
        assert place0 is not None
        return self._new_job(
            _Pending("decode", tuple(items), tuple(waits), tuple(stalls)),
            rows=tuple(rows),
            layers=True,
            head=place0.is_last,
        )

    def _behind_prefill(self, arrived: float, now: float) -> float:
        """Seconds between `arrived` and `now` this device spent on prompts' prefill: what
        a decode step that arrived then waited behind them (a stall, in the standard
        metrics: waiting, not service)."""
        total = 0.0
        for start, end in reversed(self.prefill_runs):  # in time order: newest first
            if end <= arrived:
                break
            total += max(0.0, min(end, now) - max(start, arrived))
        return total

    def _decode_state(
        self, place: Placement, msg: m.DecodeStep | m.Activation, now: float
    ) -> Attempt | None:
        key = AttemptKey(msg.request_id, msg.attempt)
        st = self.attempts.get(key)
        if st is None:
            if msg.context is None:
                raise Failure(
                    ErrorCode.UNKNOWN_REQUEST,
                    f"device {self.id} has no state for {key} (released or timed out)",
                )
            self._check_context(place, msg.context)
            # a decoder stage whose KV is still on its way
            st = Attempt(ctx=msg.context, touched=now)
            self.attempts[key] = st
        if msg.step <= st.last_step:
            return None
        if st.prefilled_here:
            st.kv_ready = True
        return st

    # ------------------------------------------------------------------ results

    def computed(self, res: Computed, now: float) -> list[Command]:
        """The engine finished job `res.job`: send its results on."""
        self.now = now
        pending = self.pending.pop(res.job, None)
        if res.job == self.busy:
            self.busy = None
        self.beat = now
        if pending is None:
            return self._take()
        keys = [_key(w) for w, _ in pending.items]
        if res.error is not None or res.out is None:
            for k in keys:
                if k is not None:
                    self._fail(k, ErrorCode.INTERNAL, res.error or "no output")
            return self._take()
        if pending.kind == "decode":
            self.counters["decode_batches"] += 1
        elif pending.kind in ("prefill", "prefill_embed"):
            self.prefill_runs.append((pending.started, now))
        place = self.placement
        if pending.kind in ("decode", "decode_embed"):
            self._gather = {}
        try:
            self._results(pending, res.out, res.kv, keys, place, now)
        finally:
            gathered, self._gather = self._gather, None
        for device_id, (at, steps) in (gathered or {}).items():
            if len(steps) > 1:
                batch = m.DecodeBatch(steps=tuple(steps), plan_version=steps[0].plan_version)
                self._out[at] = Send(device_id, batch)
        return self._take()

    def _results(
        self,
        pending: _Pending,
        outs: np.ndarray,
        kv: dict[int, tuple[int, np.ndarray, np.ndarray]] | None,
        keys: list[AttemptKey | None],
        place: Placement | None,
        now: float,
    ) -> None:
        for i, (msg, _) in enumerate(pending.items):
            key = keys[i]
            if (
                place is None
                or msg.plan_version != place.version
                or (pending.kind in ("prefill", "decode") and key not in self.attempts)
            ):
                continue  # released, or a new plan, while it ran
            try:
                out = outs[i : i + 1]
                if pending.kind == "prefill_embed":
                    self._after_prefill_embed(place, msg, out, pending.waits[i])
                elif pending.kind == "prefill":
                    self._after_prefill(place, msg, out, kv, pending.waits[i], now)
                elif pending.kind == "decode_embed":
                    self._after_decode_embed(place, msg, out, pending.stalls[i])
                else:
                    self._after_decode(place, msg, out, pending.waits[i], pending.stalls[i], now)
            except Failure as exc:
                self._fail(key, exc.code, str(exc))

    def _after_prefill_embed(
        self, place: Placement, carry: Work, hidden: np.ndarray, queued: float
    ) -> None:
        assert isinstance(carry, m.Activation)
        act = m.Activation(
            request_id=carry.request_id,
            attempt=carry.attempt,
            phase="prefill",
            hidden=np.ascontiguousarray(hidden, np.float32),
            position_start=0,
            step=0,
            context=carry.context,
            queued_s=queued,
            plan_version=place.version,
        )
        self._send(place.replica.stages[0].device_id, act)

    def _after_prefill(
        self,
        place: Placement,
        msg: Work,
        out: np.ndarray,
        kv: dict[int, tuple[int, np.ndarray, np.ndarray]] | None,
        queued: float,
        now: float,
    ) -> None:
        key = _key(msg)
        assert key is not None
        st = self.attempts[key]
        ctx = st.ctx
        st.cached = ctx.prompt_len
        st.touched = now
        self.counters["prefills"] += 1
        decoder = place.replica_by_id(ctx.decoder_replica)
        handoff = decoder.replica_id != place.replica.replica_id
        if not place.is_last:
            self._send(
                place.next_device(),
                m.Activation(
                    request_id=m.RequestId(key.request_id),
                    attempt=key.attempt,
                    phase="prefill",
                    hidden=np.ascontiguousarray(out, np.float32),
                    position_start=0,
                    step=0,
                    context=ctx,
                    queued_s=queued,
                    plan_version=place.version,
                ),
            )
        if handoff and kv is None:
            raise Failure(ErrorCode.INTERNAL, "prefill for a handoff returned no KV")
        finished = False
        if place.is_last:
            # the first token (and the decoder's first step) go out before this stage's
            # KV: on a slow uplink they would otherwise queue behind megabytes of it, and
            # the decoder's stages before this one can compute while the KV travels
            finished = self._sample(
                place,
                key,
                st,
                out[0, -1],
                ctx.index0,
                decoder,
                m.StepTimings(prefill_queued_s=round(queued, 6)),
            )
        if handoff:
            assert kv is not None
            if not finished:  # an answer of one token needs no decoder
                self._hand_over_kv(place, decoder, key, ctx, kv, now)
            self._free(key)

    def _hand_over_kv(
        self,
        place: Placement,
        decoder: Replica,
        key: AttemptKey,
        ctx: RequestContext,
        kv: dict[int, tuple[int, np.ndarray, np.ndarray]],
        now: float,
    ) -> None:
        """This stage's KV cache, layer by layer, to the decoder devices holding them (a
        sliding-window layer: its last window of positions, all a later query sees)."""
        sent = 0
        for layer in range(place.stage.layer_start, place.stage.layer_end):
            token_start, k, v = kv[layer]
            target = layer_owner(decoder, layer)
            for chunk in kv_chunks(
                key,
                layer,
                np.ascontiguousarray(k),
                np.ascontiguousarray(v),
                token_start=token_start,
                plan_version=place.version,
                context=ctx,
                sent_at=self.wall_clock,
            ):
                self._send(target, chunk)
                self.counters["kv_chunks_out"] += 1
                sent += chunk.key.nbytes + chunk.value.nbytes
        self.counters["kv_bytes_out"] += sent

    def _after_decode_embed(
        self, place: Placement, msg: Work, hidden: np.ndarray, stalled: float
    ) -> None:
        assert isinstance(msg, m.DecodeStep)
        self._send(
            place.replica.stages[0].device_id,
            m.Activation(
                request_id=msg.request_id,
                attempt=msg.attempt,
                phase="decode",
                hidden=np.ascontiguousarray(hidden, np.float32),
                position_start=msg.position,
                step=msg.step,
                context=msg.context,
                stalled_s=stalled,
                plan_version=place.version,
                seq=msg.step,
            ),
        )

    def _after_decode(
        self,
        place: Placement,
        msg: Work,
        out: np.ndarray,
        waited: float,
        stalled: float,
        now: float,
    ) -> None:
        assert isinstance(msg, m.DecodeStep | m.Activation)
        key = AttemptKey(msg.request_id, msg.attempt)
        st = self.attempts[key]
        st.cached += 1
        st.last_step = msg.step
        st.touched = now
        self.counters["decode_steps"] += 1
        first = msg.step == st.ctx.index0 + 1
        if place.is_last:
            # the first step's wait is all waiting (for the KV, behind others); a later
            # step's, only what it spent behind other prompts' prefill
            if first:
                timings: m.StepTimings | None = m.StepTimings(kv_wait_s=round(waited, 6))
            elif stalled > 0:
                timings = m.StepTimings(decode_stall_s=round(stalled, 6))
            else:
                timings = None
            self._sample(place, key, st, out[0, -1], msg.step, None, timings)
            return
        self._send(
            place.next_device(),
            m.Activation(
                request_id=msg.request_id,
                attempt=msg.attempt,
                phase="decode",
                hidden=np.ascontiguousarray(out, np.float32),
                position_start=_position(msg),
                step=msg.step,
                context=st.ctx if first else None,
                queued_s=waited if first else 0.0,
                stalled_s=0.0 if first else stalled,
                plan_version=place.version,
                seq=msg.step,
            ),
        )

    def _sample(
        self,
        place: Placement,
        key: AttemptKey,
        st: Attempt,
        logits: np.ndarray,
        index: int,
        handoff_to: Replica | None,
        timings: m.StepTimings | None,
    ) -> bool:
        """Sample the next token and send it on; True if it ended the request."""
        ctx = st.ctx
        token = sample(logits, ctx.sampling, index)
        stop = token == ctx.eos_token_id
        finished = stop or index >= ctx.max_new_tokens - 1
        reason: m.FinishReason | None = ("stop" if stop else "length") if finished else None
        self.tokens_done += 1
        out = m.TokenOut(
            request_id=m.RequestId(key.request_id),
            attempt=key.attempt,
            token_id=token,
            index=index,
            finished=finished,
            finish_reason=reason,
            timings=timings,
            plan_version=place.version,
            seq=index,
        )
        decoder = handoff_to or place.replica
        if finished:
            self._emit(Report(out))
            for s in decoder.stages:
                if s.device_id != self.id:
                    self._send(
                        s.device_id,
                        m.Release(
                            request_id=m.RequestId(key.request_id),
                            attempt=key.attempt,
                            reason=reason or "",
                            plan_version=place.version,
                        ),
                    )
            self._free(key)
            return True
        step = index + 1
        # The next step goes first: the token's way to the client is off the critical path.
        self._send(
            embed_device(decoder),
            m.DecodeStep(
                request_id=m.RequestId(key.request_id),
                attempt=key.attempt,
                token_id=token,
                position=ctx.prompt_len + (index - ctx.index0),
                step=step,
                context=ctx if index == ctx.index0 else None,
                plan_version=place.version,
                seq=step,
            ),
        )
        self._emit(Report(out))
        return False

    def _send(
        self, device_id: str, msg: m.Activation | m.KVChunk | m.DecodeStep | m.Release
    ) -> None:
        if device_id == self.id and not isinstance(msg, m.KVChunk | m.Release):
            self.inbox.append(Inbound(msg, self.now))
            return
        if self._gather is not None and isinstance(msg, m.Activation | m.DecodeStep):
            if device_id in self._gather:
                self._gather[device_id][1].append(msg)
                return
            self._gather[device_id] = (len(self._out), [msg])
        self._emit(Send(device_id, msg))

    # ------------------------------------------------------------------ KV receive

    def _kv_chunk(self, msg: m.KVChunk, now: float) -> None:
        place = self._check_plan(msg)
        start, end = place.stage.layer_start, place.stage.layer_end
        if not start <= msg.layer < end:
            raise Failure(
                ErrorCode.MISROUTED,
                f"KV for layer {msg.layer}, device {self.id} holds [{start}, {end})",
            )
        key = AttemptKey(msg.request_id, msg.attempt)
        st = self.attempts.get(key)
        if st is None:
            if msg.context is None:
                return  # a chunk of an attempt already released here (or out of order)
            self._check_context(place, msg.context)
            st = Attempt(ctx=msg.context, touched=now)
            self.attempts[key] = st
        st.touched = now
        self.counters["kv_chunks_in"] += 1
        if msg.layer in st.kv_layers:
            return  # redelivery of a layer already loaded
        if not self.kv.add(msg):
            return
        token_start, k, v = self.kv.take(key, msg.layer)
        self._emit(WriteKV(key, msg.layer, token_start, k, v, st.ctx.capacity))
        st.has_cache = True
        st.kv_layers.add(msg.layer)
        self.counters["kv_bytes_in"] += k.nbytes + v.nbytes
        if len(st.kv_layers) < end - start:
            return
        st.kv_ready = True
        st.cached = st.ctx.prompt_len
        if msg.sent_at:
            self.counters["last_kv_handoff_s"] = round(self.wall_clock - msg.sent_at, 6)
        waiting, st.waiting = st.waiting, []
        # what the handoff cost the request: how long its first step waited for the KV
        self.counters["last_kv_wait_s"] = (
            round(now - min(t for _, t in waiting), 6) if waiting else 0.0
        )
        for w, since in reversed(waiting):
            self.inbox.appendleft(Inbound(w, since))

    # ------------------------------------------------------------------ time

    def tick(self, now: float) -> list[Command]:
        """Stuck detection, idle attempts, KV that never came."""
        self.now = now
        if (
            self.status == DeviceStatus.READY
            and self.inbox
            and now - self.beat > self.cfg.stage_timeout
        ):
            self._set_status(
                DeviceStatus.STUCK,
                f"stuck: {len(self.inbox)} message(s) waiting, nothing done for "
                f"{now - self.beat:.0f} s",
            )
            self._emit(Log("warning", "stuck", f"{self.id}: {self.last_error}"))
        elif self.status == DeviceStatus.STUCK and now - self.beat <= self.cfg.stage_timeout:
            self._emit(Log("warning", "moving", f"{self.id}: moving again"))
            self._set_status(DeviceStatus.READY if self.placement else DeviceStatus.ONLINE)
        for key, st in list(self.attempts.items()):
            if now - st.touched > self.cfg.request_timeout:
                self.counters["timed_out"] += 1
                self._emit(Log("info", "idle", f"{self.id}: freeing idle {key}"))
                self._free(key)
                continue
            if st.waiting and now - min(t for _, t in st.waiting) > self.cfg.kv_wait_timeout:
                self._fail(
                    key,
                    ErrorCode.KV_TIMEOUT,
                    f"KV cache for {key} incomplete after {self.cfg.kv_wait_timeout:.0f} s",
                )
        return self._take()

    def worker_progressed(self, now: float) -> list[Command]:
        """The engine finished something (stuck detection sees progress)."""
        self.beat = now
        if self.status == DeviceStatus.STUCK:
            self._set_status(DeviceStatus.READY if self.placement else DeviceStatus.ONLINE)
        return self._take()

    # ------------------------------------------------------------------ reporting

    def state(self, tokens_per_s: float, mem_bytes: int, ts: float) -> m.DeviceState:
        p = self.placement
        return m.DeviceState(
            device_id=m.DeviceId(self.id),
            status=self.status,
            plan_version=p.version if p else 0,
            role=p.replica.role if p else None,
            replica_id=p.replica.replica_id if p else None,
            layers=(p.stage.layer_start, p.stage.layer_end) if p else None,
            queue_depth=len(self.inbox),
            in_flight=len(self.attempts),
            tokens_per_s=tokens_per_s,
            mem_bytes=mem_bytes,
            last_error=self.last_error,
            ts=ts,
        )

    def telemetry(self, mem_bytes: int) -> m.DeviceCounters:
        c = self.counters
        return m.DeviceCounters(
            status=self.status,
            requests=len(self.attempts),
            queue_depth=len(self.inbox),
            prefills=int(c["prefills"]),
            decode_steps=int(c["decode_steps"]),
            decode_batches=int(c["decode_batches"]),
            kv_chunks_in=int(c["kv_chunks_in"]),
            kv_chunks_out=int(c["kv_chunks_out"]),
            kv_bytes_in=int(c["kv_bytes_in"]),
            kv_bytes_out=int(c["kv_bytes_out"]),
            kv_pending_bytes=self.kv.pending_bytes(),
            last_kv_send_s=float(c["last_kv_send_s"]),
            last_kv_handoff_s=float(c["last_kv_handoff_s"]),
            last_kv_wait_s=float(c["last_kv_wait_s"]),
            errors=int(c["errors"]),
            rejected=int(c["rejected"]),
            released=int(c["released"]),
            timed_out=int(c["timed_out"]),
            loads=int(c["loads"]),
            mem_bytes=mem_bytes,
        )


def _is_decode(msg: Work) -> bool:
    return isinstance(msg, m.DecodeStep) or (
        isinstance(msg, m.Activation) and msg.phase == "decode"
    )


def _position(msg: m.DecodeStep | m.Activation) -> int:
    return msg.position if isinstance(msg, m.DecodeStep) else msg.position_start


def _key(msg: Work) -> AttemptKey | None:
    attempt = getattr(msg, "attempt", None)
    return AttemptKey(msg.request_id, attempt) if attempt is not None else None
