"""Topic table: format, parse, filters, id validation."""

from __future__ import annotations

import pytest

from e2llm_edge.errors import TopicError
from e2llm_edge.wire import messages as m
from e2llm_edge.wire import topics as t


def test_format_and_parse_round_trip_for_every_topic() -> None:
    for topic in t.ALL_TOPICS:
        ids = {k: f"x-{i}" for i, k in enumerate(topic.ids)}
        s = topic.format(cluster="lab", **ids)
        assert s.startswith("e2llm/lab/")
        assert topic.parse(s, cluster="lab") == ids
        assert t.resolve(s, cluster="lab") == (topic, ids)


def test_examples() -> None:
    assert t.DEVICE_STATE.format(device_id="pi-1") == "e2llm/default/device/pi-1/state"
    assert (
        t.RESPONSE.format(cluster="c", client_id="cli", request_id="r9")
        == "e2llm/c/response/cli/r9"
    )
    assert t.DEVICE_INBOX.filter(cluster="c") == "e2llm/c/device/+/inbox"
    assert t.RESPONSE.filter(cluster="c", client_id="%u") == "e2llm/c/response/%u/+"
    assert t.PLAN.retain and t.DEVICE_STATE.lwt and t.ORCHESTRATOR_STATE.lwt
    assert not t.DEVICE_INBOX.retain and t.DEVICE_INBOX.qos == 1


@pytest.mark.parametrize("bad", ["", "a/b", "a+", "#", "x" * 200, "spa ce", "%u"])
def test_bad_ids_rejected(bad: str) -> None:
    with pytest.raises(TopicError):
        t.DEVICE_STATE.format(device_id=bad)


@pytest.mark.parametrize(
    "topic_str",
    [
        "e2llm/other/device/d/state",  # other cluster
        "e2llm/default/device/d/state/extra",  # too long
        "e2llm/default/device/d/profile",  # other family
        "e2llm/default/device/+/state",  # wildcard is not an id
        "e2llm/default/device//state",
    ],
)
def test_parse_rejects_wrong_shapes(topic_str: str) -> None:
    with pytest.raises(TopicError):
        t.DEVICE_STATE.parse(topic_str)
    assert t.DEVICE_STATE.match(topic_str) is None


def test_format_needs_exactly_the_pattern_ids() -> None:
    with pytest.raises(TopicError, match="needs ids"):
        t.RESPONSE.format(client_id="c")
    with pytest.raises(TopicError, match="has no ids"):
        t.PLAN.filter(device_id="d")


def test_patterns_are_unambiguous_and_payloads_registered() -> None:
    registered = set(m.message_types())
    for topic in t.ALL_TOPICS:
        assert set(topic.payload) <= registered
        ids = {k: "z" for k in topic.ids}
        matches = [o for o in t.ALL_TOPICS if o.match(topic.format(**ids)) is not None]
        assert matches == [topic]
    assert t.DEVICE_INBOX.accepts(m.Release(request_id="r", reason="x"))
    assert not t.PLAN.accepts(m.Release(request_id="r", reason="x"))
