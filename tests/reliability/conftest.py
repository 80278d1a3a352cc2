"""Fixtures of the reliability tests: the chaos script's code, and one small cluster
shared by the fuzz and soak modules (abandoned requests are freed after 6 s there)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from e2llm_edge.ops.broker import MosquittoBroker
from e2llm_edge.ops.localcluster import LocalCluster

BENCH = Path(__file__).resolve().parents[2] / "bench"
AGENT_REQUEST_TIMEOUT = 6.0


@pytest.fixture(scope="session")
def chaos() -> ModuleType:
    """`bench/chaos.py`, the script users run, imported as a module."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import chaos as mod

    return mod


@pytest.fixture(scope="session")
def soak() -> ModuleType:
    """`bench/soak.py` as a module."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import soak as mod

    return mod


@pytest.fixture(scope="package")
def small(mosquitto: MosquittoBroker, default_model: Path) -> Iterator[LocalCluster]:
    """Two agents, each holding the whole model: a PREFILL and a DECODER replica."""
    inv = {
        "link_defaults": {"bandwidth_mbps": 1000, "latency_ms": 0.5},
        "devices": [
            {"id": d, "memory_mb": 4000, "hardware": {"tflops": 0.1, "mem_bw_gbps": 10}}
            for d in ("s0", "s1")
        ],
    }
    with LocalCluster(
        default_model,
        inv,
        broker_url=mosquitto.url,
        cluster="reliab",
        agent_args=["--request-timeout", str(AGENT_REQUEST_TIMEOUT)],
    ) as c:
        c.wait_serving(timeout=180)
        yield c
