"""Who serves the cluster: a lease on a retained topic, pure (times passed in).

The serving orchestrator holds the lease (``orchestrator/lease``, retained) and renews it
every ``renew_s``; its epoch only grows. A standby watches the lease and the holder's
last-will on ``orchestrator/state``, and takes over with epoch + 1 when the holder goes
offline (a crash: the broker fires the will at once for a closed connection) or stops
renewing for ``ttl_s`` (a hang, or a network partition). A holder that sees a higher
epoch held by someone else steps down, so two orchestrators never serve for long.
"""

from __future__ import annotations

from dataclasses import dataclass

from e2llm_edge.wire.messages import OrchestratorLease, OrchestratorState


@dataclass
class LeaseView:
    """What one orchestrator instance knows of the lease."""

    me: str
    ttl_s: float = 3.0
    holder: str | None = None
    epoch: int = 0
    renewed_at: float | None = None
    """Local time the holder last renewed (None: never seen one)."""
    holder_gone: bool = False
    """The holder's last-will (or a clean release) says it no longer serves."""

    def seen_lease(self, lease: OrchestratorLease, now: float) -> None:
        if lease.epoch < self.epoch:
            return  # a stale retained copy
        self.holder, self.epoch, self.ttl_s = lease.holder, lease.epoch, lease.ttl_s
        self.renewed_at = now
        self.holder_gone = lease.released

    def seen_state(self, state: OrchestratorState) -> None:
        if (
            state.status == "offline"
            and state.orchestrator_id == self.holder
            and (state.epoch in (0, self.epoch))
        ):
            self.holder_gone = True

    def reconnected(self, now: float) -> None:
        """We were cut off from the broker (e.g. it restarted): renewals we missed prove
        nothing, and a last-will seen around the outage may be the broker's own shutdown.
        The holder gets a fresh `ttl_s` to renew before we take over."""
        if self.holder is not None and self.holder != self.me:
            self.renewed_at = now
            self.holder_gone = False

    def vacant(self, now: float, *, started: float, wait_s: float) -> bool:
        """A standby may take over: the holder is gone, its lease lapsed, or nobody has
        held one since we started `wait_s` ago (an empty cluster)."""
        if self.holder == self.me:
            return False
        if self.holder is None:
            return now - started >= wait_s
        if self.holder_gone:
            return True
        return self.renewed_at is None or now - self.renewed_at > self.ttl_s

    def next_epoch(self) -> int:
        return self.epoch + 1

    def superseded(self, my_epoch: int) -> bool:
        """Someone else holds a newer lease than ours: step down."""
        return self.holder not in (None, self.me) and self.epoch > my_epoch
