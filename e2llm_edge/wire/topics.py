"""Every MQTT topic of the system, spelled here and nowhere else.

A ``Topic`` binds a pattern under ``e2llm/<cluster>/``, its QoS, retain flag and the
message types it may carry; ``format`` builds a topic, ``parse`` reads the ids back and
``filter`` gives a subscription filter with ``+`` for the ids left open.

Topics, under ``e2llm/<cluster>/`` (QoS, retained, payload: writer -> reader):

- ``device/<device_id>/state``: QoS 1, retained, last-will. DeviceState:
  the device -> orchestrator, monitors.
- ``device/<device_id>/profile``: QoS 1, retained. DeviceProfileMsg:
  the device -> orchestrator, monitors.
- ``device/<device_id>/inbox``: QoS 1. PrefillStart, Activation, KVChunk, DecodeStep,
  Release: orchestrator and peer devices (activations, KV handoff) -> that device only;
  Probe: the device to itself, timing its message path once before it announces.
- ``plan``: QoS 1, retained. PlanMsg: orchestrator only -> devices, monitors.
- ``orchestrator/state``: QoS 1, retained, last-will. OrchestratorState:
  orchestrator -> devices, monitors.
- ``orchestrator/lease``: QoS 1, retained. OrchestratorLease: the serving orchestrator ->
  standby orchestrators (a standby takes over when the lease lapses or its holder's
  last-will fires).
- ``orchestrator/inbox/<device_id>``: QoS 1. TokenOut, ErrorReport, Heartbeat:
  a device, under its own id only -> orchestrator.
- ``request/<client_id>``: QoS 1. GenerateRequest, Release (cancel):
  a client, under its own id only -> orchestrator.
- ``response/<client_id>/<request_id>``: QoS 1. ResponseEvent:
  orchestrator -> that client only.
- ``telemetry/device/<device_id>``: QoS 0. DeviceTelemetry: the device -> monitors.
- ``telemetry/cluster``: QoS 0, retained. ClusterTelemetry (cluster summary):
  orchestrator -> monitors.
- ``events/<request_id>``: QoS 0. RequestEvent, never prompt or answer text:
  orchestrator -> monitors.

Design choices: there is no per-device assignment topic; the retained plan lists every
device's replica, role and layers, and each device reads its own part. Senders are named
by the topic (``orchestrator/inbox/<device_id>``, ``request/<client_id>``) so the broker's
ACL, which ties a topic id to the username, authenticates them; body fields naming the
sender are informative only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from e2llm_edge.errors import TopicError
from e2llm_edge.wire import messages as m

ROOT = "e2llm"
DEFAULT_CLUSTER = "default"

_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,127}$")
_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
# Mosquitto ACL substitutions (username, client id) may stand in for an id in a filter.
_ACL_SUBSTITUTIONS = frozenset({"%u", "%c"})


def check_id(value: str, what: str = "id") -> str:
    """Ids in topics: 1-128 chars of letters, digits, ``_ . : -``; never ``/ + #``."""
    if not isinstance(value, str) or not _ID.match(value):
        raise TopicError(str(value), f"{what} must match {_ID.pattern}")
    return value


@dataclass(frozen=True)
class Topic:
    """One topic family: pattern, delivery settings and allowed payload types."""

    name: str
    pattern: str
    """Relative to ``<root>/<cluster>/``, ids as ``{device_id}``."""
    qos: int
    retain: bool
    payload: tuple[type[m.Message], ...]
    doc: str
    lwt: bool = False
    """True: this topic also carries the client's last-will."""
    ids: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(_PLACEHOLDER.findall(self.pattern)))

    def _prefix(self, cluster: str, root: str) -> str:
        return f"{root}/{check_id(cluster, 'cluster')}/"

    def format(self, *, cluster: str = DEFAULT_CLUSTER, root: str = ROOT, **ids: str) -> str:
        """The concrete topic; every id of the pattern must be given and valid."""
        if set(ids) != set(self.ids):
            raise TopicError(self.pattern, f"needs ids {list(self.ids)}, got {sorted(ids)}")
        parts = {k: check_id(v, k) for k, v in ids.items()}
        return self._prefix(cluster, root) + self.pattern.format(**parts)

    def filter(self, *, cluster: str = DEFAULT_CLUSTER, root: str = ROOT, **ids: str) -> str:
        """Subscription filter: given ids fixed, the others ``+``."""
        unknown = set(ids) - set(self.ids)
        if unknown:
            raise TopicError(self.pattern, f"has no ids {sorted(unknown)}")
        parts = {k: "+" for k in self.ids}
        for k, v in ids.items():
            parts[k] = v if v in _ACL_SUBSTITUTIONS else check_id(v, k)
        return self._prefix(cluster, root) + self.pattern.format(**parts)

    def parse(
        self, topic: str, *, cluster: str = DEFAULT_CLUSTER, root: str = ROOT
    ) -> dict[str, str]:
        """Ids of a concrete topic of this family; TopicError if the shape is wrong."""
        prefix = self._prefix(cluster, root)
        if not topic.startswith(prefix):
            raise TopicError(topic, f"not under {prefix!r}")
        want = self.pattern.split("/")
        got = topic[len(prefix) :].split("/")
        if len(want) != len(got):
            raise TopicError(topic, f"does not match {self.pattern!r}")
        ids: dict[str, str] = {}
        for w, g in zip(want, got, strict=True):
            placeholder = _PLACEHOLDER.fullmatch(w)
            if placeholder:
                ids[placeholder.group(1)] = check_id(g, placeholder.group(1))
            elif w != g:
                raise TopicError(topic, f"does not match {self.pattern!r}")
        return ids

    def match(
        self, topic: str, *, cluster: str = DEFAULT_CLUSTER, root: str = ROOT
    ) -> dict[str, str] | None:
        """Like ``parse`` but None instead of an error."""
        try:
            return self.parse(topic, cluster=cluster, root=root)
        except TopicError:
            return None

    def accepts(self, msg: m.Message) -> bool:
        return isinstance(msg, self.payload)


DEVICE_STATE = Topic(
    "device_state",
    "device/{device_id}/state",
    1,
    True,
    (m.DeviceState,),
    "Live state of a device; retained; last-will sets status offline.",
    lwt=True,
)
DEVICE_PROFILE = Topic(
    "device_profile",
    "device/{device_id}/profile",
    1,
    True,
    (m.DeviceProfileMsg,),
    "Memory and measured per-layer costs of a device; retained.",
)
DEVICE_INBOX = Topic(
    "device_inbox",
    "device/{device_id}/inbox",
    1,
    False,
    (
        m.PrefillStart,
        m.Activation,
        m.KVChunk,
        m.DecodeStep,
        m.DecodeBatch,
        m.Release,
        m.Probe,
    ),
    "Work for one device: from the orchestrator, and activations / KV from peer devices"
    " (and the device's own probe of its message path).",
)
PLAN = Topic(
    "plan",
    "plan",
    1,
    True,
    (m.PlanMsg,),
    "The current plan; retained; only the orchestrator writes it.",
)
ORCHESTRATOR_STATE = Topic(
    "orchestrator_state",
    "orchestrator/state",
    1,
    True,
    (m.OrchestratorState,),
    "Orchestrator liveness; retained; last-will sets status offline.",
    lwt=True,
)
ORCHESTRATOR_LEASE = Topic(
    "orchestrator_lease",
    "orchestrator/lease",
    1,
    True,
    (m.OrchestratorLease,),
    "Which orchestrator serves (epoch); retained, renewed by its holder; standbys watch it.",
)
ORCHESTRATOR_INBOX = Topic(
    "orchestrator_inbox",
    "orchestrator/inbox/{device_id}",
    1,
    False,
    (m.TokenOut, m.ErrorReport, m.Heartbeat),
    "Device -> orchestrator; the topic names the (ACL-authenticated) sender.",
)
REQUEST = Topic(
    "request",
    "request/{client_id}",
    1,
    False,
    (m.GenerateRequest, m.Release),
    "A client submits (or cancels, with Release) a request.",
)
RESPONSE = Topic(
    "response",
    "response/{client_id}/{request_id}",
    1,
    False,
    (m.ResponseEvent,),
    "Token stream and final event of one request, readable only by its client.",
)
DEVICE_TELEMETRY = Topic(
    "device_telemetry",
    "telemetry/device/{device_id}",
    0,
    False,
    (m.DeviceTelemetry,),
    "Periodic figures of one device.",
)
CLUSTER_TELEMETRY = Topic(
    "cluster_telemetry",
    "telemetry/cluster",
    0,
    True,
    (m.ClusterTelemetry,),
    "Cluster summary from the orchestrator; retained so a new monitor sees it at once.",
)
REQUEST_EVENTS = Topic(
    "request_events",
    "events/{request_id}",
    0,
    False,
    (m.RequestEvent,),
    "Request lifecycle for monitors; never carries prompt or answer text.",
)

ALL_TOPICS: tuple[Topic, ...] = (
    DEVICE_STATE,
    DEVICE_PROFILE,
    DEVICE_INBOX,
    PLAN,
    ORCHESTRATOR_STATE,
    ORCHESTRATOR_LEASE,
    ORCHESTRATOR_INBOX,
    REQUEST,
    RESPONSE,
    DEVICE_TELEMETRY,
    CLUSTER_TELEMETRY,
    REQUEST_EVENTS,
)


def cluster_filter(*, cluster: str = DEFAULT_CLUSTER, root: str = ROOT) -> str:
    """Everything of one cluster (``e2llm/<cluster>/#``), for tooling and ACLs."""
    return f"{root}/{check_id(cluster, 'cluster')}/#"


def resolve(
    topic: str,
    candidates: Iterable[Topic] = ALL_TOPICS,
    *,
    cluster: str = DEFAULT_CLUSTER,
    root: str = ROOT,
) -> tuple[Topic, dict[str, str]]:
    """Which topic family a concrete topic belongs to, and its ids."""
    for t in candidates:
        ids = t.match(topic, cluster=cluster, root=root)
        if ids is not None:
            return t, ids
    raise TopicError(topic, "matches no known topic")
