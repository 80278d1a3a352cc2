"""The plan: replicas, their roles and concurrency, ordered stages with layer ranges.

Produced by `planner.make_plan`, published (retained) by the orchestrator, read by agents.
`to_dict`/`from_dict` and `to_yaml`/`from_yaml` round-trip exactly; `from_dict`
validates the structure and names the bad field. Invariants per replica: stages cover
layers 0..n_layers-1 contiguously in order (half-open ranges, each non-empty); the head
is on the last stage only; exactly one stage embeds, and it is the first or the last
(embedding next to the head lets a tied weight be stored once; the last device then
embeds the sampled token and sends the hidden state to stage 0). A device appears in at
most one stage of the whole plan.

Each replica may carry a `timing` block (`Timing`): the planner's predicted per-stage
prefill times over a grid of prompt lengths, its decode cycle per batch size and the KV
tokens its memory holds. `planner.routing.Router` routes by it (optional: a hand-written
plan without it is routed on its stages' predicted times, with unbounded KV).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from planner.errors import PlanError

Role = Literal["prefill", "decoder", "mixed"]
Prediction = int | float | bool | str | list[int] | list[str] | None
"""Values of `Plan.predicted` (typed, so a plan crosses the bus as a checked struct)."""
ROLES: tuple[str, ...] = ("prefill", "decoder", "mixed")


@dataclass(frozen=True)
class Stage:
    """One device's share of a replica."""

    device_id: str
    """Device running this stage."""
    layer_start: int
    """First layer held (inclusive)."""
    layer_end: int
    """One past the last layer held (half-open)."""
    embed: bool
    """This device runs the embedding."""
    head: bool
    """This device runs the head (final norm + lm_head); always the last stage."""
    predicted_prefill_s: float
    """Predicted stage time (compute + transfer in) for a mean prompt."""
    predicted_decode_s: float
    """Predicted stage time for one decode step of this replica's micro-batch."""

    @property
    def n_layers(self) -> int:
        """Number of layers held."""
        return self.layer_end - self.layer_start


@dataclass(frozen=True)
class Timing:
    """The planner's predictions a router needs for one replica (seconds)."""

    prefill_tokens: tuple[int, ...]
    """Prompt lengths at which prefill was predicted (strictly increasing)."""
    prefill_stage_s: tuple[tuple[float, ...], ...]
    """For each of those lengths, each stage's time (compute + the hop into it)."""
    decode_cycle_s: tuple[float, ...]
    """Seconds per token of every request when n requests decode, n = 1..len."""
    kv_budget_tokens: float
    """KV-cache tokens the replica can hold at once (the least over its stages of what
    memory leaves after weights and workspace, per token of its layers); a router admits
    a request only while the tokens it reserved fit."""
    kv_out_s_per_token: float = 0.0
    """Seconds per prompt token its slowest uplink needs to send a prompt's KV."""
    pass_tokens: float = 0.0
    """The largest prefill pass (prompt) `kv_budget_tokens` leaves workspace for."""
    workspace_kv_per_token: float = 0.0
    """KV tokens one more prompt token of a longer pass costs in workspace (tightest
    stage): a prompt longer than `pass_tokens` reserves that much more."""

    def prefill_need(self, prompt_tokens: int) -> float:
        """KV tokens (with extra workspace) a prompt reserves while prefilled here."""
        extra = max(0.0, prompt_tokens - self.pass_tokens) * self.workspace_kv_per_token
        return prompt_tokens + extra

    def prefill_stages(self, tokens: float) -> list[float]:
        """Each stage's predicted time for a prompt of `tokens` (piecewise linear,
        extrapolated linearly beyond the grid)."""
        xs = self.prefill_tokens
        if len(xs) == 1 or tokens <= xs[0]:
            return list(self.prefill_stage_s[0])
        i = bisect.bisect_left(xs, tokens)
        i = min(max(i, 1), len(xs) - 1)
        w = (tokens - xs[i - 1]) / (xs[i] - xs[i - 1])
        lo, hi = self.prefill_stage_s[i - 1], self.prefill_stage_s[i]
        return [a + w * (b - a) for a, b in zip(lo, hi, strict=True)]

    def cycle_s(self, n: int) -> float:
        """Seconds per token when `n` requests decode (beyond the table: the last)."""
        if not self.decode_cycle_s:
            return 0.0
        return self.decode_cycle_s[max(1, min(n, len(self.decode_cycle_s))) - 1]


def micro_batch(concurrency: int, n_stages: int) -> int:
    """Size of each of the min(k, c) micro-batches a k-stage decoder splits c requests into
    (the planner's decode model, and the largest batch an agent of such a replica runs)."""
    return math.ceil(concurrency / min(n_stages, concurrency))


@dataclass(frozen=True)
class Replica:
    """A group of devices that together hold the whole model."""

    replica_id: int
    """Id unique within the plan."""
    role: Role
    """prefill, decoder, or mixed (does both; only when a single replica exists)."""
    concurrency: int
    """Requests decoded at once (decoder/mixed); 1 for prefill replicas."""
    stages: list[Stage]
    """Stages in pipeline order."""
    timing: Timing | None = None
    """Predictions for routing (None in hand-written plans: the router derives them
    from the stages' predicted times)."""

    @property
    def device_ids(self) -> list[str]:
        """Devices in pipeline order."""
        return [s.device_id for s in self.stages]

    @property
    def embed_last(self) -> bool:
        """The embedding sits on the last stage (next to the head)."""
        return self.stages[-1].embed and len(self.stages) > 1


@dataclass(frozen=True)
class Plan:
    """A versioned serving plan."""

    version: int
    """Monotonic version; agents ignore messages of other versions."""
    method: str
    """Which planner produced it (e2llm, splitwise, pipeline, memprop)."""
    n_layers: int
    """Layers of the model."""
    replicas: list[Replica]
    """All replicas."""
    predicted: dict[str, Prediction] = field(default_factory=dict)
    """Predicted figures: bottleneck, capacities, throughput (plain numbers, names)."""

    def __post_init__(self) -> None:
        """A plan built any way (planner, YAML, a decoded message) holds its invariants."""
        _check_invariants(self)

    def figure(self, key: str, default: float) -> float:
        """A numeric predicted figure (`default` when absent or not a number: a
        hand-written plan may carry none)."""
        value = self.predicted.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            return default
        return float(value)

    def replica(self, replica_id: int) -> Replica:
        """The replica with this id."""
        for r in self.replicas:
            if r.replica_id == replica_id:
                return r
        raise KeyError(replica_id)

    def by_role(self, role: Role) -> list[Replica]:
        """Replicas with this role."""
        return [r for r in self.replicas if r.role == role]

    def can_serve(self) -> bool:
        """Its replicas can both prefill and decode (a mixed one, or one of each role)."""
        roles = {r.role for r in self.replicas}
        return "mixed" in roles or {"prefill", "decoder"} <= roles

    def without(self, devices: Iterable[str], version: int) -> Plan | None:
        """This plan minus every replica holding one of `devices`, as plan `version`; None
        if what is left cannot serve.

        Recovery from a lost device: the surviving replicas keep their layout exactly, so
        their devices load nothing and serve again as soon as the plan is published;
        planning anew (GA + DP) would move most devices and make all of them reload.
        """
        gone = set(devices)
        kept = [r for r in self.replicas if not gone & {s.device_id for s in r.stages}]
        if not kept:
            return None
        left = Plan(
            version,
            self.method,
            self.n_layers,
            kept,
            {
                "survivors_of": self.version,
                "dropped_replicas": [r.replica_id for r in self.replicas if r not in kept],
            },
        )
        return left if kept and left.can_serve() else None

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (YAML/msgpack friendly)."""
        return {
            "version": self.version,
            "method": self.method,
            "n_layers": self.n_layers,
            "predicted": dict(self.predicted),
            "replicas": [
                {
                    "replica_id": r.replica_id,
                    "role": r.role,
                    "concurrency": r.concurrency,
                    **({"timing": _timing_dict(r.timing)} if r.timing is not None else {}),
                    "stages": [
                        {
                            "device_id": s.device_id,
                            "layer_start": s.layer_start,
                            "layer_end": s.layer_end,
                            "embed": s.embed,
                            "head": s.head,
                            "predicted_prefill_s": s.predicted_prefill_s,
                            "predicted_decode_s": s.predicted_decode_s,
                        }
                        for s in r.stages
                    ],
                }
                for r in self.replicas
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        """Validate and build a plan from `to_dict` output."""
        if not isinstance(d, Mapping):
            raise PlanError(f"plan: expected a mapping, got {type(d).__name__}")
        version = _int(d, "version", "plan", minimum=1)
        method = d.get("method")
        if not isinstance(method, str) or not method:
            raise PlanError(f"plan: method must be a non-empty string, got {method!r}")
        n_layers = _int(d, "n_layers", "plan", minimum=1)
        predicted = d.get("predicted", {})
        if not isinstance(predicted, Mapping):
            raise PlanError(f"plan: predicted must be a mapping, got {predicted!r}")
        raw_replicas = d.get("replicas")
        if not isinstance(raw_replicas, list) or not raw_replicas:
            raise PlanError(f"plan: replicas must be a non-empty list, got {raw_replicas!r}")
        replicas = [_replica(r, n, n_layers) for n, r in enumerate(raw_replicas)]
        ids = [r.replica_id for r in replicas]
        if len(set(ids)) != len(ids):
            raise PlanError(f"plan: replica_id values must be unique, got {ids}")
        seen: dict[str, int] = {}
        for r in replicas:
            for s in r.stages:
                if s.device_id in seen:
                    raise PlanError(
                        f"plan: replica {r.replica_id}: device_id {s.device_id!r} already "
                        f"used by replica {seen[s.device_id]}"
                    )
                seen[s.device_id] = r.replica_id
        return cls(version, method, n_layers, replicas, dict(predicted))

    def to_yaml(self) -> str:
        """YAML text; floats are written with repr so they read back bit-exact."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        """Parse and validate YAML produced by `to_yaml`."""
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise PlanError(f"plan: not valid YAML: {e}") from e
        return cls.from_dict(data)


def _timing_dict(t: Timing) -> dict[str, Any]:
    return {
        "prefill_tokens": list(t.prefill_tokens),
        "prefill_stage_s": [list(row) for row in t.prefill_stage_s],
        "decode_cycle_s": list(t.decode_cycle_s),
        "kv_budget_tokens": t.kv_budget_tokens,
        "kv_out_s_per_token": t.kv_out_s_per_token,
        "pass_tokens": t.pass_tokens,
        "workspace_kv_per_token": t.workspace_kv_per_token,
    }


def _timing(raw: Any, where: str, n_stages: int) -> Timing:
    w = f"{where}: timing"
    if not isinstance(raw, Mapping):
        raise PlanError(f"{w}: must be a mapping, got {raw!r}")
    tokens = raw.get("prefill_tokens")
    if (
        not isinstance(tokens, list)
        or not tokens
        or not all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in tokens)
        or any(b <= a for a, b in itertools.pairwise(tokens))
    ):
        raise PlanError(
            f"{w}: prefill_tokens must be a strictly increasing list of positive integers, "
            f"got {tokens!r}"
        )
    rows = raw.get("prefill_stage_s")
    if not isinstance(rows, list) or len(rows) != len(tokens):
        raise PlanError(f"{w}: prefill_stage_s must have one row per prefill_tokens entry")
    table = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != n_stages:
            raise PlanError(
                f"{w}: prefill_stage_s[{i}] must list one time per stage ({n_stages}), got {row!r}"
            )
        table.append(tuple(_float({"x": x}, "x", f"{w}: prefill_stage_s[{i}]") for x in row))
    cycles = raw.get("decode_cycle_s")
    if not isinstance(cycles, list):
        raise PlanError(f"{w}: decode_cycle_s must be a list, got {cycles!r}")
    budget = raw.get("kv_budget_tokens")
    if isinstance(budget, bool) or not isinstance(budget, int | float) or budget <= 0:
        raise PlanError(f"{w}: kv_budget_tokens must be a number > 0, got {budget!r}")
    return Timing(
        prefill_tokens=tuple(tokens),
        prefill_stage_s=tuple(table),
        decode_cycle_s=tuple(
            _float({"x": x}, "x", f"{w}: decode_cycle_s[{i}]") for i, x in enumerate(cycles)
        ),
        kv_budget_tokens=float(budget),
        kv_out_s_per_token=_float(raw, "kv_out_s_per_token", w)
        if "kv_out_s_per_token" in raw
        else 0.0,
        pass_tokens=_float(raw, "pass_tokens", w) if "pass_tokens" in raw else 0.0,
        workspace_kv_per_token=_float(raw, "workspace_kv_per_token", w)
        if "workspace_kv_per_token" in raw
        else 0.0,
    )


def _int(d: Mapping[str, Any], key: str, where: str, *, minimum: int) -> int:
    value = d.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise PlanError(f"{where}: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(d: Mapping[str, Any], key: str, where: str) -> float:
    value = d.get(key)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or value < 0
    ):
        raise PlanError(f"{where}: {key} must be a number >= 0, got {value!r}")
    return float(value)


def _bool(d: Mapping[str, Any], key: str, where: str) -> bool:
    value = d.get(key)
    if not isinstance(value, bool):
        raise PlanError(f"{where}: {key} must be true or false, got {value!r}")
    return value


def _replica(raw: Any, n: int, n_layers: int) -> Replica:
    if not isinstance(raw, Mapping):
        raise PlanError(f"plan: replicas[{n}] must be a mapping, got {raw!r}")
    rid = _int(raw, "replica_id", f"plan: replicas[{n}]", minimum=0)
    where = f"plan: replica {rid}"
    role = raw.get("role")
    if role not in ROLES:
        raise PlanError(f"{where}: role must be one of {list(ROLES)}, got {role!r}")
    concurrency = _int(raw, "concurrency", where, minimum=1)
    raw_stages = raw.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise PlanError(f"{where}: stages must be a non-empty list, got {raw_stages!r}")
    stages: list[Stage] = []
    expected_start = 0
    for i, rs in enumerate(raw_stages):
        sw = f"{where}: stage {i}"
        if not isinstance(rs, Mapping):
            raise PlanError(f"{sw}: must be a mapping, got {rs!r}")
        device_id = rs.get("device_id")
        if not isinstance(device_id, str) or not device_id:
            raise PlanError(f"{sw}: device_id must be a non-empty string, got {device_id!r}")
        start = _int(rs, "layer_start", sw, minimum=0)
        end = _int(rs, "layer_end", sw, minimum=1)
        if start != expected_start:
            raise PlanError(
                f"{sw}: layer_start must be {expected_start} (contiguous with the previous "
                f"stage), got {start}"
            )
        if end <= start or end > n_layers:
            raise PlanError(f"{sw}: layer_end must be in ({start}, {n_layers}], got {end}")
        expected_start = end
        stages.append(
            Stage(
                device_id=device_id,
                layer_start=start,
                layer_end=end,
                embed=_bool(rs, "embed", sw),
                head=_bool(rs, "head", sw),
                predicted_prefill_s=_float(rs, "predicted_prefill_s", sw),
                predicted_decode_s=_float(rs, "predicted_decode_s", sw),
            )
        )
    if expected_start != n_layers:
        raise PlanError(
            f"{where}: stage {len(stages) - 1}: layer_end must be n_layers={n_layers} "
            f"(stages must cover every layer), got {expected_start}"
        )
    for i, s in enumerate(stages):
        last = i == len(stages) - 1
        if s.head != last:
            raise PlanError(
                f"{where}: stage {i}: head must be {str(last).lower()} (the head lives on the "
                f"last stage only), got {str(s.head).lower()}"
            )
    embeds = [i for i, s in enumerate(stages) if s.embed]
    if len(embeds) != 1 or embeds[0] not in (0, len(stages) - 1):
        raise PlanError(
            f"{where}: embed must be true on exactly one stage, the first or the last; "
            f"got embed on stages {embeds}"
        )
    timing = _timing(raw["timing"], where, len(stages)) if raw.get("timing") is not None else None
    return Replica(rid, role, concurrency, stages, timing)


def _check_invariants(plan: Plan) -> None:
    """What every consumer of a plan relies on (see the module docstring)."""
    if plan.version < 1 or plan.n_layers < 1:
        raise PlanError(
            f"plan: version and n_layers must be >= 1, got {plan.version}, {plan.n_layers}"
        )
    if not plan.replicas:
        raise PlanError("plan: replicas must be a non-empty list")
    ids = [r.replica_id for r in plan.replicas]
    if len(set(ids)) != len(ids):
        raise PlanError(f"plan: replica_id values must be unique, got {ids}")
    seen: dict[str, int] = {}
    for r in plan.replicas:
        where = f"plan: replica {r.replica_id}"
        if r.role not in ROLES:
            raise PlanError(f"{where}: role must be one of {list(ROLES)}, got {r.role!r}")
        if r.concurrency < 1:
            raise PlanError(f"{where}: concurrency must be >= 1, got {r.concurrency}")
        if not r.stages:
            raise PlanError(f"{where}: stages must be a non-empty list")
        start = 0
        for i, s in enumerate(r.stages):
            if s.device_id in seen:
                raise PlanError(
                    f"{where}: device_id {s.device_id!r} already used by replica "
                    f"{seen[s.device_id]}"
                )
            seen[s.device_id] = r.replica_id
            if s.layer_start != start or not s.layer_start < s.layer_end <= plan.n_layers:
                raise PlanError(
                    f"{where}: stage {i}: layers [{s.layer_start}, {s.layer_end}) "
                    f"must start at {start} and end in ({start}, {plan.n_layers}]"
                )
            start = s.layer_end
            if s.head != (i == len(r.stages) - 1):
                raise PlanError(f"{where}: stage {i}: head must be on the last stage only")
        if start != plan.n_layers:
            raise PlanError(f"{where}: stages cover layers [0, {start}), not all {plan.n_layers}")
        embeds = [i for i, s in enumerate(r.stages) if s.embed]
        if len(embeds) != 1 or embeds[0] not in (0, len(r.stages) - 1):
            raise PlanError(
                f"{where}: embed must be true on exactly one stage, the first or "
                f"the last; got embed on stages {embeds}"
            )
