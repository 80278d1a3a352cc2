"""`e2llm monitor` against a real cluster: what it reports is what happened.

One LocalCluster (Mosquitto, orchestrator, 4 agents as processes) for the module; the
monitor runs as a user would run it (`python -m e2llm_edge.cli monitor ...`).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from e2llm_edge.client import Client, collect
from e2llm_edge.ops.demo import bundled_inventory
from e2llm_edge.ops.localcluster import LocalCluster, pinned_prefill_decoder

pytestmark = [pytest.mark.model, pytest.mark.mosquitto, pytest.mark.slow, pytest.mark.timeout(240)]

N_REQUESTS = 3
PROMPTS = ["Name a colour.", "What is 2 + 2?", "Say hello in French."]
E2LLM = [sys.executable, "-m", "e2llm_edge.cli"]


@pytest.fixture(scope="module")
def cluster(
    default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    inventory = yaml.safe_load(bundled_inventory().read_text())
    with LocalCluster(
        default_model,
        inventory,
        cluster="mon",
        verbose=False,
        workdir=tmp_path_factory.mktemp("mon-cluster"),
        # both roles on screen: pinned (the role search may pick mixed replicas here)
        orchestrator_args=[
            "--plan",
            str(
                pinned_prefill_decoder(
                    tmp_path_factory.mktemp("plan") / "plan.yaml",
                    ("pi-a", "jetson"),
                    ("pi-b", "minipc"),
                    30,
                )
            ),
        ],
    ) as c:
        c.wait_serving(timeout=150)
        yield c


def _cli(c: LocalCluster, *args: str) -> list[str]:
    assert c.broker_url is not None
    return [
        *E2LLM,
        *args,
        "--broker",
        c.broker_url,
        "--cluster",
        c.cluster,
        *c.login_args("monitor"),
    ]


def _lines(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


async def _requests(c: LocalCluster) -> list[dict[str, Any]]:
    async with Client(c.bus_config()) as client:
        return list(
            await asyncio.gather(
                *[collect(client, p, max_new_tokens=8) for p in PROMPTS[:N_REQUESTS]]
            )
        )


@pytest.fixture(scope="module")
def watched(cluster: LocalCluster) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict]:
    """Monitor (--json) running while N requests go through: (lines, results, baseline)."""
    before = _lines(
        subprocess.run(
            _cli(cluster, "monitor", "--json", "--once"),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    )[-1]
    mon = subprocess.Popen(
        _cli(cluster, "monitor", "--json", "--interval", "0.5", "--duration", "9"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert mon.stdout is not None
        first = mon.stdout.readline()  # subscribed and running before requests start
        assert json.loads(first)["type"] == "snapshot", first
        results = asyncio.run(_requests(cluster))
        out, err = mon.communicate(timeout=60)
    finally:
        if mon.poll() is None:
            mon.kill()
    assert mon.returncode == 0, err
    return [json.loads(first), *_lines(out)], results, before


def test_monitor_reports_devices_roles_and_plan(
    cluster: LocalCluster, watched: tuple[list[dict[str, Any]], list, dict]
) -> None:
    lines, _, _ = watched
    snap = lines[-1]
    assert snap["type"] == "snapshot"
    plan = cluster.wait_serving(timeout=10)
    expected = {
        s.device_id: (r.role, r.replica_id, [s.layer_start, s.layer_end])
        for r in plan.replicas
        for s in r.stages
    }
    assert set(snap["devices"]) == {d["id"] for d in cluster.inventory["devices"]}
    assert len(snap["devices"]) == 4
    for dev, row in snap["devices"].items():
        assert row["status"] == "ready", (dev, row)
        assert (row["role"], row["replica"], row["layers"]) == expected[dev]
        assert row["mem_bytes"] > 0 and row["telemetry"], (dev, row)
    assert snap["plan_version"] == plan.version
    assert sorted(r["role"] for r in snap["replicas"]) == sorted(r.role for r in plan.replicas)
    assert {r["role"] for r in snap["replicas"]} == {"prefill", "decoder"}
    assert all(r["ready"] for r in snap["replicas"])
    assert snap["orchestrator"]["status"] == "online"
    assert snap["cluster_summary"]["serving"] is True


def test_monitor_counts_the_requests_that_completed(
    watched: tuple[list[dict[str, Any]], list[dict[str, Any]], dict],
) -> None:
    lines, results, before = watched
    events = [x for x in lines if x["type"] == "event"]
    by_rid: dict[str, list[str]] = {}
    for e in events:
        by_rid.setdefault(e["request_id"], []).append(e["event"])
    assert len(by_rid) == N_REQUESTS
    for rid, evs in by_rid.items():
        assert evs[0] == "queued" and evs[-1] == "done", (rid, evs)
        assert {"routed", "first_token"} <= set(evs), (rid, evs)
    snap = lines[-1]
    base = before["cluster_summary"]["completed"] or 0
    assert snap["cluster_summary"]["completed"] == base + N_REQUESTS
    assert snap["cluster_summary"]["failed"] == (before["cluster_summary"]["failed"] or 0)
    req = snap["requests"]
    assert (req["done"], req["failed"], req["open"]) == (N_REQUESTS, 0, 0)
    # the waiting times it shows are the ones the clients were told
    told = sorted(r["stats"]["ttft_s"] for r in results)
    assert req["ttft_s"]["n"] == N_REQUESTS
    assert req["ttft_s"]["max"] == pytest.approx(told[-1], abs=1e-3)
    done = {e["request_id"]: e["data"] for e in events if e["event"] == "done"}
    assert sorted(d["new_tokens"] for d in done.values()) == sorted(
        len(r["new_ids"]) for r in results
    )
    assert snap["cluster_summary"]["tokens_out"] - (
        before["cluster_summary"]["tokens_out"] or 0
    ) == sum(len(r["new_ids"]) for r in results)
    # request events never carry user text
    texts = [r["text"] for r in results] + PROMPTS
    assert not any(t and t in json.dumps(e) for e in events for t in texts)


def test_live_view_renders_the_cluster(cluster: LocalCluster) -> None:
    out = subprocess.run(
        _cli(cluster, "monitor", "--once"), capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for dev in ("pi-a", "pi-b", "jetson", "minipc"):
        assert dev in out
    assert "PREFILL" in out and "DECODER" in out and "serving" in out


def test_health_reads_the_retained_state(cluster: LocalCluster) -> None:
    def health(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            _cli(cluster, "health", *args), capture_output=True, text=True, timeout=30
        )

    t0 = time.monotonic()
    ok = health("--device-id", "jetson", "--status", "ready")
    assert ok.returncode == 0, ok.stderr
    assert "jetson: ready" in ok.stdout
    assert health("--orchestrator", "--serving").returncode == 0
    missing = health("--device-id", "no-such-device", "--timeout", "1")
    assert missing.returncode == 1 and "no retained state" in missing.stderr
    assert time.monotonic() - t0 < 20
