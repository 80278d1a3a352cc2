"""The device registry: what the fog node knows of each device, from its retained state and
profile, its heartbeats and its last-will. Pure: times are passed in.

It also turns live profiles (plus the optional inventory file's figures for the same
device: links, hardware) into a planner `Inventory`, leaving out any device whose profile
the planner would reject, so one bad device never stops planning for the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from e2llm_edge.wire.messages import DeviceProfileMsg, DeviceState, DeviceStatus
from planner import Inventory
from planner.errors import InventoryError

DEFAULT_LINK = {"bandwidth_mbps": 1000.0, "latency_ms": 0.5}
"""Link figures assumed for a device that announces none and has no inventory entry."""


@dataclass
class DeviceEntry:
    state: DeviceState | None = None
    profile: DeviceProfileMsg | None = None
    last_seen: float = 0.0
    """Last message of any kind, retained ones included (the clock for silence)."""
    live_at: float = 0.0
    """Last live (not retained) message: proof its subscriptions are in place."""

    @property
    def status(self) -> DeviceStatus | None:
        return self.state.status if self.state is not None else None


@dataclass
class Registry:
    """Devices by id. `lost` holds devices declared lost until they are heard again."""

    inventory_file: Mapping[str, Any] = field(default_factory=dict)
    """The operator's inventory (links, hardware, memory) keyed into by device id."""
    devices: dict[str, DeviceEntry] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)

    def state(self, dev: str, msg: DeviceState, now: float, *, retained: bool) -> DeviceEntry:
        entry = self.devices.setdefault(dev, DeviceEntry())
        entry.state, entry.last_seen = msg, now
        if not retained:
            entry.live_at = now
        return entry

    def profile(self, dev: str, msg: DeviceProfileMsg, now: float) -> bool:
        """Record a profile; True if this device had none (planning may change)."""
        entry = self.devices.setdefault(dev, DeviceEntry())
        known = entry.profile is not None
        entry.profile, entry.last_seen = msg, now
        return not known

    def heard(self, dev: str, now: float) -> None:
        """A live message from a known device; unknown senders never grow the registry."""
        entry = self.devices.get(dev)
        if entry is not None:
            entry.last_seen = entry.live_at = now

    def status(self, dev: str) -> DeviceStatus | None:
        entry = self.devices.get(dev)
        return entry.status if entry is not None else None

    def silent(self, devs: Iterable[str], now: float, timeout: float) -> list[tuple[str, float]]:
        """Devices of `devs` (not already lost) unheard for more than `timeout` seconds."""
        out = []
        for d in sorted(set(devs) - self.lost):
            entry = self.devices.get(d)
            seen = entry.last_seen if entry is not None else 0.0
            if now - seen > timeout:
                out.append((d, now - seen))
        return out

    def touch_all(self, now: float) -> None:
        """After our own reconnect: nobody's silence so far is their fault."""
        for e in self.devices.values():
            e.last_seen = now

    def ready_for(self, devs: Iterable[str], version: int, heard_since: float) -> bool:
        """Every device is READY for plan `version` and has been heard live since."""
        for d in devs:
            e = self.devices.get(d)
            st = e.state if e is not None else None
            if st is None or st.status != DeviceStatus.READY or st.plan_version != version:
                return False
            if e is None or e.live_at < heard_since:
                return False
        return True

    def available(self) -> list[str]:
        """Devices that can be planned with: announced a profile, not lost, not offline."""
        return sorted(
            d
            for d, e in self.devices.items()
            if e.profile is not None
            and d not in self.lost
            and (e.state is None or e.state.status != DeviceStatus.OFFLINE)
        )

    def inventory(self, device_ids: Iterable[str]) -> tuple[Inventory, list[str]]:
        """Live profiles over the inventory file's figures for the same device; returns the
        inventory and one line per device left out (its profile or figures are invalid)."""
        by_id = {d.get("id"): d for d in self.inventory_file.get("devices", []) or []}
        defaults = self.inventory_file.get("link_defaults", DEFAULT_LINK)
        usable, problems = [], []
        for d in device_ids:
            prof = self.devices[d].profile
            assert prof is not None
            entry: dict[str, Any] = dict(by_id.get(d, {"id": d}))
            entry["id"] = d
            entry["memory_mb"] = prof.memory_mb or entry.get("memory_mb")
            if prof.profile is not None:
                entry["profile"] = prof.profile.costs()
            if prof.hardware is not None and "profile" not in entry:
                entry["hardware"] = {
                    "tflops": prof.hardware.tflops,
                    "mem_bw_gbps": prof.hardware.mem_bw_gbps,
                    "efficiency": prof.hardware.efficiency,
                }
            if prof.link is not None:
                entry["link"] = {
                    "bandwidth_mbps": prof.link.bandwidth_mbps,
                    "latency_ms": prof.link.latency_ms,
                }
            try:
                Inventory.from_dict(
                    {"link_defaults": defaults, "devices": [entry]}, source="live registry"
                )
            except InventoryError as exc:
                problems.append(f"{d} left out of the plan: {exc}")
                continue
            usable.append(entry)
        inv = Inventory.from_dict(
            {"link_defaults": defaults, "devices": usable}, source="live registry"
        )
        return inv, problems
