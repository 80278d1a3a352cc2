"""Inventory loading, interpolation, and validation messages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from planner_factories import hardware_device, profile_device

from planner import InventoryError, load_inventory
from planner.inventory import ASSUMED_LINK, Inventory, Link, hop_s

GOOD = """
link_defaults: {bandwidth_mbps: 920, latency_ms: 1.0}
devices:
  - id: pi-1
    memory_mb: 300
    link: {bandwidth_mbps: 100, latency_ms: 2.0}
    profile:
      prefill_tokens: [16, 64, 256, 1024]
      layer_prefill_s: [0.001, 0.003, 0.010, 0.040]
      layer_decode_s: [0.001, 0.0012, 0.0015]
      embed_s: 0.0001
      head_prefill_s: 0.002
      head_decode_s: [0.002, 0.0025]
  - id: pi-2
    memory_mb: 512
    hardware: {tflops: 1.5, mem_bw_gbps: 8.0}
"""


def test_loads_yaml_file_with_defaults(tmp_path: Path) -> None:
    path = tmp_path / "devices.yaml"
    path.write_text(GOOD)
    inv = load_inventory(path)
    assert [d.id for d in inv.devices] == ["pi-1", "pi-2"]
    assert inv.device("pi-1").link == Link(100, 2.0)
    assert inv.device("pi-2").link == Link(920, 1.0)  # from link_defaults
    hw = inv.device("pi-2").hardware
    assert hw is not None and hw.efficiency == 0.5
    assert inv.device("pi-2").memory_bytes == 512e6
    assert Inventory.from_dict(inv.to_dict()).devices == inv.devices


def test_profile_interpolation_and_extrapolation(tmp_path: Path) -> None:
    path = tmp_path / "devices.yaml"
    path.write_text(GOOD)
    p = load_inventory(path).device("pi-1").profile
    assert p is not None
    assert p.layer_prefill(64) == pytest.approx(0.003)
    assert p.layer_prefill(160) == pytest.approx(0.0065)  # halfway between 64 and 256
    assert p.layer_prefill(2048) == pytest.approx(0.040 + 0.030 / 768 * 1024)  # beyond last
    assert p.layer_prefill(4) == pytest.approx(0.001)  # below the first sample: floor
    assert p.layer_decode(2) == pytest.approx(0.0012)
    assert p.layer_decode(5) == pytest.approx(0.0015 + 2 * 0.0003)  # from the last two
    assert p.head_decode(4) == pytest.approx(0.0025 + 2 * 0.0005)


def test_hop_goes_through_the_broker() -> None:
    a, b = Link(100, 2.0), Link(1000, 0.5)
    nbytes = 1_000_000
    assert hop_s(a, b, nbytes) == pytest.approx(0.002 + 0.08 + 0.0005 + 0.008)


def _with(dev: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = dict(dev)
    out.update(changes)
    return out


BASE = hardware_device("pi-2", 300, 1.0, 8.0)
PROF = profile_device("pi-3", 300, 1.0)


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ([_with(BASE, memory_mb=-3)], "devices.yaml: device 'pi-2': memory_mb must be > 0, got -3"),
        ([_with(BASE, memory_mb="lots")], "device 'pi-2': memory_mb must be a number, got 'lots'"),
        (
            [_with(BASE, link={"bandwidth_mbps": 0, "latency_ms": 1})],
            "device 'pi-2': link.bandwidth_mbps must be > 0, got 0",
        ),
        (
            [_with(BASE, link={"bandwidth_mbps": 10, "latency_ms": -1})],
            "device 'pi-2': link.latency_ms must be >= 0, got -1",
        ),
        (
            [{k: v for k, v in BASE.items() if k != "link"}],
            "device 'pi-2': link is required when there are no link_defaults",
        ),
        (
            [{k: v for k, v in BASE.items() if k != "hardware"}],
            "device 'pi-2': needs a profile or hardware figures, got neither",
        ),
        (
            [_with(BASE, hardware={"tflops": 1, "mem_bw_gbps": -8})],
            "device 'pi-2': hardware.mem_bw_gbps must be > 0, got -8",
        ),
        (
            [_with(BASE, hardware={"tflops": 1, "mem_bw_gbps": 8, "efficiency": 1.5})],
            "device 'pi-2': hardware.efficiency must be <= 1, got 1.5",
        ),
        ([_with(BASE, memroy_mb=3)], "device 'pi-2': unknown field 'memroy_mb'"),
        ([BASE, BASE], "device 'pi-2': id is duplicated"),
        ([_with(BASE, id="")], "devices[0]: id must be a non-empty string"),
        (
            [_with(PROF, profile={**PROF["profile"], "prefill_tokens": [16, 16, 256, 1024]})],
            "device 'pi-3': profile.prefill_tokens must be strictly increasing",
        ),
        (
            [_with(PROF, profile={**PROF["profile"], "layer_prefill_s": [0.1, 0.2]})],
            "device 'pi-3': profile.layer_prefill_s must have one value per prefill_tokens entry",
        ),
        (
            [_with(PROF, profile={**PROF["profile"], "layer_decode_s": [0.1, -0.2]})],
            "device 'pi-3': profile.layer_decode_s[1] must be >= 0, got -0.2",
        ),
        (
            [_with(PROF, profile={**PROF["profile"], "head_decode_s": []})],
            "device 'pi-3': profile.head_decode_s must be a non-empty list",
        ),
    ],
)
def test_validation_names_source_device_field_and_value(
    devices: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(InventoryError) as err:
        Inventory.from_dict({"devices": devices}, source="devices.yaml")
    assert message in str(err.value)
    assert str(err.value).startswith("devices.yaml: ")


def test_empty_and_malformed_inventories() -> None:
    with pytest.raises(InventoryError, match="devices must be a non-empty list"):
        Inventory.from_dict({"devices": []}, source="x.yaml")
    with pytest.raises(InventoryError, match="expected a mapping"):
        Inventory.from_dict([1, 2], source="x.yaml")  # type: ignore[arg-type]


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match="cannot read"):
        load_inventory(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [\n")
    with pytest.raises(InventoryError, match=r"bad\.yaml: not valid YAML"):
        load_inventory(bad)


def test_packaged_paper_testbed_loads() -> None:
    from planner.sim.paper import paper_inventory

    inv = paper_inventory()
    assert len(inv) == 7
    assert {d.id for d in inv.devices} >= {"rtx5070", "m1-a", "m2max-a", "orin-agx"}


MINIMAL = """
devices:
  - id: pi-1
    memory_mb: 300
  - id: pi-2
    memory_mb: 512
    link: {bandwidth_mbps: 100, latency_ms: 2.0}
"""


def test_minimal_inventory_is_for_the_orchestrator_only(tmp_path: Path) -> None:
    """Devices with only id and memory_mb: their agents announce profile and link live, so
    the orchestrator accepts them; the planner, which must cost them, does not."""
    path = tmp_path / "devices.yaml"
    path.write_text(MINIMAL)
    inv = load_inventory(path, require_costs=False)
    assert [(d.id, d.memory_mb) for d in inv.devices] == [("pi-1", 300), ("pi-2", 512)]
    assert inv.device("pi-1").link == ASSUMED_LINK
    assert inv.device("pi-2").link == Link(100, 2.0)
    assert inv.device("pi-1").profile is None and inv.device("pi-1").hardware is None
    with pytest.raises(InventoryError, match="device 'pi-1': link is required"):
        load_inventory(path)


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ([{"id": "pi-1", "memroy_mb": 300}], "device 'pi-1': unknown field 'memroy_mb'"),
        ([{"id": "pi-1"}], "device 'pi-1': memory_mb is required"),
        ([{"id": "pi-1", "memory_mb": 0}], "device 'pi-1': memory_mb must be > 0, got 0"),
        ([{"memory_mb": 1}], "devices[0]: id must be a non-empty string"),
        (
            [{"id": "pi-1", "memory_mb": 1, "hardware": {"tflops": 1}}],
            "device 'pi-1': hardware.mem_bw_gbps is required",
        ),
    ],
)
def test_minimal_inventory_still_checks_every_field_it_has(
    devices: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(InventoryError) as err:
        Inventory.from_dict({"devices": devices}, source="devices.yaml", require_costs=False)
    assert str(err.value).startswith("devices.yaml: ") and message in str(err.value)
