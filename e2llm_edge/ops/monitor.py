"""`e2llm monitor` and `e2llm health`: watch a cluster through the topics a monitor may read.

`ClusterView` folds device state and telemetry, the plan, the orchestrator's state, the
cluster summary and request events into one snapshot; the live view draws it with rich,
`--json` streams snapshots and request events as JSON lines. Neither needs more than the
monitor's ACL (no requests, no responses, so no user text ever reaches a monitor).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TextIO

from e2llm_edge.errors import BusError, E2LLMError, SubscriptionRefused
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t
from e2llm_edge.wire.bus import Bus, BusConfig, Envelope
from e2llm_edge.wire.messages import DeviceStatus
from planner.plan import Plan

MONITOR_TOPICS: tuple[t.Topic, ...] = (
    t.DEVICE_STATE,
    t.DEVICE_PROFILE,
    t.DEVICE_TELEMETRY,
    t.PLAN,
    t.ORCHESTRATOR_STATE,
    t.CLUSTER_TELEMETRY,
    t.REQUEST_EVENTS,
)
"""Everything the monitor reads; all of it readable under the monitor's ACL."""

THROUGHPUT_WINDOW_S = 10.0
"""Cluster tokens/s is measured over the summaries of the last this many seconds."""
MAX_TRACKED_REQUESTS = 1000
"""Request lifecycles kept for waiting-time statistics (oldest dropped first)."""


@dataclass
class DeviceRow:
    """What the monitor knows about one device."""

    state: m.DeviceState | None = None
    telemetry: m.DeviceCounters | None = None
    memory_mb: float | None = None
    seen: float = 0.0


@dataclass
class RequestRow:
    """One request's lifecycle as told by its events."""

    first_seen: float
    events: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    """The events' figures merged (fields a later event sets win)."""


def _stats(values: Iterable[float]) -> dict[str, float | int | None]:
    vs = sorted(values)
    if not vs:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "max": None}
    return {
        "n": len(vs),
        "mean": round(statistics.fmean(vs), 4),
        "p50": round(vs[len(vs) // 2], 4),
        "p95": round(vs[min(len(vs) - 1, int(0.95 * len(vs)))], 4),
        "max": round(vs[-1], 4),
    }


class ClusterView:
    """A cluster as seen from its telemetry topics; ``update`` with every envelope."""

    def __init__(self, cluster: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.cluster = cluster
        self.clock = clock
        self.started = clock()
        self.devices: dict[str, DeviceRow] = {}
        self.plan: Plan | None = None
        self.orchestrator: m.OrchestratorState | None = None
        self.summary: m.ClusterSummary | None = None
        self._samples: deque[tuple[float, int]] = deque(maxlen=64)
        self.requests: OrderedDict[str, RequestRow] = OrderedDict()
        self.event_counts: dict[str, int] = {}

    def _device(self, dev: str) -> DeviceRow:
        row = self.devices.setdefault(dev, DeviceRow())
        row.seen = self.clock()
        return row

    def update(self, env: Envelope) -> dict[str, Any] | None:
        """Fold one message in; returns a JSON-able event line for request events."""
        msg, now = env.msg, self.clock()
        if isinstance(msg, m.DeviceState):
            self._device(env.ids["device_id"]).state = msg
        elif isinstance(msg, m.DeviceProfileMsg):
            self._device(env.ids["device_id"]).memory_mb = msg.memory_mb
        elif isinstance(msg, m.DeviceTelemetry):
            self._device(env.ids["device_id"]).telemetry = msg.counters
        elif isinstance(msg, m.ClusterTelemetry):
            self.summary = msg.summary
            self._samples.append((now, msg.summary.tokens_out))
        elif isinstance(msg, m.PlanMsg):
            self.plan = msg.plan
        elif isinstance(msg, m.OrchestratorState):
            self.orchestrator = msg
        elif isinstance(msg, m.RequestEvent):
            row = self.requests.get(msg.request_id)
            if row is None:
                row = self.requests[msg.request_id] = RequestRow(now)
                while len(self.requests) > MAX_TRACKED_REQUESTS:
                    self.requests.popitem(last=False)
            data = _plain(msg.data)
            row.events.append(msg.event.value)
            row.data.update(data)
            self.event_counts[msg.event.value] = self.event_counts.get(msg.event.value, 0) + 1
            return {
                "type": "event",
                "ts": round(time.time(), 3),
                "request_id": msg.request_id,
                "event": msg.event.value,
                "data": data,
            }
        return None

    def throughput(self) -> float | None:
        """Cluster tokens/s over the recent summaries (None until two of them arrived)."""
        if len(self._samples) < 2:
            return None
        t_end, n_end = self._samples[-1]
        recent = [s for s in self._samples if t_end - s[0] <= THROUGHPUT_WINDOW_S]
        t0, n0 = recent[0] if len(recent) > 1 else self._samples[-2]
        return round((n_end - n0) / (t_end - t0), 2) if t_end > t0 else None

    def replicas(self) -> list[dict[str, Any]]:
        live = {r.replica_id: r for r in (self.summary.replicas if self.summary else [])}
        out = []
        for r in self.plan.replicas if self.plan else []:
            devs = [s.device_id for s in r.stages]
            states = [self.devices[d].state for d in devs if d in self.devices]
            now = live.get(r.replica_id)
            out.append(
                {
                    "id": r.replica_id,
                    "role": r.role,
                    "concurrency": r.concurrency,
                    "stages": [
                        {"device": s.device_id, "layers": [s.layer_start, s.layer_end]}
                        for s in r.stages
                    ],
                    "ready": all(s is not None and s.status == DeviceStatus.READY for s in states)
                    and len(states) == len(devs),
                    "prefill_queue_tokens": now.prefill_queue_tokens if now else None,
                    "decoding": now.decoding if now else None,
                }
            )
        return out

    def device_rows(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        rows: dict[str, dict[str, Any]] = {}
        for dev, row in sorted(self.devices.items()):
            s = row.state
            rows[dev] = {
                "status": s.status.value if s else "unknown",
                "role": s.role if s else None,
                "replica": s.replica_id if s else None,
                "layers": list(s.layers) if s and s.layers else None,
                "queue_depth": s.queue_depth if s else None,
                "in_flight": s.in_flight if s else None,
                "tokens_per_s": round(s.tokens_per_s, 2) if s else None,
                "mem_bytes": s.mem_bytes if s else None,
                "memory_mb": row.memory_mb,
                "last_error": s.last_error if s else None,
                "plan_version": s.plan_version if s else None,
                "telemetry": _plain(row.telemetry) if row.telemetry else {},
                "age_s": round(now - row.seen, 2),
            }
        return rows

    def request_stats(self) -> dict[str, Any]:
        done = [r.data for r in self.requests.values() if "done" in r.events]
        ended = {"done", "failed"}
        return {
            "seen": len(self.requests),
            "events": dict(sorted(self.event_counts.items())),
            "done": sum(1 for r in self.requests.values() if "done" in r.events),
            "failed": sum(1 for r in self.requests.values() if "failed" in r.events),
            "open": sum(1 for r in self.requests.values() if not ended & set(r.events)),
            "wait_s": _stats(d["waiting_s"] for d in done if d.get("waiting_s") is not None),
            "ttft_s": _stats(d["ttft_s"] for d in done if d.get("ttft_s") is not None),
            "decode_tokens_per_s": _stats(
                d["decode_tokens_per_s"] for d in done if d.get("decode_tokens_per_s")
            ),
        }

    def snapshot(self) -> dict[str, Any]:
        """Everything known, as plain data (the ``--json`` snapshot line)."""
        s = _plain(self.summary) if self.summary else {}
        orch = self.orchestrator
        return {
            "type": "snapshot",
            "ts": round(time.time(), 3),
            "cluster": self.cluster,
            "watching_s": round(self.clock() - self.started, 1),
            "orchestrator": {"id": orch.orchestrator_id, "status": orch.status, "epoch": orch.epoch}
            if orch
            else None,
            "plan_version": self.plan.version if self.plan else None,
            "plan_method": self.plan.method if self.plan else None,
            "devices": self.device_rows(),
            "replicas": self.replicas(),
            "cluster_summary": {
                "serving": s.get("serving"),
                "phase": s.get("phase"),
                "plan_error": s.get("plan_error"),
                "queued": s.get("queued"),
                "in_flight": s.get("in_flight"),
                "completed": s.get("completed"),
                "failed": s.get("failed"),
                "mean_wait_s": s.get("mean_wait_s"),
                "mean_ttft_s": s.get("mean_ttft_s"),
                "tokens_out": s.get("tokens_out"),
                "uptime_s": s.get("uptime_s"),
                "throughput_tokens_per_s": self.throughput(),
            },
            "requests": self.request_stats(),
        }


def _plain(struct: Any) -> dict[str, Any]:
    """A typed struct as JSON-able data without its unset (None) fields."""
    return {
        k: v
        for k, v in json.loads(json.dumps(dataclasses.asdict(struct), default=str)).items()
        if v is not None
    }


# --------------------------------------------------------------------------- rendering


def _fmt(v: Any, unit: str = "", digits: int = 2) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}{unit}"
    return f"{v}{unit}"


def _ms(v: Any) -> str:
    return "-" if v is None else f"{float(v) * 1e3:.0f} ms"


_STATUS_STYLE = {
    "ready": "green",
    "online": "cyan",
    "loading": "yellow",
    "offline": "red",
    "error": "bold red",
    "unknown": "dim",
}


def render(snap: dict[str, Any]) -> Any:
    """The live view of one snapshot, as a rich renderable."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    dev = Table(title="devices", expand=True)
    for col in (
        "device",
        "status",
        "role",
        "replica",
        "layers",
        "queue",
        "in flight",
        "tokens/s",
        "rss / budget",
        "last error",
    ):
        dev.add_column(
            col,
            justify="right"
            if col in ("queue", "in flight", "tokens/s", "rss / budget")
            else "left",
        )
    for name, d in snap["devices"].items():
        layers = d["layers"]
        mem = f"{d['mem_bytes'] / 2**20:.0f} MB" if d["mem_bytes"] else "-"
        if d["memory_mb"]:
            mem += f" / {d['memory_mb']:.0f} MB"
        style = _STATUS_STYLE.get(d["status"], "")
        dev.add_row(
            name,
            f"[{style}]{d['status']}[/]",
            d["role"] or "-",
            _fmt(d["replica"]),
            f"{layers[0]}-{layers[1] - 1}" if layers else "-",
            _fmt(d["queue_depth"]),
            _fmt(d["in_flight"]),
            _fmt(d["tokens_per_s"], "", 1),
            mem,
            (d["last_error"] or "")[:40],
        )

    rep = Table(
        title=f"replicas (plan v{_fmt(snap['plan_version'])}, {snap['plan_method'] or 'no plan'})",
        expand=True,
    )
    for col in ("replica", "role", "concurrency", "stages", "ready", "prefill queue", "decoding"):
        rep.add_column(col)
    for r in snap["replicas"]:
        stages = ", ".join(f"{s['device']}[{s['layers'][0]}:{s['layers'][1]}]" for s in r["stages"])
        rep.add_row(
            str(r["id"]),
            r["role"].upper(),
            _fmt(r["concurrency"]),
            stages,
            "[green]yes[/]" if r["ready"] else "[yellow]no[/]",
            _fmt(r["prefill_queue_tokens"], " tok"),
            _fmt(r["decoding"]),
        )

    c, rq = snap["cluster_summary"], snap["requests"]
    orch = snap["orchestrator"]
    serving = "[green]serving[/]" if c["serving"] else "[yellow]not serving[/]"
    lines = [
        f"orchestrator {orch['id'] + ' ' + orch['status'] if orch else 'unseen'}; {serving}"
        + (f" ([red]{c['plan_error']}[/])" if c["plan_error"] else ""),
        f"load: {_fmt(c['queued'])} queued, {_fmt(c['in_flight'])} in flight; "
        f"throughput {_fmt(c['throughput_tokens_per_s'], ' tokens/s', 1)}; "
        f"{_fmt(c['tokens_out'])} tokens out",
        f"requests (cluster lifetime): {_fmt(c['completed'])} completed, "
        f"{_fmt(c['failed'])} failed; mean wait {_ms(c['mean_wait_s'])}, "
        f"mean TTFT {_ms(c['mean_ttft_s'])}",
        f"requests (seen by this monitor): {rq['done']} done, {rq['failed']} failed, "
        f"{rq['open']} open; wait p50 {_ms(rq['wait_s']['p50'])} p95 "
        f"{_ms(rq['wait_s']['p95'])}; TTFT p50 {_ms(rq['ttft_s']['p50'])} p95 "
        f"{_ms(rq['ttft_s']['p95'])}; decode {_fmt(rq['decode_tokens_per_s']['mean'], '', 1)}"
        " tokens/s per request",
    ]
    title = f"e2llm cluster {snap['cluster']!r}"
    return Group(Panel("\n".join(lines), title=title), rep, dev)


# --------------------------------------------------------------------------- running


async def _subscribe_all(bus: Bus, topics: Iterable[t.Topic], err: TextIO) -> None:
    for topic in topics:
        try:
            await bus.subscribe(topic)
        except SubscriptionRefused as exc:
            print(f"warning: {exc} (this user may not read {topic.name})", file=err)


async def watch(
    cfg: BusConfig,
    *,
    duration: float | None,
    once: bool,
    json_lines: bool,
    interval: float = 1.0,
    settle: float = 3.0,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> ClusterView:
    """Run the monitor until ``duration`` elapses (None: until cancelled).

    ``once``: collect the retained state and one round of device telemetry (at most
    ``settle`` seconds), print one snapshot and return.
    """
    view = ClusterView(cfg.cluster)
    live: Any = None
    async with Bus(cfg, publish_will_on_close=False) as bus:
        await _subscribe_all(bus, MONITOR_TOPICS, err)
        if once:
            duration = settle
        elif not json_lines:
            from rich.live import Live

            live = Live(
                render(view.snapshot()),
                refresh_per_second=4,
                transient=False,
                console=_console(out),
            )
            live.start()
        t_end = None if duration is None else view.clock() + duration
        next_tick = view.clock() + interval
        try:
            while True:
                now = view.clock()
                if t_end is not None and now >= t_end:
                    break
                if once and _settled(view):
                    break
                if now >= next_tick:
                    next_tick = now + interval
                    if json_lines and not once:
                        _emit(out, view.snapshot())
                    elif live is not None:
                        live.update(render(view.snapshot()))
                wait = min(next_tick, t_end or next_tick) - now
                with contextlib.suppress(BusError):
                    event = view.update(await bus.recv(timeout=max(wait, 0.01)))
                    if event is not None and json_lines and not once:
                        _emit(out, event)
        finally:
            if live is not None:
                live.update(render(view.snapshot()))
                live.stop()
    if json_lines:
        _emit(out, view.snapshot())
    elif once:
        _console(out).print(render(view.snapshot()))
    return view


def _settled(view: ClusterView) -> bool:
    """Retained state is in and every known device has sent its periodic telemetry."""
    return (
        bool(view.summary)
        and bool(view.devices)
        and all(
            r.telemetry is not None
            for r in view.devices.values()
            if r.state is not None and r.state.status != DeviceStatus.OFFLINE
        )
    )


def _console(out: TextIO) -> Any:
    from rich.console import Console

    return Console(file=out)


def _emit(out: TextIO, obj: dict[str, Any]) -> None:
    out.write(json.dumps(obj, separators=(",", ":")) + "\n")
    out.flush()


# --------------------------------------------------------------------------- health


async def check_health(
    cfg: BusConfig,
    *,
    device_id: str | None,
    statuses: set[str],
    serving: bool,
    max_age: float,
    timeout: float,
) -> tuple[bool, str]:
    """Read the retained state of a device (or of the orchestrator) and judge it.

    A device is healthy when its retained state has one of ``statuses`` and is at most
    ``max_age`` seconds old (agents republish it every couple of seconds; a vanished one
    keeps a stale state until the broker fires its last-will). The orchestrator is
    healthy when it says online and, with ``serving``, the cluster summary says serving.
    """
    what = device_id or "orchestrator"
    async with Bus(cfg, publish_will_on_close=False) as bus:
        if device_id is not None:
            await bus.subscribe(t.DEVICE_STATE, device_id=device_id)
        else:
            await bus.subscribe(t.ORCHESTRATOR_STATE)
            if serving:
                await bus.subscribe(t.CLUSTER_TELEMETRY)
        deadline = time.monotonic() + timeout
        state: m.DeviceState | m.OrchestratorState | None = None
        summary: m.ClusterSummary | None = None
        while time.monotonic() < deadline:
            try:
                env = await bus.recv(timeout=max(0.01, deadline - time.monotonic()))
            except BusError:
                break
            if isinstance(env.msg, m.DeviceState | m.OrchestratorState):
                state = env.msg
            elif isinstance(env.msg, m.ClusterTelemetry):
                summary = env.msg.summary
            if state is not None and (not serving or device_id or summary is not None):
                break
    if state is None:
        return False, f"{what}: no retained state within {timeout:.0f} s"
    status = state.status.value if isinstance(state, m.DeviceState) else state.status
    if status not in statuses:
        return False, f"{what}: status {status}"
    age = time.time() - state.ts if state.ts else 0.0
    if isinstance(state, m.DeviceState) and age > max_age:
        return False, f"{what}: state is {age:.0f} s old (status {status})"
    if serving and device_id is None:
        if summary is None or not summary.serving:
            why = (summary.plan_error if summary else None) or "no serving plan"
            return False, f"orchestrator: online, not serving ({why})"
        return True, f"orchestrator: online, serving plan v{summary.plan_version}"
    if isinstance(state, m.DeviceState):
        where = (
            f", {state.role} replica {state.replica_id}, layers "
            f"{state.layers[0]}-{state.layers[1] - 1}"
            if state.layers
            else ""
        )
        return True, f"{what}: {status}{where}, state {age:.1f} s old"
    return True, f"{what}: {status}"


# --------------------------------------------------------------------------- CLI


def _config(args: argparse.Namespace) -> BusConfig:
    from e2llm_edge.cli import _bus_config

    cfg = _bus_config(args)
    assert isinstance(cfg, BusConfig)
    return cfg


def cmd_monitor(args: argparse.Namespace) -> int:
    try:
        asyncio.run(
            watch(
                _config(args),
                duration=args.duration,
                once=args.once,
                json_lines=args.json,
                interval=args.interval,
            )
        )
    except E2LLMError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def check_url(url: str, timeout: float) -> tuple[bool, str]:
    """A gateway's ``/health``: healthy when it answers 200 (stdlib only: the agent image
    has no HTTP client library)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return True, f"{url}: {resp.status} {resp.read(200).decode(errors='replace')}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code} {exc.read(200).decode(errors='replace')}"
    except (OSError, ValueError) as exc:
        return False, f"{url}: {exc}"


def cmd_health(args: argparse.Namespace) -> int:
    if args.url:
        ok, text = check_url(args.url, args.timeout)
        print(text, file=sys.stdout if ok else sys.stderr)
        return 0 if ok else 1
    if args.broker is None:
        print("error: give --broker (or --url for a gateway)", file=sys.stderr)
        return 2
    if (args.device_id is None) == (not args.orchestrator):
        print("error: give exactly one of --device-id or --orchestrator", file=sys.stderr)
        return 2
    try:
        ok, text = asyncio.run(
            check_health(
                _config(args),
                device_id=args.device_id,
                statuses=set(args.status.split(",")),
                serving=args.serving,
                max_age=args.max_age,
                timeout=args.timeout,
            )
        )
    except E2LLMError as exc:  # could not ask (broker, credentials): not an answer
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


def register(sub: Any) -> None:
    """Add ``monitor`` and ``health`` to the ``e2llm`` command."""
    from e2llm_edge.cli import add_broker_args, positive_float

    p = sub.add_parser("monitor", help="live view of a cluster from its telemetry topics")
    add_broker_args(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="JSON lines: a snapshot every --interval and every request event",
    )
    p.add_argument(
        "--once", action="store_true", help="print one snapshot of the current state and exit"
    )
    p.add_argument("--duration", type=positive_float, help="exit after this many seconds")
    p.add_argument("--interval", type=positive_float, default=1.0, help="seconds between refreshes")
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser(
        "health",
        help="exit 0 if a device (or the orchestrator) is healthy, judged from its retained state",
    )
    add_broker_args(p, required=False)
    p.add_argument("--url", help="instead: a gateway's /health URL (healthy when it answers 200)")
    p.add_argument("--device-id", help="the device to check")
    p.add_argument("--orchestrator", action="store_true", help="check the orchestrator")
    p.add_argument(
        "--status",
        default="online,loading,ready",
        help="comma-separated statuses that count as healthy",
    )
    p.add_argument(
        "--serving", action="store_true", help="with --orchestrator: also require a serving plan"
    )
    p.add_argument(
        "--max-age",
        type=positive_float,
        default=15.0,
        help="a device state older than this (seconds) is stale",
    )
    p.add_argument("--timeout", type=positive_float, default=5.0)
    p.set_defaults(func=cmd_health)
