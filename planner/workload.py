"""Workload: mean prompt/output lengths and arrival rate, plus request streams to simulate.

The planner sees only the means (and the arrival rate); the simulator draws whole
request streams: synthetic (Poisson or fixed-interval arrivals, lengths fixed,
exponential or lognormal around the means) or replayed from the Azure LLM inference
traces (Patel et al., "Splitwise: Efficient generative LLM inference using phase
splitting", ISCA 2024; CC BY 4.0), time-scaled to edge rates and clipped to a context.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np

from planner.errors import WorkloadError

LengthDist = Literal["fixed", "exponential", "lognormal"]
ArrivalKind = Literal["poisson", "fixed"]


@dataclass(frozen=True)
class Workload:
    """What the cluster is asked to serve."""

    mean_prompt_tokens: float
    """Mean prompt length in tokens."""
    mean_output_tokens: float
    """Mean number of generated tokens (the first comes from the prefill)."""
    arrival_rate_rps: float
    """Mean request arrival rate, requests/s."""
    length_dist: LengthDist = "lognormal"
    """How the simulator draws lengths around the means."""
    length_sigma: float = 0.5
    """Shape of the lognormal length distribution (sigma of log length)."""
    arrival: ArrivalKind = "poisson"
    """Arrival process for synthetic streams."""
    max_context_tokens: int = 8192
    """Prompt + output lengths are clipped to this."""

    def __post_init__(self) -> None:
        for name in ("mean_prompt_tokens", "mean_output_tokens", "arrival_rate_rps"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise WorkloadError(f"workload: {name} must be > 0, got {value!r}")
        if self.mean_output_tokens < 1:
            raise WorkloadError(
                f"workload: mean_output_tokens must be >= 1, got {self.mean_output_tokens!r}"
            )

    @property
    def arrival_interval_s(self) -> float:
        """Mean seconds between arrivals."""
        return 1.0 / self.arrival_rate_rps

    @property
    def mean_context_tokens(self) -> float:
        """Tokens a request holds in the KV cache when it finishes (prompt + output)."""
        return self.mean_prompt_tokens + self.mean_output_tokens

    def sample_requests(self, n: int, rng: np.random.Generator) -> list[Request]:
        """Draw `n` requests: arrival times, prompt and output lengths."""
        if n < 1:
            raise WorkloadError(f"workload: number of requests must be >= 1, got {n}")
        if self.arrival == "poisson":
            gaps = rng.exponential(self.arrival_interval_s, size=n)
        else:
            gaps = np.full(n, self.arrival_interval_s)
        times = np.cumsum(gaps) - gaps[0]
        prompts = self._lengths(self.mean_prompt_tokens, n, rng)
        outputs = self._lengths(self.mean_output_tokens, n, rng)
        return [
            Request(i, float(t), *self._clip(int(p), int(o)))
            for i, (t, p, o) in enumerate(zip(times, prompts, outputs, strict=True))
        ]

    def _lengths(self, mean: float, n: int, rng: np.random.Generator) -> np.ndarray:
        if self.length_dist == "fixed":
            x = np.full(n, mean)
        elif self.length_dist == "exponential":
            x = rng.exponential(mean, size=n)
        else:
            # lognormal with the requested mean: mu = ln(mean) - sigma^2 / 2
            s = self.length_sigma
            x = rng.lognormal(math.log(mean) - s * s / 2, s, size=n)
        return np.maximum(1, np.rint(x)).astype(int)

    def _clip(self, prompt: int, output: int) -> tuple[int, int]:
        prompt = min(prompt, self.max_context_tokens - 1)
        output = max(1, min(output, self.max_context_tokens - prompt))
        return prompt, output


@dataclass(frozen=True)
class Request:
    """One request of a simulated stream."""

    id: int
    """Sequence number in the stream."""
    arrival_s: float
    """Arrival time, seconds from the start of the stream."""
    prompt_tokens: int
    """Prompt length."""
    output_tokens: int
    """Tokens to generate (>= 1)."""


def load_azure_trace(
    path: str | Path,
    *,
    rate_rps: float | None = None,
    limit: int | None = None,
    max_context_tokens: int = 8192,
) -> list[Request]:
    """Read an Azure LLM inference trace (columns TIMESTAMP, ContextTokens, GeneratedTokens).

    `rate_rps` rescales time so the mean arrival rate is that many requests/s (the traces
    run at ~2.6-5.5 req/s, far above what an edge cluster serves). Prompts are clipped to
    the context, outputs to what is left of it; `limit` keeps the first requests.
    """
    p = Path(path)
    rows: list[tuple[datetime, int, int]] = []
    try:
        with p.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(
                reader.fieldnames or ()
            )
            if missing:
                raise WorkloadError(f"{p}: trace lacks columns {sorted(missing)}")
            for n, row in enumerate(reader):
                if limit is not None and n >= limit:
                    break
                try:
                    ts = datetime.fromisoformat(row["TIMESTAMP"][:26])
                    rows.append((ts, int(row["ContextTokens"]), int(row["GeneratedTokens"])))
                except ValueError as e:
                    raise WorkloadError(f"{p}: line {n + 2}: {e}") from e
    except OSError as e:
        raise WorkloadError(f"{p}: cannot read trace: {e}") from e
    if not rows:
        raise WorkloadError(f"{p}: trace has no requests")
    t0 = rows[0][0]
    times = [(ts - t0).total_seconds() for ts, _, _ in rows]
    scale = 1.0
    if rate_rps is not None:
        span = times[-1] - times[0]
        native = (len(rows) - 1) / span if span > 0 else rate_rps
        scale = native / rate_rps
    out = []
    for i, ((_, ctx, gen), t) in enumerate(zip(rows, times, strict=True)):
        prompt = max(1, min(ctx, max_context_tokens - 1))
        output = max(1, min(gen, max_context_tokens - prompt))
        out.append(Request(i, t * scale, prompt, output))
    return out


def workload_of(requests: list[Request]) -> Workload:
    """The mean-value workload the planner should see for a request stream."""
    n = len(requests)
    span = requests[-1].arrival_s - requests[0].arrival_s
    rate = (n - 1) / span if n > 1 and span > 0 else 1.0
    return Workload(
        mean_prompt_tokens=sum(r.prompt_tokens for r in requests) / n,
        mean_output_tokens=max(1.0, sum(r.output_tokens for r in requests) / n),
        arrival_rate_rps=rate,
    )
