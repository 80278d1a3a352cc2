"""Who serves: the lease rules a standby and a holder follow (pure, times passed in)."""

from __future__ import annotations

from e2llm_edge.fog.lease import LeaseView
from e2llm_edge.wire.messages import OrchestratorLease, OrchestratorState


def lease(holder: str, epoch: int, *, released: bool = False) -> OrchestratorLease:
    return OrchestratorLease(holder=holder, epoch=epoch, ttl_s=3.0, released=released)


def test_a_standby_waits_while_the_holder_renews() -> None:
    v = LeaseView("b")
    v.seen_lease(lease("a", 4), 10.0)
    assert not v.vacant(12.9, started=0.0, wait_s=6.0)
    v.seen_lease(lease("a", 4), 12.9)
    assert not v.vacant(15.5, started=0.0, wait_s=6.0)
    assert v.vacant(16.0, started=0.0, wait_s=6.0), "not renewed for more than ttl: lapsed"
    assert v.next_epoch() == 5


def test_the_holders_last_will_hands_over_at_once() -> None:
    v = LeaseView("b")
    v.seen_lease(lease("a", 4), 10.0)
    v.seen_state(OrchestratorState(orchestrator_id="someone-else", status="offline"))
    assert not v.vacant(10.1, started=0.0, wait_s=6.0), "another process's will is not the holder's"
    v.seen_state(OrchestratorState(orchestrator_id="a", status="offline"))
    assert v.vacant(10.1, started=0.0, wait_s=6.0)


def test_a_clean_release_hands_over_and_stale_copies_are_ignored() -> None:
    v = LeaseView("b")
    v.seen_lease(lease("a", 4), 10.0)
    v.seen_lease(lease("z", 2), 10.5)  # an old retained copy arriving late
    assert v.holder == "a" and v.epoch == 4
    v.seen_lease(lease("a", 4, released=True), 11.0)
    assert v.vacant(11.0, started=0.0, wait_s=6.0)


def test_an_empty_cluster_is_taken_after_a_wait_and_a_holder_never_yields_to_itself() -> None:
    v = LeaseView("b")
    assert not v.vacant(5.0, started=0.0, wait_s=6.0)
    assert v.vacant(6.0, started=0.0, wait_s=6.0)
    v.holder, v.epoch = "b", 1
    assert not v.vacant(100.0, started=0.0, wait_s=6.0)


def test_a_holder_that_sees_a_newer_epoch_steps_down() -> None:
    v = LeaseView("a")
    v.holder, v.epoch = "a", 3
    assert not v.superseded(3)
    v.seen_lease(lease("b", 4), 1.0)
    assert v.superseded(3)


def test_a_standby_cut_off_by_a_broker_restart_gives_the_holder_a_fresh_ttl() -> None:
    """Renewals missed while we were disconnected prove nothing: no takeover right after
    our own reconnect, only if the holder then stays silent for a whole ttl."""
    v = LeaseView("b")
    v.seen_lease(lease("a", 4), 10.0)
    v.seen_state(OrchestratorState(orchestrator_id="a", status="offline"))  # broker shutdown
    v.reconnected(14.0)
    assert not v.vacant(14.5, started=0.0, wait_s=6.0)
    v.seen_lease(lease("a", 4), 15.0)
    assert not v.vacant(17.5, started=0.0, wait_s=6.0)
    assert v.vacant(18.5, started=0.0, wait_s=6.0)
