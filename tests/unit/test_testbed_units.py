"""The testbed's parts that need no root: the inventory format (every error names the file,
the device and the field), the delay relay on loopback, the metrics and the goals."""

from __future__ import annotations

import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2llm_edge.ops.testbed import compare, relay
from e2llm_edge.ops.testbed.inventory import (
    TestbedError,
    TestbedInventory,
    bundled_inventory,
    load_testbed_inventory,
)
from e2llm_edge.ops.testbed.run import cpu_table, goals

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results" / "testbed.json"


def doc(**over: Any) -> dict[str, Any]:
    dev = {
        "id": "pi-a",
        "cpu_percent": 30,
        "memory_mb": 600,
        "budget_mb": 250,
        "link": {"bandwidth_mbps": 100, "latency_ms": 2},
    }
    return {"devices": [{**dev, **over}]}


def test_bundled_inventory_fits_this_kind_of_machine() -> None:
    inv = load_testbed_inventory(bundled_inventory())
    assert 6 <= len(inv.devices) <= 8
    assert inv.cpu_percent_total <= 200
    inv.check_fits(cpus=2)
    links = {(d.link.bandwidth_mbps, d.link.latency_ms) for d in inv.devices}
    assert {(1000, 0.3), (50, 5)} <= links
    # no device may be able to hold the model (the planner counts ~651 MB of fp32 weights)
    assert max(d.budget_mb for d in inv.devices) < 651


def test_the_qwen_inventory_needs_two_devices_per_replica() -> None:
    """The real model's inventory: the same devices, the quantized graph, budgets below
    the ~690 MB the planner counts for Qwen2.5-Coder-0.5B Q4_K_M in contrib/exact (24
    layers of 15-17.5 MB, embedding and head 153 MB each), and above half of it."""
    qwen = load_testbed_inventory(bundled_inventory().with_name("testbed-qwen05.yaml"))
    base = load_testbed_inventory(bundled_inventory())
    qwen.check_fits(cpus=2)
    assert (qwen.graph, qwen.precision) == ("contrib", "exact")
    assert [(d.id, d.cpu_percent, d.link) for d in qwen.devices] == [
        (d.id, d.cpu_percent, d.link) for d in base.devices
    ]
    budgets = sorted(d.budget_mb for d in qwen.devices)
    assert budgets[-1] < 690 and budgets[-1] + budgets[-2] > 690


@pytest.mark.parametrize(
    ("over", "words"),
    [
        ({"cpu_percent": -5}, ["device pi-a", "cpu_percent", "-5"]),
        ({"memory_mb": "lots"}, ["device pi-a", "memory_mb", "'lots'"]),
        ({"budget_mb": 700}, ["device pi-a", "budget_mb", "memory_mb"]),
        ({"link": {"bandwidth_mbps": 0, "latency_ms": 1}}, ["device pi-a: link", "bandwidth_mbps"]),
        ({"link": {"bandwidth_mbps": 10, "latency_ms": 1, "jitter": 2}}, ["link", "'jitter'"]),
        ({"id": "Pi A"}, ["devices[0]", "id", "'Pi A'"]),
        ({"id": "fog"}, ["device fog", "reserved"]),
        ({"gpu": True}, ["device pi-a", "unknown field 'gpu'"]),
    ],
)
def test_inventory_errors_name_file_device_and_field(
    tmp_path: Path, over: dict[str, Any], words: list[str]
) -> None:
    p = tmp_path / "bed.yaml"
    p.write_text(yaml.safe_dump(doc(**over)))
    with pytest.raises(TestbedError) as exc:
        load_testbed_inventory(p)
    msg = str(exc.value)
    assert str(p) in msg
    for w in words:
        assert w in msg, msg


def test_each_device_gets_the_shortest_cpu_period_its_share_allows() -> None:
    """A 1 ms quota (the kernel's least) over the period that gives the share: bursts at
    full speed last at most 1 ms. `cpu_period_ms` sets one period for every device."""
    dev = doc()["devices"][0]
    shares = [("a", 50), ("b", 10), ("c", 35), ("d", 5)]
    devices = [{**dev, "id": i, "cpu_percent": pct} for i, pct in shares]
    inv = TestbedInventory.from_dict({"devices": devices}, source="x.yaml")
    periods = [inv.period_us(d) for d in inv.devices]
    assert periods == [2000, 10000, 2858, 20000]
    assert [d.quota_us(p) for d, p in zip(inv.devices, periods, strict=True)] == [1000] * 4
    assert TestbedInventory.from_dict(inv.to_dict(), source="x.yaml") == inv
    fixed = TestbedInventory.from_dict(
        {"cpu_period_ms": 10, "devices": devices[:3]}, source="x.yaml"
    )
    assert [fixed.period_us(d) for d in fixed.devices] == [10000] * 3
    assert TestbedInventory.from_dict(fixed.to_dict(), source="x.yaml") == fixed
    with pytest.raises(TestbedError, match=r"x\.yaml: device d: cpu_percent 5 .* 1 ms"):
        TestbedInventory.from_dict({"cpu_period_ms": 10, "devices": devices}, source="x.yaml")


def test_inventory_rejects_shares_beyond_the_machine_and_duplicates() -> None:
    dev = doc()["devices"][0]
    busy = {"devices": [{**dev, "cpu_percent": 80}, {**dev, "id": "pi-b", "cpu_percent": 80}]}
    inv = TestbedInventory.from_dict(busy, source="x.yaml")
    inv.check_fits(cpus=2)
    with pytest.raises(TestbedError, match=r"x.yaml: cpu_percent adds up to 160% .* 1 core"):
        inv.check_fits(cpus=1)
    with pytest.raises(TestbedError, match=r"x\.yaml: device pi-a: id used twice"):
        TestbedInventory.from_dict({"devices": [dev, dev]}, source="x.yaml")
    again = TestbedInventory.from_dict(inv.to_dict(), source="x.yaml")
    assert again == inv


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_relay_adds_its_delay_each_way_and_passes_bytes_intact() -> None:
    srv, echo_port = _echo_server()
    listen = ("127.0.0.1", _free_port())
    stop = threading.Event()
    threading.Thread(
        target=relay.serve, args=(listen, ("127.0.0.1", echo_port), 0.004, stop), daemon=True
    ).start()
    deadline = time.monotonic() + 5
    while True:
        try:
            s = socket.create_connection(listen, timeout=1)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with s, srv:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for i in range(15):
            t0 = time.perf_counter()
            s.sendall(bytes([i]) * 16)
            assert _recv_exactly(s, 16) == bytes([i]) * 16
            rtts.append(time.perf_counter() - t0)
        # 4 ms each way: a round trip of ~8 ms, never less
        assert min(rtts) >= 0.008
        assert statistics.median(rtts) < 0.008 + 0.004
        blob = bytes(range(256)) * 4096  # 1 MiB crosses in order, unchanged
        s.sendall(blob)
        assert _recv_exactly(s, len(blob)) == blob
    stop.set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        assert chunk, "connection closed early"
        buf += chunk
    return bytes(buf)


def _run(method: str, rate: float, waiting: float, ttft_p99: float, n: int = 10) -> dict[str, Any]:
    rows = [
        compare.Measured(i, i / rate, i / rate + 3.0, 8, waiting, ttft_p99, 3.0) for i in range(n)
    ]
    measured = compare.measured_metrics(rows)
    return {
        "method": method,
        "rate": rate,
        "measured": measured,
        "fidelity": compare.fidelity(measured, measured),
        "sustained": compare.sustained(measured, rate, n),
    }


def test_metrics_and_goals() -> None:
    m = _run("e2llm", 0.5, 0.2, 1.0)["measured"]
    assert m["completed"] == 10 and m["waiting"]["mean"] == pytest.approx(0.2)
    assert m["tbt"]["mean"] == pytest.approx((3.0 - 1.0) / 7)
    assert m["throughput_rps"] == pytest.approx(10 / (9 / 0.5 + 3.0))
    runs = [
        _run("e2llm", 0.2, 0.1, 1.0),
        _run("splitwise", 0.2, 0.3, 1.2),
        _run("e2llm", 0.4, 0.2, 1.0),
        _run("splitwise", 0.4, 0.3, 1.0),
    ]
    g = goals(runs)["e2llm_vs_splitwise"]
    assert [c["waiting_ok"] for c in g["cells"]] == [True, False]
    assert not g["met"]


def test_fidelity_is_not_met_by_runs_that_never_served() -> None:
    """A method that found no plan is recorded, but proves nothing about the simulator."""
    none = goals([{"method": "e2llm", "rate": 0.5, "error": "no plan"}])["fidelity"]
    assert none["runs"] == 0 and not none["met"]
    ok = goals([_run("e2llm", 0.5, 0.2, 1.0)])["fidelity"]
    assert ok["runs"] == 1 and ok["met"]
    off = _run("pipeline", 0.5, 0.2, 1.0)
    predicted = {**off["measured"], "waiting": {**off["measured"]["waiting"], "mean": 0.3}}
    off["fidelity"] = compare.fidelity(off["measured"], predicted)
    miss = goals([off])["fidelity"]
    assert not miss["met"] and miss["misses"] == ["pipeline @ 0.5/s: waiting_mean +50%"]


def test_cpu_table_sets_each_device_beside_its_simulated_busy_time() -> None:
    run = _run("e2llm", 0.5, 0.2, 1.0)
    run["predicted"] = {"busy_s": {"a": 8.0, "b": 0.0}}
    run["devices"] = {
        "a": {"cpu_s": 3.0, "cpu_throttled_s": 0.5},
        "b": {"cpu_s": 0.01, "cpu_throttled_s": 0.0},  # idle: in no replica of the plan
    }
    run["counters"] = {"a": {"prefills": 0, "decode_batches": 100}, "b": {}}
    inv = {"devices": [{"id": "a", "cpu_percent": 25}, {"id": "b", "cpu_percent": 50}]}
    runs = [run, {"method": "pipeline", "rate": 0.5, "error": "no plan"}]
    lines = cpu_table({"inventory": inv, "runs": runs})
    assert len(lines) == 2
    # 3 CPU s at a 25% quota: 12 s of its clock, 4 s more than simulated over 100 passes
    assert lines[1].split() == ["e2llm", "0.5", "a", "3.00", "12.00", "8.00", "100", "40.0", "0.50"]


def test_sustained_allows_the_last_request_its_own_service() -> None:
    """Ten requests 2 s apart, each served in 3 s: kept up, though the makespan (21 s)
    is longer than the arrivals (18 s); served in 30 s each, it did not keep up."""
    assert _run("e2llm", 0.5, 0.2, 1.0)["sustained"]
    slow = [compare.Measured(i, 2.0 * i, 2.0 * i + 30.0, 8, 0.2, 1.0, 30.0) for i in range(10)]
    assert not compare.sustained(compare.measured_metrics(slow), 0.5, 10)


def test_predict_again_a_recorded_run(default_model: Path, tmp_path: Path) -> None:
    """`e2llm testbed predict` on the committed run: every run predicted again from its
    plan, profiles and stream, the measured figures recomputed from its requests."""
    out = tmp_path / "again.json"
    cli = [sys.executable, "-m", "e2llm_edge.cli", "testbed", "predict", "--model"]
    p = subprocess.run(
        [*cli, str(default_model), "--json", str(RESULTS), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr
    recorded, again = json.loads(RESULTS.read_text()), json.loads(out.read_text())
    assert len(again["runs"]) == len(recorded["runs"]) == 9
    for before, now in zip(recorded["runs"], again["runs"], strict=True):
        assert now["measured"] == before["measured"]
        # the cost model's KV budgets (what the router admits by, at run time too) refuse
        # some requests the emulated devices served: said, and counted, never dropped
        pred = now["predicted"]
        assert pred["completed"] + pred["failed"] == len(recorded["stream"])
        assert pred["completed"] > 0
        assert 0 < pred["ttft"]["mean"] < pred["e2e"]["mean"]
        if pred["completed"] < len(recorded["stream"]):
            assert f"the simulator serves {pred['completed']} of 24 requests" in p.stdout
    assert "extra ms/pass" in p.stdout and "goal simulator within 25%" in p.stdout
    bad = subprocess.run(
        [*cli, str(default_model), "--json", str(tmp_path / "none.json"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: ")
    assert "Traceback" not in bad.stderr
