"""Standard serving metrics from per-request timestamps: one record, one summary.

A `RequestRecord` holds what can be observed of one request: times on one clock (the
orchestrator's, or the simulator's) plus durations that any device can measure on its
own clock (so no clock synchronisation is needed). The simulator fills records now;
the runtime fills the same records from real timestamps, and `summarize` turns either
into the same figures, so measured and simulated runs are compared by one piece of code.

Definitions (the standard ones):

- TTFT = first token - arrival.
- TBT (time between tokens, per request) = (finish - first token) / (output tokens - 1),
  what a client sees between consecutive tokens, KV hand-off included.
- end-to-end = finish - arrival.
- waiting = every moment the request is not being served: before its prefill starts,
  between pipeline stages, waiting for its KV to reach a decoder, waiting for a decoder
  slot, and stalls inside a running batch (a mixed replica prefilling someone else).
  Being served means a device computes for it (a prefill stage, the hop into that stage
  included) or it sits in a decoder batch that is stepping. So
  `waiting = TTFT - prefill_service + (decode_start - first_token) + decode_stall`, and
  `end-to-end = waiting + prefill_service + decode_service`: the definitions compose.
- throughput = completed requests (and generated tokens) per second from the first
  arrival to the last finish; goodput = completed requests meeting both the TTFT and
  the TBT objective, per second of the same span.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Status = Literal["queued", "running", "done", "failed", "rejected"]
NAN = float("nan")


@dataclass
class RequestRecord:
    """What was observed of one request (seconds; NaN = not reached)."""

    request_id: str
    """The request's id."""
    arrival_s: float
    """When the orchestrator received it."""
    prompt_tokens: int
    """Prompt length."""
    prefill_start_s: float = NAN
    """When its prompt was sent to the first stage of a prefill (or mixed) replica."""
    prefill_service_s: float = 0.0
    """Device time spent on its prompt: the sum over stages of compute plus the hop into
    the stage (durations, measured by each device on its own clock)."""
    first_token_s: float = NAN
    """When its first token reached the orchestrator."""
    decode_start_s: float = NAN
    """When its KV was on a decoder and it joined a stepping batch (mixed replica: the
    first token, as nothing moves)."""
    decode_stall_s: float = 0.0
    """Time it sat in a batch that was not stepping for it (a mixed replica prefilling
    another prompt)."""
    finish_s: float = NAN
    """When its last token reached the orchestrator."""
    output_tokens: int = 0
    """Tokens generated (the first comes from the prefill)."""
    status: Status = "queued"
    """Where it ended: done, failed (a fault), rejected (no replica can ever hold it)."""
    prefill_replica: int | None = None
    """Replica that prefilled it (last attempt)."""
    decoder_replica: int | None = None
    """Replica that decoded it."""

    @property
    def ttft_s(self) -> float:
        """Time to first token."""
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        """Arrival to last token."""
        return self.finish_s - self.arrival_s

    @property
    def tbt_s(self) -> float:
        """Mean time between tokens after the first (NaN for a single-token answer)."""
        if self.output_tokens < 2:
            return NAN
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1)

    @property
    def wait_before_prefill_s(self) -> float:
        """Queued before its prompt reached a prefill replica."""
        return self.prefill_start_s - self.arrival_s

    @property
    def wait_between_stages_s(self) -> float:
        """Queued inside the prefill pipeline (between stages)."""
        return self.first_token_s - self.prefill_start_s - self.prefill_service_s

    @property
    def wait_for_decoder_s(self) -> float:
        """First token to decoding: waiting for a decoder slot and for its KV to arrive."""
        if self.output_tokens < 2 or math.isnan(self.decode_start_s):
            return 0.0
        return self.decode_start_s - self.first_token_s

    @property
    def waiting_s(self) -> float:
        """All the time it was not being served (see the module docstring)."""
        return self.ttft_s - self.prefill_service_s + self.wait_for_decoder_s + self.decode_stall_s

    @property
    def decode_service_s(self) -> float:
        """Time it was in a stepping decoder batch."""
        if self.output_tokens < 2:
            return 0.0
        return self.finish_s - self.decode_start_s - self.decode_stall_s


@dataclass(frozen=True)
class Stats:
    """Mean and percentiles of one metric over the completed requests."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Stats:
        """Stats of the finite values (all NaN when there are none)."""
        a = np.array([v for v in values if math.isfinite(v)], dtype=float)
        if a.size == 0:
            return cls(NAN, NAN, NAN, NAN)
        p50, p90, p99 = np.percentile(a, [50, 90, 99])
        return cls(float(a.mean()), float(p50), float(p90), float(p99))


@dataclass(frozen=True)
class SLO:
    """Service-level objective a request must meet to count towards goodput."""

    ttft_s: float = 10.0
    """Largest acceptable time to first token."""
    tbt_s: float = 1.0 / 15.0
    """Largest acceptable mean time between tokens (default: the 15 tokens/s floor)."""


@dataclass(frozen=True)
class Summary:
    """The standard figures of one run."""

    n_arrived: int
    """Requests that arrived."""
    n_completed: int
    """Requests that finished with an answer."""
    n_rejected: int
    """Requests no replica could ever hold (too long for every replica's memory)."""
    n_failed: int
    """Requests that ended with an error."""
    waiting: Stats
    """Time not being served."""
    ttft: Stats
    """Time to first token."""
    tbt: Stats
    """Time between tokens (requests with at least two tokens)."""
    e2e: Stats
    """Arrival to last token."""
    wait_parts: dict[str, float] = field(default_factory=dict)
    """Mean waiting by where it happened: before_prefill, between_stages, for_decoder,
    stalled."""
    throughput_rps: float = 0.0
    """Completed requests per second of makespan."""
    throughput_tokens_per_s: float = 0.0
    """Generated tokens per second of makespan."""
    goodput_rps: float = 0.0
    """Completed requests meeting the SLO, per second of makespan."""
    slo_attainment: float = 0.0
    """Fraction of arrived requests that completed within the SLO."""
    makespan_s: float = 0.0
    """First arrival to last finish."""
    slo: SLO = SLO()
    """The objective goodput was measured against."""

    @property
    def unfinished(self) -> int:
        """Arrivals that did not finish, fail or get rejected (a horizon cut the run)."""
        return self.n_arrived - self.n_completed - self.n_rejected - self.n_failed


def summarize(records: Sequence[RequestRecord], slo: SLO | None = None) -> Summary:
    """The standard figures over `records` (only completed requests enter the stats)."""
    slo = slo or SLO()
    done = [r for r in records if r.status == "done"]
    if records:
        t0 = min(r.arrival_s for r in records)
        t_end = max((r.finish_s for r in done), default=t0)
    else:
        t0 = t_end = 0.0
    makespan = t_end - t0
    per_s = 1.0 / makespan if makespan > 0 else 0.0
    good = [
        r for r in done if r.ttft_s <= slo.ttft_s and (r.output_tokens < 2 or r.tbt_s <= slo.tbt_s)
    ]
    parts = {
        "before_prefill": Stats.of(r.wait_before_prefill_s for r in done).mean,
        "between_stages": Stats.of(r.wait_between_stages_s for r in done).mean,
        "for_decoder": Stats.of(r.wait_for_decoder_s for r in done).mean,
        "stalled": Stats.of(r.decode_stall_s for r in done).mean,
    }
    return Summary(
        n_arrived=len(records),
        n_completed=len(done),
        n_rejected=sum(r.status == "rejected" for r in records),
        n_failed=sum(r.status == "failed" for r in records),
        waiting=Stats.of(r.waiting_s for r in done),
        ttft=Stats.of(r.ttft_s for r in done),
        tbt=Stats.of(r.tbt_s for r in done),
        e2e=Stats.of(r.e2e_s for r in done),
        wait_parts=parts,
        throughput_rps=len(done) * per_s,
        throughput_tokens_per_s=sum(r.output_tokens for r in done) * per_s,
        goodput_rps=len(good) * per_s,
        slo_attainment=len(good) / len(records) if records else 0.0,
        makespan_s=makespan,
        slo=slo,
    )
