"""Random runs of a whole in-process cluster (both cores, toy engine): requests arrive,
devices die and come back, time passes. At the end every request has ended exactly once,
every answer equals the one-piece computation (or is an explicit error), the stream the
client saw equals the final answer, and no device holds a cache or state for anything."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .fogharness import CharCodec, three_replicas
from .world import World, reference

DEVICES = ("p1", "a0", "a1", "b0", "b1")  # p0 stays up: one prefill device always serves


actions = st.lists(
    st.one_of(
        st.tuples(
            st.just("submit"), st.text("abcdefgh", min_size=1, max_size=12), st.integers(1, 8)
        ),
        st.tuples(st.just("steps"), st.integers(1, 30), st.just(0)),
        st.tuples(st.just("kill"), st.sampled_from(DEVICES), st.just(0)),
        st.tuples(st.just("revive"), st.sampled_from(DEVICES), st.just(0)),
        st.tuples(st.just("tick"), st.sampled_from(["0.5", "3", "7"]), st.just(0)),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=actions, seed=st.integers(0, 2**16))
def test_every_request_ends_once_with_the_right_answer(
    actions: list[tuple[str, object, object]], seed: int
) -> None:
    import random

    w = World(three_replicas(), rng=random.Random(seed))
    w.boot()
    prompts: dict[str, tuple[str, int]] = {}
    for kind, a, b in actions:
        if kind == "submit":
            rid = f"r{len(prompts)}"
            prompts[rid] = (str(a), int(b))  # type: ignore[call-overload]
            w.submit(rid, str(a), int(b))  # type: ignore[call-overload]
        elif kind == "steps":
            for _ in range(int(a)):  # type: ignore[call-overload]
                w.step()
        elif kind == "kill" and w.devices[str(a)].alive:
            w.kill(str(a))
        elif kind == "revive" and not w.devices[str(a)].alive:
            w.revive(str(a))
        elif kind == "tick":
            w.tick(float(str(a)))
    for n, dev in w.devices.items():  # everyone back, then let it all finish
        if not dev.alive:
            w.revive(n)
    for _ in range(300):
        w.tick(0.5)
        w.run()
        if not w.fog.requests:
            break
    assert not w.fog.requests, {r.rid: r.status for r in w.fog.requests.values()}
    for rid, (text, new) in prompts.items():
        finals = w.final(rid)
        assert len(finals) == 1, (rid, finals)
        streamed = [t for e in w.answers[rid] if e.event == "token" for t in e.token_ids]
        if finals[0].event == "done":
            want = reference(CharCodec().encode_prompt(text, raw=True), new, 8)
            assert finals[0].token_ids == want, rid
            assert streamed == want, rid
        else:
            assert finals[0].error_code is not None
            assert streamed == finals[0].token_ids[: len(streamed)]
    w.tick(40.0)  # past every request timeout: anything a device still held is freed
    w.run()
    assert not w.cached_attempts()
