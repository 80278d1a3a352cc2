"""Device inventory: what each edge device can hold and how fast it computes and talks.

Loaded from YAML and validated once, at load; every error names the source, the device
and the field. Schema (units in the comments; unknown keys are errors, to catch typos)::

    link_defaults: {bandwidth_mbps: 920, latency_ms: 1.0}   # optional
    devices:
      - id: pi-1
        memory_mb: 300            # budget (1 MB = 10^6 bytes) for weights + KV cache
        link: {bandwidth_mbps: 100, latency_ms: 2.0}   # device <-> broker; optional if
                                  # link_defaults is given. Every hop is
                                  # device -> broker -> device.
        profile:                  # measured (written by `e2llm profile`); takes
                                  # precedence over hardware
          prefill_tokens: [16, 64, 256, 1024]   # sample points, strictly increasing
          layer_prefill_s: [..]   # seconds for ONE decoder layer to prefill a prompt of
                                  # that many tokens (same length as prefill_tokens)
          layer_decode_s: [..]    # seconds for ONE layer, one decode step of the whole
                                  # batch, at concurrency 1..len (index c-1)
          embed_s: 0.0001         # embedding, per token
          head_prefill_s: 0.002   # head (final norm + lm_head) for one position
          head_decode_s: [..]     # head per decode step at concurrency 1..len
          pass_s: 0.0015          # optional (default 0): the agent's own time per pass
                                  # beyond its layers (take in one message, send one)
          io_s_per_mb: 0.9        # optional (default 0): the agent's time per MB it sends
                                  # or receives (encoding, TLS, the socket), beyond the link
        hardware:                 # alternative: roofline estimate
          tflops: 1.5             # peak fp32 TFLOP/s usable
          mem_bw_gbps: 8.0        # memory bandwidth, GB/s
          efficiency: 0.5         # optional (default 0.5): fraction of peak achieved

A device needs a profile, hardware figures, or both, unless loaded with
``require_costs=False``: the orchestrator's inventory may name devices with only ``id`` and
``memory_mb``, because their agents announce a measured profile and their link live
(a device without a link then gets ``ASSUMED_LINK``). Profiles are interpolated piecewise
linearly in tokens and extrapolated linearly beyond the last sample (below the first
sample the first value is used: fixed per-call overhead dominates tiny prompts).
Concurrency beyond the measured list extrapolates linearly from the last two points.
A profile is measured for one model: it describes the average layer of that model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from planner.errors import InventoryError, yaml_problem

_BYTES_PER_MB = 1_000_000


@dataclass(frozen=True)
class Link:
    """The network link between one device and the broker."""

    bandwidth_mbps: float
    """Usable bandwidth in Mbit/s (same both ways)."""
    latency_ms: float
    """One-way latency device <-> broker, in milliseconds."""

    def one_way_s(self, nbytes: float) -> float:
        """Seconds to push `nbytes` across this link (latency plus serialisation)."""
        return self.latency_ms * 1e-3 + nbytes * 8.0 / (self.bandwidth_mbps * 1e6)


ASSUMED_LINK = Link(bandwidth_mbps=1000.0, latency_ms=0.5)
"""A wired LAN: the link of a device that names none, until its agent announces its own."""


def hop_s(src: Link, dst: Link, nbytes: float) -> float:
    """Seconds for one device -> broker -> device hop (store and forward at the broker)."""
    return src.one_way_s(nbytes) + dst.one_way_s(nbytes)


@dataclass(frozen=True)
class Relayed:
    """Times of a train of messages relayed by the broker (see `relay`)."""

    up_free: float
    """When the sender's uplink has pushed the last message."""
    down_free: float
    """When the receiver's downlink has pushed the last message."""
    first: float
    """When the first message has reached the receiver."""
    last: float
    """When the last message has reached the receiver."""


def relay(
    src: Link,
    dst: Link,
    nbytes: float,
    messages: int,
    *,
    start: float = 0.0,
    up_free: float = 0.0,
    down_free: float = 0.0,
) -> Relayed:
    """`nbytes` in `messages` equal messages, device -> broker -> device, when the links
    are next free at `up_free` and `down_free`: the broker stores and forwards each
    message, so the downlink carries message j while the uplink pushes message j+1 (a
    train takes about its slower link's time plus one message on the faster, not both
    links' whole time).

    Message j leaves the uplink at u_j = u0 + j*a (u0 = max(start, up_free), a and b the
    seconds per message on each link), and the downlink at
    d_j = max(d_(j-1), u_j + uplink latency) + b, which unrolls to the closed form below.
    """
    n = max(1, int(messages))
    per = nbytes / n
    a = per * 8.0 / (src.bandwidth_mbps * 1e6)
    b = per * 8.0 / (dst.bandwidth_mbps * 1e6)
    lat_up, lat_down = src.latency_ms * 1e-3, dst.latency_ms * 1e-3
    u0 = max(start, up_free)
    first = max(down_free, u0 + a + lat_up) + b
    last = max(down_free + n * b, u0 + lat_up + max(n * a + b, a + n * b))
    return Relayed(u0 + n * a, last, first + lat_down, last + lat_down)


@dataclass(frozen=True)
class DeviceProfile:
    """Measured per-layer costs of one device for one model."""

    prefill_tokens: tuple[int, ...]
    """Prompt lengths at which prefill was measured (strictly increasing)."""
    layer_prefill_s: tuple[float, ...]
    """Seconds for one decoder layer to prefill a prompt of the matching length."""
    layer_decode_s: tuple[float, ...]
    """Seconds for one layer, one decode step of the batch, at concurrency 1..len."""
    embed_s: float
    """Embedding seconds per token."""
    head_prefill_s: float
    """Head (final norm + lm_head) seconds for one position."""
    head_decode_s: tuple[float, ...]
    """Head seconds per decode step at concurrency 1..len."""
    pass_s: float = 0.0
    """The agent's own seconds per pass beyond its layers: taking in one message and
    sending one (decoding, encoding, the MQTT client, the socket). On small CPUs it is a
    large part of a pipeline stage: 1-3 ms of CPU per pass on a server core, so 10-30 ms
    on a device with a tenth of one. Zero: not measured."""
    io_s_per_mb: float = 0.0
    """The agent's own seconds per MB it sends or receives (encoding, TLS, system calls),
    beyond what the link takes; what a KV hand-off costs the devices at both ends."""

    def layer_prefill(self, tokens: float) -> float:
        """Seconds for one layer to prefill `tokens` tokens."""
        return _interp_tokens(self.prefill_tokens, self.layer_prefill_s, tokens)

    def layer_decode(self, concurrency: int) -> float:
        """Seconds for one layer, one decode step of a batch of `concurrency`."""
        return _interp_concurrency(self.layer_decode_s, concurrency)

    def head_decode(self, concurrency: int) -> float:
        """Seconds for the head, one decode step of a batch of `concurrency`."""
        return _interp_concurrency(self.head_decode_s, concurrency)


def _interp_tokens(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    if len(xs) == 1 or x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        return float(ys[-1] + slope * (x - xs[-1]))
    for i in range(1, len(xs)):
        if x <= xs[i]:
            w = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
            return float(ys[i - 1] + w * (ys[i] - ys[i - 1]))
    raise AssertionError("unreachable")


def _interp_concurrency(ys: Sequence[float], c: int) -> float:
    if c <= len(ys):
        return float(ys[c - 1])
    if len(ys) == 1:
        return float(ys[0])
    slope = ys[-1] - ys[-2]
    return float(ys[-1] + slope * (c - len(ys)))


@dataclass(frozen=True)
class Hardware:
    """Public peak figures for a roofline estimate."""

    tflops: float
    """Peak fp32 TFLOP/s usable."""
    mem_bw_gbps: float
    """Memory bandwidth in GB/s."""
    efficiency: float = 0.5
    """Fraction of peak actually achieved (applies to compute and bandwidth)."""

    @property
    def flops_per_s(self) -> float:
        """Achieved FLOP/s."""
        return self.tflops * 1e12 * self.efficiency

    @property
    def bytes_per_s(self) -> float:
        """Achieved memory bytes/s."""
        return self.mem_bw_gbps * 1e9 * self.efficiency


@dataclass(frozen=True)
class Device:
    """One edge device."""

    id: str
    """Unique device id (the agent's name on the broker)."""
    memory_mb: float
    """Budget for weights and KV cache, in MB (10^6 bytes)."""
    link: Link
    """Link to the broker."""
    profile: DeviceProfile | None = None
    """Measured costs; preferred over `hardware` when present."""
    hardware: Hardware | None = None
    """Roofline figures, used when there is no profile."""

    @property
    def memory_bytes(self) -> float:
        """Memory budget in bytes."""
        return self.memory_mb * _BYTES_PER_MB


@dataclass(frozen=True)
class Inventory:
    """All devices the planner may use, in a stable order."""

    devices: tuple[Device, ...]
    """The devices (ids unique)."""
    source: str = "<dict>"
    """Where the inventory came from (used in messages)."""
    _index: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._index.update({d.id: i for i, d in enumerate(self.devices)})

    def __len__(self) -> int:
        return len(self.devices)

    def device(self, device_id: str) -> Device:
        """The device with this id (KeyError if unknown)."""
        return self.devices[self._index[device_id]]

    def index(self, device_id: str) -> int:
        """Position of a device in `devices`."""
        return self._index[device_id]

    def subset(self, device_ids: Sequence[str]) -> Inventory:
        """A new inventory with only these devices (e.g. after a device left)."""
        return Inventory(tuple(self.device(i) for i in device_ids), source=self.source)

    @classmethod
    def from_dict(
        cls, d: Mapping[str, Any], source: str = "<dict>", *, require_costs: bool = True
    ) -> Inventory:
        """Validate and build an inventory from the YAML structure in the module docstring.

        ``require_costs=False``: a device may lack profile, hardware and link (see above).
        """
        v = _Validator(source, require_costs=require_costs)
        if not isinstance(d, Mapping):
            raise InventoryError(
                f"{source}: expected a mapping at top level, got {type(d).__name__}"
            )
        v.known_keys(d, {"link_defaults", "devices"}, "")
        defaults = None
        if d.get("link_defaults") is not None:
            defaults = v.link(d["link_defaults"], "", "link_defaults")
        raw_devices = d.get("devices")
        if not isinstance(raw_devices, list) or not raw_devices:
            raise InventoryError(f"{source}: devices must be a non-empty list, got {raw_devices!r}")
        devices: list[Device] = []
        seen: set[str] = set()
        for n, raw in enumerate(raw_devices):
            dev = v.device(raw, n, defaults)
            if dev.id in seen:
                raise InventoryError(f"{source}: device {dev.id!r}: id is duplicated")
            seen.add(dev.id)
            devices.append(dev)
        return cls(tuple(devices), source=source)

    def to_dict(self) -> dict[str, Any]:
        """The YAML structure of this inventory (links written per device)."""
        out = []
        for dev in self.devices:
            entry: dict[str, Any] = {
                "id": dev.id,
                "memory_mb": dev.memory_mb,
                "link": {
                    "bandwidth_mbps": dev.link.bandwidth_mbps,
                    "latency_ms": dev.link.latency_ms,
                },
            }
            if dev.profile is not None:
                p = dev.profile
                entry["profile"] = {
                    "prefill_tokens": list(p.prefill_tokens),
                    "layer_prefill_s": list(p.layer_prefill_s),
                    "layer_decode_s": list(p.layer_decode_s),
                    "embed_s": p.embed_s,
                    "head_prefill_s": p.head_prefill_s,
                    "head_decode_s": list(p.head_decode_s),
                    "pass_s": p.pass_s,
                    "io_s_per_mb": p.io_s_per_mb,
                }
            if dev.hardware is not None:
                h = dev.hardware
                entry["hardware"] = {
                    "tflops": h.tflops,
                    "mem_bw_gbps": h.mem_bw_gbps,
                    "efficiency": h.efficiency,
                }
            out.append(entry)
        return {"devices": out}


def load_inventory(path: str | Path, *, require_costs: bool = True) -> Inventory:
    """Read and validate an inventory YAML file (``require_costs``: see ``from_dict``)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise InventoryError(f"{p}: cannot read inventory: {e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InventoryError(f"{p}: not valid YAML: {yaml_problem(e)}") from e
    return Inventory.from_dict(data, source=str(p), require_costs=require_costs)


class _Validator:
    """Builds dataclasses from raw YAML, raising errors that say where and what."""

    def __init__(self, source: str, *, require_costs: bool = True) -> None:
        self.source = source
        self.require_costs = require_costs

    def fail(self, where: str, msg: str) -> InventoryError:
        prefix = f"{self.source}: {where}: " if where else f"{self.source}: "
        return InventoryError(prefix + msg)

    def known_keys(self, d: Mapping[str, Any], allowed: set[str], where: str) -> None:
        for key in d:
            if key not in allowed:
                raise self.fail(where, f"unknown field {key!r} (expected one of {sorted(allowed)})")

    def number(
        self,
        d: Mapping[str, Any],
        key: str,
        where: str,
        prefix: str = "",
        *,
        positive: bool = True,
        required: bool = True,
        default: float | None = None,
    ) -> float:
        name = prefix + key
        if key not in d or d[key] is None:
            if required:
                raise self.fail(where, f"{name} is required")
            assert default is not None
            return default
        value = d[key]
        return self.check_number(value, name, where, positive=positive)

    def check_number(self, value: Any, name: str, where: str, *, positive: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(where, f"{name} must be a number, got {value!r}")
        x = float(value)
        if not math.isfinite(x):
            raise self.fail(where, f"{name} must be finite, got {value!r}")
        if positive and x <= 0:
            raise self.fail(where, f"{name} must be > 0, got {value!r}")
        if not positive and x < 0:
            raise self.fail(where, f"{name} must be >= 0, got {value!r}")
        return x

    def number_list(
        self, d: Mapping[str, Any], key: str, where: str, prefix: str, *, positive: bool
    ) -> tuple[float, ...]:
        name = prefix + key
        raw = d.get(key)
        if not isinstance(raw, list) or not raw:
            raise self.fail(where, f"{name} must be a non-empty list, got {raw!r}")
        return tuple(
            self.check_number(x, f"{name}[{i}]", where, positive=positive)
            for i, x in enumerate(raw)
        )

    def link(self, raw: Any, where: str, name: str) -> Link:
        if not isinstance(raw, Mapping):
            raise self.fail(where, f"{name} must be a mapping, got {raw!r}")
        self.known_keys(raw, {"bandwidth_mbps", "latency_ms"}, where)
        return Link(
            bandwidth_mbps=self.number(raw, "bandwidth_mbps", where, name + "."),
            latency_ms=self.number(raw, "latency_ms", where, name + ".", positive=False),
        )

    def profile(self, raw: Any, where: str) -> DeviceProfile:
        if not isinstance(raw, Mapping):
            raise self.fail(where, f"profile must be a mapping, got {raw!r}")
        self.known_keys(
            raw,
            {
                "prefill_tokens",
                "layer_prefill_s",
                "layer_decode_s",
                "embed_s",
                "head_prefill_s",
                "head_decode_s",
                "pass_s",
                "io_s_per_mb",
            },
            where,
        )
        pre = "profile."
        tokens = self.number_list(raw, "prefill_tokens", where, pre, positive=True)
        if any(t != int(t) for t in tokens):
            raise self.fail(where, f"profile.prefill_tokens must be integers, got {list(tokens)}")
        if any(b <= a for a, b in itertools.pairwise(tokens)):
            raise self.fail(
                where, f"profile.prefill_tokens must be strictly increasing, got {list(tokens)}"
            )
        prefill = self.number_list(raw, "layer_prefill_s", where, pre, positive=False)
        if len(prefill) != len(tokens):
            raise self.fail(
                where,
                f"profile.layer_prefill_s must have one value per prefill_tokens entry "
                f"({len(tokens)}), got {len(prefill)}",
            )
        return DeviceProfile(
            prefill_tokens=tuple(int(t) for t in tokens),
            layer_prefill_s=prefill,
            layer_decode_s=self.number_list(raw, "layer_decode_s", where, pre, positive=False),
            embed_s=self.number(raw, "embed_s", where, pre, positive=False),
            head_prefill_s=self.number(raw, "head_prefill_s", where, pre, positive=False),
            head_decode_s=self.number_list(raw, "head_decode_s", where, pre, positive=False),
            pass_s=self.number(
                raw, "pass_s", where, pre, positive=False, required=False, default=0.0
            ),
            io_s_per_mb=self.number(
                raw, "io_s_per_mb", where, pre, positive=False, required=False, default=0.0
            ),
        )

    def hardware(self, raw: Any, where: str) -> Hardware:
        if not isinstance(raw, Mapping):
            raise self.fail(where, f"hardware must be a mapping, got {raw!r}")
        self.known_keys(raw, {"tflops", "mem_bw_gbps", "efficiency"}, where)
        pre = "hardware."
        eff = self.number(raw, "efficiency", where, pre, required=False, default=0.5)
        if eff > 1:
            raise self.fail(where, f"hardware.efficiency must be <= 1, got {raw['efficiency']!r}")
        return Hardware(
            tflops=self.number(raw, "tflops", where, pre),
            mem_bw_gbps=self.number(raw, "mem_bw_gbps", where, pre),
            efficiency=eff,
        )

    def device(self, raw: Any, n: int, defaults: Link | None) -> Device:
        if not isinstance(raw, Mapping):
            raise self.fail(f"devices[{n}]", f"must be a mapping, got {raw!r}")
        dev_id = raw.get("id")
        if not isinstance(dev_id, str) or not dev_id:
            raise self.fail(f"devices[{n}]", f"id must be a non-empty string, got {dev_id!r}")
        where = f"device {dev_id!r}"
        self.known_keys(raw, {"id", "memory_mb", "link", "profile", "hardware"}, where)
        memory_mb = self.number(raw, "memory_mb", where)
        if raw.get("link") is not None:
            link = self.link(raw["link"], where, "link")
        elif defaults is not None:
            link = defaults
        elif not self.require_costs:
            link = ASSUMED_LINK
        else:
            raise self.fail(where, "link is required when there are no link_defaults")
        profile = self.profile(raw["profile"], where) if raw.get("profile") is not None else None
        hardware = (
            self.hardware(raw["hardware"], where) if raw.get("hardware") is not None else None
        )
        if profile is None and hardware is None and self.require_costs:
            raise self.fail(where, "needs a profile or hardware figures, got neither")
        return Device(dev_id, memory_mb, link, profile, hardware)
