"""One routing policy, pure, for the runtime orchestrator and the simulator alike.

What is simulated is what runs: the simulator drives a `Router` exactly as the
orchestrator does, at the events the orchestrator sees (a request arrives, a prefill's
first token arrives, a request's KV reaches its decoder, a request finishes, a wake-up
the router asked for), with only what the orchestrator knows (what it dispatched and has
not seen finish, prompt lengths, the limit on new tokens, the plan's predicted timings).

The policy, and why:

- **One FIFO queue at the orchestrator, late binding.** A request is sent to a prefill
  replica only when that replica can start it (not queued at a replica), so a replica
  that frees early takes the next request and a request never waits behind a slow
  replica it was bound to too soon.
- **Prefill choice** by `policy`: ``time`` (the default; shortest expected delay) sends
  each request to the replica predicted to *finish* it first, counting the prompts
  already in its pipeline stage by stage, and dispatches it when it can flow through
  without waiting between stages; if the best replica is busy the request waits for it
  (a wake-up time is given) rather than taking a free but slower one, while later
  requests may take replicas it did not want (they are reserved in FIFO order, up to
  `LOOKAHEAD` requests). ``tokens`` (splitwise-sim's token JSQ) and ``count``
  (Splitwise's JSQ) send the head of the queue to the replica with room and the fewest
  outstanding prompt tokens / requests; room is one prompt per pipeline stage.
- **Decoder bound after prefill.** When the first token arrives the request takes a
  DECODER slot (at most `concurrency` requests per decoder) whose KV fits; until then its
  KV stays on the prefill replica (counted against that replica's memory, so a prefill
  replica whose held KV is full takes no new prompt). Binding late costs one more message
  (~1 ms) but never holds a decoder slot idle during a prefill. Decoders are chosen by
  predicted decode time with one more request (``time``), fewest requests (``count``)
  or fewest reserved KV tokens (``tokens``); waiting requests bind in FIFO order.
- **Prefill runs ahead of the decoders by a bounded margin**: a prompt is dispatched
  only while the requests prefilling or prefilled-but-unbound are fewer than the free
  decoder slots, plus `RUN_AHEAD` per decoder, plus what the prefill pipelines hold.
  Without a bound, saturated decoders would let prompts be prefilled long before a slot
  frees: the first token would come early and the second minutes later (a good-looking
  TTFT, a meaningless TBT). With it, a request waits for a decoder before its prefill,
  where the wait belongs, while every prefill pipeline can stay full and every decoder
  finds a prefilled request ready when a slot frees.
- **Mixed replicas** (prefill and decode on one replica) take a request when a decode
  slot is free and no prompt is being prefilled; the request decodes where it was
  prefilled. They also take prefilled requests from PREFILL replicas, like decoders.
- **KV memory.** Every request reserves prompt + `max_new_tokens` KV tokens on its
  decoder (prompt tokens on its prefill replica while it is there); a replica admits
  while its reservations fit `Timing.kv_budget_tokens`. A request that fits no replica
  even when empty is rejected at once with the reason.
- **Deterministic.** Ties go to the lower replica id; queues are FIFO; no clock (every
  method takes `now`), no randomness.

**Binding mode** (`bind`): ``ready`` (the default, above) binds the decoder when the
first token is seen, so the prefill devices must hold the KV until told where it goes;
``dispatch`` binds it when the prompt is dispatched (the same decoder choice, made for a
request about to be prefilled; a prompt waits in the queue until a decoder slot and its
KV fit), so the prefill devices hand the KV over as soon as each stage is done. The
runtime orchestrator runs ``dispatch`` (its devices hand the KV over at once; holding it
for a later bind is a protocol step they do not have yet); the simulator runs either.

Role flips without reload: `reconfigure(plan)` takes a plan with the same replicas and
layouts but other roles or concurrency; a replica whose role changes stops taking work
in its old role and takes the new one once its old work is gone (`take_flipped`).

Usage (the orchestrator's or the simulator's loop)::

    router = Router(plan, policy="time")
    router.arrive(rid, prompt_tokens, max_new_tokens, now)
    for d in router.decide(now):        # Dispatch, Bind or Reject; state already updated
        ...send it...
    router.prefill_done(rid, now)       # first token seen
    router.kv_moved(rid, now)           # the decoder has the KV; the prefill replica frees it
    router.finish(rid, now)             # done, failed or cancelled
    router.next_wakeup()                # call decide() again then, if nothing else happens
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from planner.plan import Plan, Replica, Role, Timing

Policy = Literal["time", "tokens", "count"]
POLICIES: tuple[Policy, ...] = ("time", "tokens", "count")
Binding = Literal["ready", "dispatch"]
BINDINGS: tuple[Binding, ...] = ("ready", "dispatch")
LOOKAHEAD = 64
"""Queued requests the ``time`` policy reserves replicas for, in FIFO order, per decision."""
RUN_AHEAD = 1
"""Prefilled requests allowed to wait per decoder beyond its free slots."""
BUFFER = 2
"""A prompt enters a prefill pipeline when its first stage is (predicted) free and fewer
than BUFFER prompts per stage are in the pipeline: the bottleneck stage always has work
queued before it even when prompt lengths vary (a short prompt behind a long one), and
requests otherwise stay in the orchestrator's queue, free to go elsewhere."""
_EPS = 1e-9
_FULL = 1e-6
"""Entry delay marking a pipeline that is full now (its next first token frees it)."""


@dataclass(frozen=True)
class Dispatch:
    """Send this request's prompt to the replica's first stage now (a mixed replica also
    decodes it)."""

    request_id: str
    replica_id: int
    decoder: int | None = None
    """The decoder bound at dispatch (``bind="dispatch"``; a mixed replica's own id), or
    None: bound later by a `Bind`."""


@dataclass(frozen=True)
class Bind:
    """Move this prefilled request's KV to the decoder replica now."""

    request_id: str
    replica_id: int


@dataclass(frozen=True)
class Reject:
    """No replica can ever hold this request (its KV exceeds every replica's memory)."""

    request_id: str
    reason: str


Decision = Dispatch | Bind | Reject


class Phase(enum.Enum):
    """Where a request is, as the router sees it."""

    QUEUED = "queued"
    PREFILLING = "prefilling"
    READY = "ready"
    """Prefilled; KV held on the prefill replica; waiting for a decoder slot."""
    MOVING = "moving"
    """Bound to a decoder; KV in flight."""
    DECODING = "decoding"


def timing_of(replica: Replica, plan: Plan) -> Timing:
    """The replica's predicted timings; derived from its stages when the plan has none
    (prefill time proportional to prompt length, unbounded KV)."""
    if replica.timing is not None:
        return replica.timing
    p = plan.figure("mean_prompt_tokens", 256.0)
    base = tuple(s.predicted_prefill_s for s in replica.stages)
    grid = (max(1, round(p)), max(2, 2 * round(p)))
    dec = [s.predicted_decode_s for s in replica.stages]
    cycle = max(sum(dec), min(len(dec), replica.concurrency) * max(dec))
    return Timing(
        prefill_tokens=grid,
        prefill_stage_s=(base, tuple(2.0 * x for x in base)),
        decode_cycle_s=(cycle,) * replica.concurrency,
        kv_budget_tokens=float("inf"),
    )


@dataclass
class _Request:
    rid: str
    prompt: int
    max_new: int
    phase: Phase = Phase.QUEUED
    prefill: int | None = None
    decoder: int | None = None

    @property
    def reserve(self) -> int:
        """KV tokens it may reach on a decoder."""
        return self.prompt + max(self.max_new, 1)


@dataclass
class ReplicaState:
    """What the router has sent to one replica and not yet seen leave."""

    replica_id: int
    role: Role
    concurrency: int
    timing: Timing
    n_stages: int
    next_role: Role | None = None
    """Role it takes once its current work is gone (a flip in progress)."""
    next_concurrency: int = 0
    next_timing: Timing | None = None
    excluded: bool = False
    """Lost a device: takes nothing new."""
    prefilling: dict[str, float] = field(default_factory=dict)
    """Prompts in its pipeline: request -> KV tokens reserved (prompt + workspace beyond
    the planned pass)."""
    held: dict[str, int] = field(default_factory=dict)
    """Prefilled requests whose KV is still here: request -> tokens."""
    decoding: dict[str, int] = field(default_factory=dict)
    """Requests bound to its decode slots: request -> reserved KV tokens."""
    stage_free: list[float] = field(default_factory=list)
    """Predicted time each stage finishes the prompts sent to it."""
    prefill_end: dict[str, float] = field(default_factory=dict)
    """Predicted time each prompt in its pipeline leaves it."""

    @property
    def kv_used(self) -> float:
        """KV tokens reserved on it now."""
        return sum(self.prefilling.values()) + sum(self.held.values()) + sum(self.decoding.values())

    @property
    def busy(self) -> bool:
        """It still has work of its current role."""
        return bool(self.prefilling or self.held or self.decoding)

    @property
    def open(self) -> bool:
        """It takes new work (not lost, not draining for a flip)."""
        return not self.excluded and self.next_role is None

    def takes_prompts(self) -> bool:
        return self.open and self.role in ("prefill", "mixed")

    def takes_decodes(self) -> bool:
        return self.open and self.role in ("decoder", "mixed")


class Router:
    """Routing state and decisions for one plan (see the module docstring)."""

    def __init__(
        self,
        plan: Plan,
        policy: Policy = "time",
        *,
        mean_output_tokens: float | None = None,
        bind: Binding = "ready",
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r} (expected one of {POLICIES})")
        if bind not in BINDINGS:
            raise ValueError(f"unknown binding {bind!r} (expected one of {BINDINGS})")
        self.policy: Policy = policy
        self.bind: Binding = bind
        self.mean_output_tokens = float(
            mean_output_tokens or plan.figure("mean_output_tokens", 128.0)
        )
        self.replicas: dict[int, ReplicaState] = {}
        for r in sorted(plan.replicas, key=lambda r: r.replica_id):
            self.replicas[r.replica_id] = ReplicaState(
                r.replica_id,
                r.role,
                r.concurrency,
                timing_of(r, plan),
                len(r.stages),
                stage_free=[0.0] * len(r.stages),
            )
        self.requests: dict[str, _Request] = {}
        self.queue: deque[str] = deque()
        self.ready: deque[str] = deque()
        self._wake: float | None = None
        self._flipped: list[int] = []
        self._stages_cache: dict[tuple[int, int], list[float]] = {}

    # ---- events --------------------------------------------------------------------

    def arrive(self, rid: str, prompt_tokens: int, max_new_tokens: int, now: float) -> None:
        """A request joins the back of the queue."""
        if rid in self.requests:
            raise ValueError(f"request {rid!r} is already routed")
        self.requests[rid] = _Request(rid, int(prompt_tokens), int(max_new_tokens))
        self.queue.append(rid)

    def restart(self, rid: str, prompt_tokens: int, max_new_tokens: int, now: float) -> None:
        """A request starts over (its replica was lost): it leaves wherever it was and
        joins the *front* of the queue with its new prompt (prompt + tokens so far)."""
        self.finish(rid, now)
        self.requests[rid] = _Request(rid, int(prompt_tokens), int(max_new_tokens))
        self.queue.appendleft(rid)

    def start_prefill(
        self, rid: str, replica_id: int, now: float, decoder: int | None = None
    ) -> None:
        """Its prompt was sent to `replica_id` (a mixed replica binds its decode slot too;
        so does `decoder`, bound at dispatch)."""
        req = self.requests[rid]
        rep = self.replicas[replica_id]
        self._remove_from_queues(rid)
        req.phase, req.prefill = Phase.PREFILLING, replica_id
        rep.prefilling[rid] = rep.timing.prefill_need(req.prompt)
        if rep.role == "mixed":
            req.decoder = replica_id
            rep.decoding[rid] = req.reserve - req.prompt
        elif decoder is not None:
            req.decoder = decoder
            self.replicas[decoder].decoding[rid] = req.reserve
        t = now
        for i, s in enumerate(self._stages(rep, req.prompt)):
            t = max(t, rep.stage_free[i]) + s
            rep.stage_free[i] = t
        rep.prefill_end[rid] = t

    def prefill_done(self, rid: str, now: float) -> None:
        """Its first token arrived: its KV is held where it was prefilled until a decoder
        takes it (a mixed replica decodes it in place)."""
        req = self.requests[rid]
        assert req.prefill is not None, f"request {rid!r} was not prefilling"
        rep = self.replicas[req.prefill]
        rep.prefilling.pop(rid, None)
        tokens = req.prompt
        rep.prefill_end.pop(rid, None)
        rep.stage_free[-1] = max(rep.stage_free[-1], now)
        if not rep.prefilling:
            # the pipeline is empty, whatever was predicted: devices faster than their
            # profile must not sit idle until the predicted time
            rep.stage_free = [min(f, now) for f in rep.stage_free[:-1]] + [now]
        if req.decoder == req.prefill:
            rep.decoding[rid] += tokens
            req.phase = Phase.DECODING
        elif req.decoder is not None:
            # bound at dispatch: the stages hand the KV over now; it occupies this
            # replica's memory until the decoder has it (`kv_moved`)
            rep.held[rid] = tokens
            req.phase = Phase.MOVING
        else:
            rep.held[rid] = tokens
            req.phase = Phase.READY
            if req.max_new > 1:
                self.ready.append(rid)
        self._settle(rep)

    def bind_decoder(self, rid: str, replica_id: int, now: float) -> None:
        """Its KV starts moving to decoder `replica_id` (a slot is now taken); when that
        is the replica holding the KV (it flipped to DECODER) nothing moves, and the
        caller reports `kv_moved` at once."""
        req = self.requests[rid]
        if rid in self.ready:
            self.ready.remove(rid)
        req.phase, req.decoder = Phase.MOVING, replica_id
        rep = self.replicas[replica_id]
        if req.prefill == replica_id:
            rep.held.pop(rid, None)
        rep.decoding[rid] = req.reserve

    def kv_moved(self, rid: str, now: float) -> None:
        """The decoder has its KV: the prefill replica frees it; decoding starts."""
        req = self.requests[rid]
        if req.prefill is not None:
            rep = self.replicas[req.prefill]
            rep.held.pop(rid, None)
            self._settle(rep)
        req.phase = Phase.DECODING

    def finish(self, rid: str, now: float) -> None:
        """It is done (answered, failed or cancelled): everything it held is freed."""
        req = self.requests.pop(rid, None)
        if req is None:
            return
        self._remove_from_queues(rid)
        for rep_id in {req.prefill, req.decoder} - {None}:
            assert rep_id is not None
            rep = self.replicas[rep_id]
            rep.prefilling.pop(rid, None)
            rep.prefill_end.pop(rid, None)
            rep.held.pop(rid, None)
            rep.decoding.pop(rid, None)
            self._settle(rep)

    def exclude(self, replica_ids: Iterable[int]) -> None:
        """These replicas lost a device: nothing new goes to them."""
        for i in replica_ids:
            self.replicas[i].excluded = True

    def reconfigure(self, plan: Plan) -> None:
        """Take new roles / concurrency for the same replicas and layouts (no reload).

        A replica whose role changes drains its old work first (see `take_flipped`); a
        new concurrency or timing on an unchanged role applies at once.
        """
        for r in plan.replicas:
            rep = self.replicas.get(r.replica_id)
            if rep is None or len(r.stages) != rep.n_stages:
                raise ValueError(
                    f"replica {r.replica_id}: reconfigure keeps layouts; plan a re-layout instead"
                )
            timing = timing_of(r, plan)
            if r.role == rep.role and rep.next_role is None:
                rep.concurrency, rep.timing = r.concurrency, timing
                continue
            rep.next_role, rep.next_concurrency, rep.next_timing = r.role, r.concurrency, timing
            self._settle(rep)
        self._stages_cache.clear()
        self.mean_output_tokens = plan.figure("mean_output_tokens", self.mean_output_tokens)

    def take_flipped(self) -> list[int]:
        """Replicas that finished draining and now serve in their new role (once each)."""
        out, self._flipped = self._flipped, []
        return out

    # ---- decisions -----------------------------------------------------------------

    def decide(self, now: float) -> list[Decision]:
        """Every decision possible now, applied to the state: binds first (they free
        prefill memory), then dispatches; rejected requests are dropped."""
        out: list[Decision] = []
        while (b := self.choose_decoder(now)) is not None:
            if isinstance(b, Reject):
                self.finish(b.request_id, now)
            else:
                self.bind_decoder(b.request_id, b.replica_id, now)
            out.append(b)
        while (d := self.choose_prefill(now)) is not None:
            if isinstance(d, Reject):
                self.finish(d.request_id, now)
            else:
                if self.bind == "dispatch":
                    if self.replicas[d.replica_id].role == "mixed":
                        dec_id = d.replica_id
                    else:
                        dec = self._pick_decoder(self.requests[d.request_id])
                        if dec is None:
                            self._wake = None  # a decoder slot frees on a finish (an event)
                            break
                        dec_id = dec.replica_id
                    d = Dispatch(d.request_id, d.replica_id, dec_id)
                self.start_prefill(d.request_id, d.replica_id, now, d.decoder)
            out.append(d)
        return out

    def next_wakeup(self) -> float | None:
        """When a request waiting for a busy replica (``time`` policy) can be dispatched,
        if no other event comes first."""
        return self._wake

    def choose_prefill(self, now: float) -> Dispatch | Reject | None:
        """The next prompt to send and where, or None (wait for an event or the wake-up)."""
        self._wake = None
        if not self.queue:
            return None
        prompts = [r for r in self.replicas.values() if r.takes_prompts()]
        head = self.requests[self.queue[0]]
        reason = self._never_fits(head, prompts)
        if reason:
            return Reject(head.rid, reason)
        allowance = self._allowance()
        if self.policy == "time":
            return self._choose_by_time(now, prompts, allowance)
        avail = []
        wake = float("inf")
        for r in prompts:
            if r.kv_used + self._need(r, head) > r.timing.kv_budget_tokens:
                continue
            if r.role == "mixed":
                if not r.prefilling and len(r.decoding) < r.concurrency:
                    avail.append(r)
                continue
            if allowance <= 0 or len(r.prefilling) >= BUFFER * r.n_stages:
                continue
            start, _ = self._entry(r.stage_free, self._stages(r, head.prompt), now)
            if start <= now + _EPS:
                avail.append(r)
            else:
                wake = min(wake, start)
        if not avail:
            self._wake = wake if wake < float("inf") else None
            return None
        if self.policy == "count":
            best = min(avail, key=lambda r: (len(r.prefilling) + len(r.decoding), r.replica_id))
        else:
            best = min(
                avail,
                key=lambda r: (sum(r.prefilling.values()) + len(r.decoding), r.replica_id),
            )
        return Dispatch(head.rid, best.replica_id)

    def choose_decoder(self, now: float) -> Bind | Reject | None:
        """The next prefilled request to bind and its decoder, or None; Reject when no
        decoder could ever hold it (a plan switch left it nowhere to go)."""
        if not self.ready:
            return None
        req = self.requests[self.ready[0]]
        decoders = [r for r in self.replicas.values() if not r.excluded]
        if not any(
            (r.next_role or r.role) in ("decoder", "mixed")
            and req.reserve <= r.timing.kv_budget_tokens
            for r in decoders
        ):
            largest = max(
                (r.timing.kv_budget_tokens for r in decoders if r.role != "prefill"), default=0.0
            )
            return Reject(
                req.rid,
                f"prefilled request needs {req.reserve} KV tokens; no decoder of this plan "
                f"holds more than {largest:.0f}",
            )
        best = self._pick_decoder(req)
        return None if best is None else Bind(req.rid, best.replica_id)

    def _pick_decoder(self, req: _Request) -> ReplicaState | None:
        """The decoder for `req` by the policy, among those with a free slot and room for
        its KV (None: wait for one to free)."""
        avail = [
            r
            for r in self.replicas.values()
            if r.takes_decodes()
            and len(r.decoding) < r.concurrency
            and r.kv_used + req.reserve - (r.held.get(req.rid, 0)) <= r.timing.kv_budget_tokens
        ]
        if not avail:
            return None
        if self.policy == "time":
            return min(avail, key=lambda r: (self._decode_s(r, req), r.replica_id))
        if self.policy == "count":
            return min(avail, key=lambda r: (len(r.decoding), r.replica_id))
        return min(avail, key=lambda r: (sum(r.decoding.values()), r.replica_id))

    # ---- state views ---------------------------------------------------------------

    @property
    def queued(self) -> int:
        """Requests not yet sent to a prefill replica."""
        return len(self.queue)

    @property
    def in_flight(self) -> int:
        """Requests sent and not finished."""
        return len(self.requests) - len(self.queue)

    def phase(self, rid: str) -> Phase:
        """Where a request is."""
        return self.requests[rid].phase

    # ---- internals -----------------------------------------------------------------

    def _remove_from_queues(self, rid: str) -> None:
        for q in (self.queue, self.ready):
            if rid in q:
                q.remove(rid)

    def _settle(self, rep: ReplicaState) -> None:
        """Apply a pending flip once the replica's old work is gone. Prefilled KV held on
        a PREFILL replica does not hold it back: those requests may then be decoded in
        place (or move as before), so a flip never waits for itself."""
        if rep.next_role is None or rep.prefilling or rep.decoding:
            return
        rep.role, rep.concurrency = rep.next_role, rep.next_concurrency
        rep.timing = rep.next_timing or rep.timing
        rep.next_role, rep.next_timing = None, None
        rep.stage_free = [0.0] * rep.n_stages
        self._flipped.append(rep.replica_id)

    def _allowance(self) -> int:
        """Prompts that may still go to PREFILL replicas now (see RUN_AHEAD)."""
        decoders = [r for r in self.replicas.values() if r.takes_decodes()]
        if not decoders:
            return 1 << 30
        free = sum(max(0, r.concurrency - len(r.decoding)) for r in decoders)
        prefills = [r for r in self.replicas.values() if r.role == "prefill"]
        pending = len(self.ready) + sum(len(r.prefilling) for r in prefills)
        depth = sum(BUFFER * r.n_stages for r in prefills if r.open)
        return free + RUN_AHEAD * len(decoders) + depth - pending

    def _need(self, rep: ReplicaState, req: _Request) -> float:
        """KV tokens it reserves on a replica that prefills it (longer prompts than the
        plan sized the workspace for reserve the extra workspace too)."""
        extra = rep.timing.prefill_need(req.prompt) - req.prompt
        return extra + (req.reserve if rep.role == "mixed" else req.prompt)

    def _never_fits(self, req: _Request, prompts: Sequence[ReplicaState]) -> str:
        if not prompts:
            return ""
        if not any(self._need(r, req) <= r.timing.kv_budget_tokens for r in prompts):
            best = max(r.timing.kv_budget_tokens for r in prompts)
            return (
                f"prompt of {req.prompt} tokens needs more KV memory than any prefill replica "
                f"holds (at most {best:.0f} tokens)"
            )
        if any(r.role == "mixed" for r in prompts):
            return ""
        decoders = [r for r in self.replicas.values() if r.role == "decoder" and not r.excluded]
        if decoders and not any(req.reserve <= r.timing.kv_budget_tokens for r in decoders):
            best = max(r.timing.kv_budget_tokens for r in decoders)
            return (
                f"prompt + max_new_tokens = {req.reserve} tokens exceeds the KV memory of "
                f"every decoder (at most {best:.0f} tokens)"
            )
        return ""

    @staticmethod
    def _entry(free: Sequence[float], stages: Sequence[float], now: float) -> tuple[float, float]:
        """(earliest time the prompt may enter, when it would finish if it entered then):
        it enters when the first stage is free and finishes when its own pass and the
        prompts ahead of it at every stage allow (flow shop)."""
        start = max(now, free[0])
        t = start
        for f, s in zip(free, stages, strict=True):
            t = max(t, f) + s
        return start, t

    def _decode_s(self, rep: ReplicaState, req: _Request) -> float:
        """Predicted time to decode it there: its KV's move (none if already there) and
        its tokens at the decoder's load with it."""
        tokens = max(min(float(req.max_new), self.mean_output_tokens) - 1.0, 0.0)
        move = 0.0
        if req.prefill is not None and req.prefill != rep.replica_id:
            move = req.prompt * self.replicas[req.prefill].timing.kv_out_s_per_token
        return move + tokens * rep.timing.cycle_s(len(rep.decoding) + 1)

    def _stages(self, rep: ReplicaState, tokens: int) -> list[float]:
        key = (rep.replica_id, tokens)
        if key not in self._stages_cache:
            if len(self._stages_cache) > 65536:
                self._stages_cache.clear()
            self._stages_cache[key] = rep.timing.prefill_stages(tokens)
        return self._stages_cache[key]

    def _choose_by_time(
        self, now: float, prompts: Sequence[ReplicaState], allowance: int
    ) -> Dispatch | None:
        """Shortest expected delay with FIFO reservations (see the module docstring).

        The scan stops once no replica could start anything now: every one is reserved
        for a later start, busy (mixed), or beyond the run-ahead allowance.
        """
        free = {r.replica_id: list(r.stage_free) for r in prompts}
        kv = {r.replica_id: r.kv_used for r in prompts}
        ends = {r.replica_id: sorted(r.prefill_end.values()) for r in prompts}
        blocked = {
            r.replica_id
            for r in prompts
            if r.role == "mixed" and (r.prefilling or len(r.decoding) >= r.concurrency)
        }
        taken: set[int] = set()
        wake = float("inf")
        for rid in itertools.islice(self.queue, LOOKAHEAD):
            if allowance <= 0:
                blocked |= {r.replica_id for r in prompts if r.role != "mixed"}
            if len(taken | blocked) == len(prompts):
                break
            req = self.requests[rid]
            best: tuple[float, int, float, list[float], bool] | None = None
            for r in prompts:
                i = r.replica_id
                if i in blocked or kv[i] + self._need(r, req) > r.timing.kv_budget_tokens:
                    continue
                stages = self._stages(r, req.prompt)
                full = False
                if r.role == "mixed":
                    start = now
                    done = start + sum(stages) + self._decode_s(r, req)
                else:
                    start, done = self._entry(free[i], stages, now)
                    cap = BUFFER * r.n_stages
                    if len(ends[i]) >= cap:
                        # full: it enters once enough prompts inside have left (predicted;
                        # never before the first token that frees the place is seen)
                        start = max(start, ends[i][len(ends[i]) - cap], now + _FULL)
                        done = max(done, start + sum(stages))
                        full = True
                if best is None or (done, i) < (best[0], best[1]):
                    best = (done, i, start, stages, full)
            if best is None:
                break  # the head of the line waits for memory: FIFO, nobody overtakes it
            _, i, start, stages, full = best
            if start <= now + _EPS:
                return Dispatch(rid, i)
            if not full:
                wake = min(wake, start)
            allowance -= 1
            t = start
            for j, s in enumerate(stages):
                t = max(t, free[i][j]) + s
                free[i][j] = t
            bisect.insort(ends[i], t)
            kv[i] += self._need(self.replicas[i], req)
            taken.add(i)
        self._wake = wake if wake < float("inf") else None
        return None
