"""Workload: mean prompt/output lengths and arrival rate, plus request streams to simulate.

The planner sees the means, the arrival rate and the longest contexts the stream reaches
(`peak_prompt_tokens`, `peak_context_tokens`: memory must hold those, not just the
mean); the simulator draws whole request streams: synthetic (Poisson or fixed-interval
arrivals, lengths fixed, exponential or lognormal around the means), phased (a list of
phases, each its own mix, rate and length: a workload that drifts), or replayed from the
Azure LLM inference traces (Patel et al., "Splitwise: Efficient generative LLM inference
using phase splitting", ISCA 2024; CC BY 4.0; shipped in `planner/data/traces/`),
time-scaled to edge rates and clipped to a context.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal

import numpy as np
import yaml

from planner.errors import WorkloadError

LengthDist = Literal["fixed", "exponential", "lognormal"]
ArrivalKind = Literal["poisson", "fixed"]
PEAK_QUANTILE = 0.999
"""Lengths the planner makes room for: the largest of ~1000 requests."""


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
    peak_prompt: float | None = None
    """Longest prompt the stream reaches (None: the PEAK_QUANTILE of the distribution)."""
    peak_context: float | None = None
    """Longest prompt + output the stream reaches (None: from the distribution)."""

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

    @property
    def peak_prompt_tokens(self) -> float:
        """The longest prompt memory must hold (a stream of ~1000 requests reaches it)."""
        if self.peak_prompt is not None:
            return self.peak_prompt
        return min(self._quantile(self.mean_prompt_tokens), self.max_context_tokens - 1.0)

    @property
    def peak_context_tokens(self) -> float:
        """The longest prompt + output a decoder must hold (the longer of prompt and output
        at their peaks, plus the other's mean: both peaking together is rarer still)."""
        if self.peak_context is not None:
            return self.peak_context
        p, o = self.mean_prompt_tokens, self.mean_output_tokens
        peak = max(self.peak_prompt_tokens + o, p + self._quantile(o))
        return min(peak, float(self.max_context_tokens))

    def _quantile(self, mean: float) -> float:
        if self.length_dist == "fixed":
            return mean
        if self.length_dist == "exponential":
            return -mean * math.log(1.0 - PEAK_QUANTILE)
        s = self.length_sigma
        z = NormalDist().inv_cdf(PEAK_QUANTILE)
        return math.exp(math.log(mean) - s * s / 2 + s * z)

    def with_rate(self, rate_rps: float) -> Workload:
        """The same mix at another arrival rate."""
        return replace(self, arrival_rate_rps=rate_rps)

    def sample_requests(
        self, n: int, rng: np.random.Generator, *, start_s: float = 0.0, first_id: int = 0
    ) -> list[Request]:
        """Draw `n` requests: arrival times (the first at `start_s`), prompt and output
        lengths; ids count from `first_id`."""
        if n < 1:
            raise WorkloadError(f"workload: number of requests must be >= 1, got {n}")
        if self.arrival == "poisson":
            gaps = rng.exponential(self.arrival_interval_s, size=n)
        else:
            gaps = np.full(n, self.arrival_interval_s)
        times = start_s + np.cumsum(gaps) - gaps[0]
        prompts = self._lengths(self.mean_prompt_tokens, n, rng)
        outputs = self._lengths(self.mean_output_tokens, n, rng)
        return [
            Request(first_id + i, float(t), *self._clip(int(p), int(o)))
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
        with _open_text(p) as f:
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
    except (OSError, EOFError, gzip.BadGzipFile) as e:
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


def _open_text(p: Path) -> io.TextIOWrapper:
    """A trace as text; `.gz` files are decompressed on the fly (standard library)."""
    if p.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(p, "rb"), newline="")
    return p.open(newline="")


TRACES = {
    "conv": "AzureLLMInferenceTrace_conv.csv.gz",
    "code": "AzureLLMInferenceTrace_code.csv.gz",
}
"""The Azure traces shipped in planner/data/traces (gzip of the original CSV files)."""


def trace_path(name: str) -> Path:
    """Path of a shipped trace by short name (conv, code), or of any CSV file given."""
    if name in TRACES:
        from importlib import resources

        return Path(str(resources.files("planner") / "data" / "traces" / TRACES[name]))
    return Path(name)


def workload_of(requests: Sequence[Request]) -> Workload:
    """The workload the planner should see for a request stream: its means, its rate and
    the longest prompt and context it actually reaches."""
    n = len(requests)
    span = requests[-1].arrival_s - requests[0].arrival_s
    rate = (n - 1) / span if n > 1 and span > 0 else 1.0
    return Workload(
        mean_prompt_tokens=sum(r.prompt_tokens for r in requests) / n,
        mean_output_tokens=max(1.0, sum(r.output_tokens for r in requests) / n),
        arrival_rate_rps=rate,
        peak_prompt=float(max(r.prompt_tokens for r in requests)),
        peak_context=float(max(r.prompt_tokens + r.output_tokens for r in requests)),
    )


@dataclass(frozen=True)
class Phase:
    """One stretch of a drifting stream: its own mix and rate, for a count or a time."""

    workload: Workload
    """Mix and arrival rate of this phase."""
    requests: int
    """Requests drawn in this phase."""
    name: str = ""
    """Label used in reports."""


@dataclass(frozen=True)
class PhasedWorkload:
    """A stream whose mix changes: phases one after the other."""

    phases: tuple[Phase, ...]
    """The phases, in order."""
    source: str = "<phases>"
    """Where it was read from (used in messages)."""

    def sample_requests(self, rng: np.random.Generator) -> list[Request]:
        """Every phase's requests, each phase starting one mean interval after the last
        arrival of the previous one."""
        out: list[Request] = []
        start = 0.0
        for ph in self.phases:
            reqs = ph.workload.sample_requests(ph.requests, rng, start_s=start, first_id=len(out))
            out += reqs
            start = reqs[-1].arrival_s + ph.workload.arrival_interval_s
        return out

    @property
    def first(self) -> Workload:
        """The mix at the start (what a plan made before the stream knows)."""
        return self.phases[0].workload

    def overall(self) -> Workload:
        """The mean mix over the whole stream (what only hindsight knows), with the
        peaks of every phase."""
        n = sum(ph.requests for ph in self.phases)
        duration = sum(ph.requests / ph.workload.arrival_rate_rps for ph in self.phases)
        w = self.phases[0].workload
        return replace(
            w,
            mean_prompt_tokens=sum(
                ph.requests * ph.workload.mean_prompt_tokens for ph in self.phases
            )
            / n,
            mean_output_tokens=sum(
                ph.requests * ph.workload.mean_output_tokens for ph in self.phases
            )
            / n,
            arrival_rate_rps=n / duration,
            peak_prompt=max(ph.workload.peak_prompt_tokens for ph in self.phases),
            peak_context=max(ph.workload.peak_context_tokens for ph in self.phases),
        )


_PHASE_KEYS = {
    "name",
    "prompt_tokens",
    "output_tokens",
    "rate",
    "interval_s",
    "requests",
    "duration_s",
    "length_dist",
    "length_sigma",
    "arrival",
    "max_context_tokens",
}


def phases_from(data: Any, source: str = "<phases>") -> PhasedWorkload:
    """Validate phases given as a list of mappings (or {phases: [...]}); every error names
    the source, the phase and the field.

    Each phase: prompt_tokens, output_tokens (means), rate (requests/s) or interval_s,
    requests or duration_s (requests = rate x duration), and optionally name,
    length_dist (fixed, exponential, lognormal), length_sigma, arrival (poisson, fixed),
    max_context_tokens.
    """
    if isinstance(data, Mapping) and set(data) == {"phases"}:
        data = data["phases"]
    if not isinstance(data, list) or not data:
        raise WorkloadError(f"{source}: expected a non-empty list of phases, got {data!r}")
    phases = [_phase(raw, f"{source}: phase {i}", i) for i, raw in enumerate(data)]
    return PhasedWorkload(tuple(phases), source)


def _num(raw: Mapping[str, Any], key: str, where: str, *, required: bool = True) -> float | None:
    v = raw.get(key)
    if v is None:
        if required:
            raise WorkloadError(f"{where}: {key} is required")
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v <= 0:
        raise WorkloadError(f"{where}: {key} must be a number > 0, got {v!r}")
    return float(v)


def _phase(raw: Any, where: str, i: int) -> Phase:
    if not isinstance(raw, Mapping):
        raise WorkloadError(f"{where}: must be a mapping, got {raw!r}")
    unknown = sorted(set(raw) - _PHASE_KEYS)
    if unknown:
        raise WorkloadError(
            f"{where}: unknown field {unknown[0]!r} (expected some of {sorted(_PHASE_KEYS)})"
        )
    rate = _num(raw, "rate", where, required=False)
    interval = _num(raw, "interval_s", where, required=False)
    if (rate is None) == (interval is None):
        raise WorkloadError(f"{where}: give exactly one of rate or interval_s")
    rps = rate if rate is not None else 1.0 / (interval or 1.0)
    count = _num(raw, "requests", where, required=False)
    duration = _num(raw, "duration_s", where, required=False)
    if (count is None) == (duration is None):
        raise WorkloadError(f"{where}: give exactly one of requests or duration_s")
    n = round(count if count is not None else rps * (duration or 0.0))
    if n < 1:
        raise WorkloadError(f"{where}: the phase must hold at least one request, got {n}")
    extra: dict[str, Any] = {}
    for key, allowed in (
        ("length_dist", ("fixed", "exponential", "lognormal")),
        ("arrival", ("poisson", "fixed")),
    ):
        if key in raw:
            if raw[key] not in allowed:
                raise WorkloadError(
                    f"{where}: {key} must be one of {list(allowed)}, got {raw[key]!r}"
                )
            extra[key] = raw[key]
    if "length_sigma" in raw:
        extra["length_sigma"] = _num(raw, "length_sigma", where)
    if "max_context_tokens" in raw:
        extra["max_context_tokens"] = int(_num(raw, "max_context_tokens", where) or 0)
    prompt = _num(raw, "prompt_tokens", where) or 0.0
    output = _num(raw, "output_tokens", where) or 0.0
    try:
        w = Workload(prompt, output, rps, **extra)
    except WorkloadError as e:
        raise WorkloadError(f"{where}: {e}") from e
    return Phase(w, n, str(raw.get("name", f"phase {i}")))


def load_phases(path: str | Path) -> PhasedWorkload:
    """Read a YAML list of phases (see `phases_from`)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise WorkloadError(f"{p}: cannot read phases: {e}") from e
    return phases_from(data, str(p))
