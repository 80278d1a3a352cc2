"""Prometheus metrics of the gateway: its own request figures, and the cluster as the
topics tell it.

The gateway measures what only it sees (HTTP status, time to first token, time between
tokens and end to end as the caller experiences them, tokens served). Everything about
the cluster (queue, throughput, per-device state) is read at scrape time from a
``ClusterView`` fed by the same retained and telemetry topics as `e2llm monitor`: the
topics stay the source, this is a view of them for people who run Prometheus/Grafana.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from e2llm_edge.ops.monitor import ClusterView
from e2llm_edge.wire.messages import DeviceStatus

# Latency buckets from a fast local answer to a slow edge pipeline after a queue.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TBT_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2.5)

DEVICE_STATUSES = (*(s.value for s in DeviceStatus), "unknown")

# Device telemetry counters exported as Prometheus counters (name in the agent's
# telemetry -> metric suffix); the one place that reads that dict's keys.
_DEVICE_COUNTERS = {
    "prefills": "prefills",
    "decode_steps": "decode_steps",
    "kv_bytes_in": "kv_bytes_in",
    "kv_bytes_out": "kv_bytes_out",
    "errors": "errors",
    "rejected": "rejected",
    "released": "released",
    "timed_out": "timed_out",
}


class GatewayMetrics:
    """The gateway's metrics in their own registry (several gateways per process in tests)."""

    def __init__(self, view: ClusterView | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "e2llm_gateway_requests",
            "HTTP requests answered, by endpoint and status (499: the client went away)",
            ["endpoint", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "e2llm_gateway_ttft_seconds",
            "arrival at the gateway to the first token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tbt = Histogram(
            "e2llm_gateway_tbt_seconds",
            "time between consecutive tokens of a response",
            ["endpoint"],
            buckets=_TBT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "e2llm_gateway_e2e_seconds",
            "arrival at the gateway to the last token",
            ["endpoint"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "e2llm_gateway_tokens",
            "tokens through the gateway (prompt, completion); rate() is tokens/s",
            ["kind"],
            registry=r,
        )
        self.in_flight = Gauge(
            "e2llm_gateway_in_flight", "requests the gateway is serving now", registry=r
        )
        if view is not None:
            r.register(ClusterCollector(view))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class ClusterCollector(Collector):
    """Reads a ClusterView at scrape time; nothing is stored twice."""

    def __init__(self, view: ClusterView) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        return []  # the device set changes at run time: no fixed description

    def collect(self) -> Iterator[Metric]:
        yield from cluster_metrics(self.view)


def _g(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def cluster_metrics(view: ClusterView) -> list[Metric]:
    """The cluster's figures as Prometheus metric families (cluster summary, devices)."""
    s: dict[str, Any] = dataclasses.asdict(view.summary) if view.summary is not None else {}
    out: list[Metric] = []
    orch = view.orchestrator
    up = _g("e2llm_orchestrator_up", "1 when the orchestrator's retained state says online")
    up.add_metric([], 1.0 if orch is not None and orch.status == "online" else 0.0)
    out.append(up)
    for key, doc in (
        ("serving", "1 while the cluster serves a plan"),
        ("plan_version", "version of the plan in force"),
        ("queued", "requests waiting in the orchestrator's queue"),
        ("in_flight", "requests the cluster is running now"),
    ):
        g = _g(f"e2llm_cluster_{key}", doc)
        if key in s and s[key] is not None:
            g.add_metric([], float(s[key]))
        out.append(g)
    for key, doc in (
        ("completed", "requests the orchestrator completed"),
        ("failed", "requests the orchestrator failed"),
        ("tokens_out", "tokens the cluster generated"),
    ):
        c = CounterMetricFamily(f"e2llm_cluster_{key}", doc)
        if isinstance(s.get(key), int):
            c.add_metric([], float(s[key]))
        out.append(c)
    tps = _g("e2llm_cluster_tokens_per_second", "cluster output over the last summaries")
    rate = view.throughput()
    if rate is not None:
        tps.add_metric([], rate)
    out.append(tps)

    dev_l = ["device"]
    status = _g("e2llm_device_status", "1 for the device's current status", [*dev_l, "status"])
    info = _g("e2llm_device_info", "role, replica, layers", [*dev_l, "role", "replica", "layers"])
    gauges = {
        "queue_depth": _g("e2llm_device_queue_depth", "messages waiting on the device", dev_l),
        "in_flight": _g("e2llm_device_in_flight", "requests holding state on the device", dev_l),
        "tokens_per_s": _g("e2llm_device_tokens_per_second", "the device's token rate", dev_l),
        "mem_bytes": _g("e2llm_device_memory_bytes", "resident memory of the agent", dev_l),
    }
    budget = _g("e2llm_device_memory_budget_bytes", "memory budget announced", dev_l)
    counters = {
        key: CounterMetricFamily(f"e2llm_device_{suffix}", f"device telemetry: {key}", labels=dev_l)
        for key, suffix in _DEVICE_COUNTERS.items()
    }
    for dev, row in view.device_rows().items():
        for st in DEVICE_STATUSES:
            status.add_metric([dev, st], 1.0 if row["status"] == st else 0.0)
        layers = row["layers"]
        info.add_metric(
            [
                dev,
                row["role"] or "",
                "" if row["replica"] is None else str(row["replica"]),
                f"{layers[0]}-{layers[1] - 1}" if layers else "",
            ],
            1.0,
        )
        for key, fam in gauges.items():
            if row[key] is not None:
                fam.add_metric([dev], float(row[key]))
        if row["memory_mb"]:
            budget.add_metric([dev], float(row["memory_mb"]) * 1e6)
        tel = row["telemetry"]
        for key, counter in counters.items():
            if isinstance(tel.get(key), int | float):
                counter.add_metric([dev], float(tel[key]))
    out += [status, info, *gauges.values(), budget, *counters.values()]
    return out
