"""The testbed inventory: what each emulated device is (CPU share, memory, link).

YAML, validated once at load; every error names the file, the device and the field::

    cpu_period_ms: 10        # CFS period of every device's quota (optional; default: each
                             # device's shortest, the period whose quota is the kernel's 1 ms)
    graph: standard          # graph variant the agents run and profile (optional)
    precision: fp32
    devices:
      - id: dev-a            # [a-z0-9-], also its broker client id and namespace suffix
        cpu_percent: 55      # of one core: cpu.cfs_quota_us = 55% of the period
        memory_mb: 900       # the device's RAM: memory.limit_in_bytes (1 MB = 10^6 B)
        budget_mb: 440       # what its agent announces to the planner (--memory-mb)
        link: {bandwidth_mbps: 1000, latency_ms: 0.3}   # tc tbf rate; one-way delay

`memory_mb` is what the kernel enforces on the whole agent process; `budget_mb` is the
share of it the planner may fill with weights and KV cache in the planner's own units
(the manifest's bytes). The two differ because a process holds more than its weights
(Python, onnxruntime, the copies a session makes while it loads): see
`bench/testbed_memory.py` and the bundled inventory for how they were chosen.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2llm_edge.errors import E2LLMError

MIN_QUOTA_US = 1000
"""The kernel refuses a CFS quota below 1 ms."""
_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,23}$")
_TOP = {"cpu_period_ms", "graph", "precision", "devices"}
_DEVICE = {"id", "cpu_percent", "memory_mb", "budget_mb", "link"}
_LINK = {"bandwidth_mbps", "latency_ms"}
RESERVED_IDS = {"fog"}
"""Names the testbed uses for itself (the fog node's namespace and cgroup)."""


class TestbedError(E2LLMError):
    """The testbed cannot do what was asked; the message says what and where."""

    __test__ = False  # not a pytest test class despite its name


@dataclass(frozen=True)
class EmulatedLink:
    """A device's link to the fog node."""

    bandwidth_mbps: float
    """Rate of the tc tbf qdisc at both ends of its veth pair, Mbit/s."""
    latency_ms: float
    """One-way delay its relay adds in each direction, ms."""


@dataclass(frozen=True)
class EmulatedDevice:
    """One emulated device."""

    id: str
    """Device id (agent --device-id); also names its namespace and cgroup."""
    cpu_percent: float
    """CPU share in percent of one core (the CFS quota)."""
    memory_mb: float
    """Memory limit of its cgroup, MB (10^6 bytes)."""
    budget_mb: float
    """Memory budget its agent announces to the planner, MB."""
    link: EmulatedLink
    """Its link to the fog node."""

    def quota_us(self, period_us: int) -> int:
        """cpu.cfs_quota_us for a CFS period of `period_us`."""
        return round(self.cpu_percent / 100.0 * period_us)

    @property
    def shortest_period_us(self) -> int:
        """The shortest CFS period the kernel allows at this share: the one whose quota is
        its 1 ms minimum (10 ms at 10 %, 2 ms at 50 %)."""
        return max(MIN_QUOTA_US, math.ceil(MIN_QUOTA_US * 100.0 / self.cpu_percent))


@dataclass(frozen=True)
class TestbedInventory:
    """A set of emulated devices and how their agents run."""

    __test__ = False  # not a pytest test class despite its name

    devices: tuple[EmulatedDevice, ...]
    """The devices, in the order of the file."""
    cpu_period_ms: float | None = None
    """CFS period of every quota; None: each device's shortest (`shortest_period_us`).

    Short, so that a device is slow evenly, as a slow board is, rather than fast for a
    burst and then stopped. Within a period a device runs at full speed until its quota
    is spent: a decode step that fits in what is left of it (a stage idles between
    steps while the others compute theirs) runs at full speed, faster than the profile,
    which times sustained work. With 10 ms for every device, a 50 % device ran 5 ms
    bursts; at its shortest period (2 ms) a burst is at most 1 ms, the kernel's smallest
    quota."""
    graph: str = "standard"
    """Graph variant agents run and profile (the planner's memory figures are those of the
    fp32 weights, which is what the standard graph holds)."""
    precision: str = "fp32"
    """Precision of that variant."""
    source: str = "<inventory>"
    """Where it was read from (for messages)."""

    def period_us(self, dev: EmulatedDevice) -> int:
        """cpu.cfs_period_us of `dev`."""
        if self.cpu_period_ms is None:
            return dev.shortest_period_us
        return round(self.cpu_period_ms * 1000)

    @property
    def cpu_percent_total(self) -> float:
        return sum(d.cpu_percent for d in self.devices)

    def device(self, device_id: str) -> EmulatedDevice:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise KeyError(device_id)

    def check_fits(self, cpus: int | None = None) -> None:
        """The CPU shares must fit in this machine (else a device could not get its share)."""
        n = cpus or os.cpu_count() or 1
        if self.cpu_percent_total > 100 * n:
            raise TestbedError(
                f"{self.source}: cpu_percent adds up to {self.cpu_percent_total:g}% but this "
                f"machine has {n} core(s) ({100 * n}%)"
            )

    @classmethod
    def from_dict(cls, doc: Any, source: str = "<inventory>") -> TestbedInventory:
        if not isinstance(doc, Mapping):
            raise TestbedError(f"{source}: expected a mapping with 'devices', got {_kind(doc)}")
        _unknown(doc, _TOP, source)
        period = _num(doc, "cpu_period_ms", source, low=1.0) if "cpu_period_ms" in doc else None
        graph = str(doc.get("graph", "standard"))
        precision = str(doc.get("precision", "fp32" if graph == "standard" else "exact"))
        raw = doc.get("devices")
        if not isinstance(raw, list) or not raw:
            raise TestbedError(f"{source}: 'devices' must be a non-empty list")
        devices, seen = [], set()
        for i, d in enumerate(raw):
            where = f"{source}: devices[{i}]"
            if not isinstance(d, Mapping):
                raise TestbedError(f"{where}: expected a mapping, got {_kind(d)}")
            dev_id = d.get("id")
            if not isinstance(dev_id, str) or not _ID.match(dev_id):
                raise TestbedError(
                    f"{where}: id must be 1-24 characters of a-z, 0-9 and '-', got {dev_id!r}"
                )
            where = f"{source}: device {dev_id}"
            if dev_id in seen:
                raise TestbedError(f"{where}: id used twice")
            if dev_id in RESERVED_IDS:
                raise TestbedError(f"{where}: id {dev_id!r} is reserved for the fog node")
            seen.add(dev_id)
            _unknown(d, _DEVICE, where)
            cpu = _num(d, "cpu_percent", where, low=0.0)
            if period is not None and cpu / 100.0 * period * 1000 < MIN_QUOTA_US:
                raise TestbedError(
                    f"{where}: cpu_percent {cpu:g} of a {period:g} ms period is a quota under "
                    f"the kernel's 1 ms minimum (raise cpu_period_ms or the share)"
                )
            memory = _num(d, "memory_mb", where, low=0.0)
            budget = _num(d, "budget_mb", where, low=0.0)
            if budget >= memory:
                raise TestbedError(
                    f"{where}: budget_mb ({budget:g}) must be below memory_mb ({memory:g}): "
                    f"the agent process needs memory besides its weights"
                )
            link = d.get("link")
            if not isinstance(link, Mapping):
                raise TestbedError(f"{where}: link must be a mapping, got {_kind(link)}")
            _unknown(link, _LINK, f"{where}: link")
            devices.append(
                EmulatedDevice(
                    id=dev_id,
                    cpu_percent=cpu,
                    memory_mb=memory,
                    budget_mb=budget,
                    link=EmulatedLink(
                        bandwidth_mbps=_num(link, "bandwidth_mbps", f"{where}: link", low=0.0),
                        latency_ms=_num(
                            link, "latency_ms", f"{where}: link", low=0.0, inclusive=True
                        ),
                    ),
                )
            )
        if len(devices) > 250:
            raise TestbedError(f"{source}: at most 250 devices, got {len(devices)}")
        return cls(tuple(devices), period, graph, precision, source)

    def to_dict(self) -> dict[str, Any]:
        return {
            **({} if self.cpu_period_ms is None else {"cpu_period_ms": self.cpu_period_ms}),
            "graph": self.graph,
            "precision": self.precision,
            "devices": [
                {
                    "id": d.id,
                    "cpu_percent": d.cpu_percent,
                    "memory_mb": d.memory_mb,
                    "budget_mb": d.budget_mb,
                    "link": {
                        "bandwidth_mbps": d.link.bandwidth_mbps,
                        "latency_ms": d.link.latency_ms,
                    },
                }
                for d in self.devices
            ],
        }


def load_testbed_inventory(path: str | Path) -> TestbedInventory:
    """Read and validate a testbed inventory file."""
    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())
    except OSError as exc:
        raise TestbedError(f"{p}: cannot read the inventory ({exc.strerror})") from exc
    except yaml.YAMLError as exc:
        raise TestbedError(f"{p}: not valid YAML ({exc})") from exc
    return TestbedInventory.from_dict(doc, source=str(p))


def bundled_inventory() -> Path:
    """The bundled 7-device testbed."""
    return Path(__file__).resolve().parents[2] / "examples" / "testbed.yaml"


def _kind(x: object) -> str:
    return type(x).__name__


def _unknown(doc: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = sorted(set(doc) - allowed)
    if extra:
        raise TestbedError(f"{where}: unknown field {extra[0]!r} (expected {sorted(allowed)})")


def _num(
    doc: Mapping[str, Any],
    key: str,
    where: str,
    *,
    default: float | None = None,
    low: float,
    inclusive: bool = False,
) -> float:
    if key not in doc:
        if default is not None:
            return default
        raise TestbedError(f"{where}: {key} is missing")
    v = doc[key]
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise TestbedError(f"{where}: {key} must be a number, got {v!r}")
    if v < low or (v == low and not inclusive):
        raise TestbedError(
            f"{where}: {key} must be {'>=' if inclusive else '>'} {low:g}, got {v!r}"
        )
    return float(v)
