"""Standard metrics on hand-computed event traces."""

from __future__ import annotations

import math
import random

import pytest

from planner.metrics import SLO, RequestRecord, Stats, summarize


def disaggregated() -> RequestRecord:
    """Arrives at 10, waits 2 s, two stages (3 s of service, 1 s queued between them),
    first token at 16, waits 0.5 s for a slot and its KV, decodes 4 more tokens till 20."""
    return RequestRecord(
        "a",
        arrival_s=10.0,
        prompt_tokens=100,
        prefill_start_s=12.0,
        prefill_service_s=3.0,
        first_token_s=16.0,
        decode_start_s=16.5,
        finish_s=20.0,
        output_tokens=5,
        status="done",
    )


def test_one_disaggregated_request_by_hand() -> None:
    r = disaggregated()
    assert r.ttft_s == 6.0
    assert r.e2e_s == 10.0
    assert r.tbt_s == pytest.approx(4.0 / 4)
    assert r.wait_before_prefill_s == 2.0
    assert r.wait_between_stages_s == 1.0
    assert r.wait_for_decoder_s == 0.5
    # not served: 2 before, 1 between stages, 0.5 for the decoder
    assert r.waiting_s == pytest.approx(3.5)
    assert r.decode_service_s == pytest.approx(3.5)
    assert r.waiting_s + r.prefill_service_s + r.decode_service_s == pytest.approx(r.e2e_s)


def test_mixed_replica_stall_counts_as_waiting() -> None:
    # prefilled where it decodes (decode starts with the first token); paused 2 s while
    # the replica prefilled another prompt
    r = RequestRecord(
        "m",
        arrival_s=0.0,
        prompt_tokens=10,
        prefill_start_s=0.0,
        prefill_service_s=1.0,
        first_token_s=1.0,
        decode_start_s=1.0,
        decode_stall_s=2.0,
        finish_s=9.0,
        output_tokens=9,
        status="done",
    )
    assert r.waiting_s == pytest.approx(2.0)
    assert r.decode_service_s == pytest.approx(6.0)
    assert r.tbt_s == pytest.approx(1.0)


def test_single_token_answer_has_no_tbt_and_no_decoder_wait() -> None:
    r = RequestRecord(
        "s",
        arrival_s=0.0,
        prompt_tokens=10,
        prefill_start_s=0.5,
        prefill_service_s=1.0,
        first_token_s=1.5,
        finish_s=1.5,
        output_tokens=1,
        status="done",
    )
    assert math.isnan(r.tbt_s)
    assert r.waiting_s == pytest.approx(0.5)
    assert r.wait_for_decoder_s == 0.0


def test_summary_of_a_small_trace() -> None:
    recs = []
    for i, wait in enumerate([0.0, 1.0, 2.0, 3.0, 4.0]):
        # each: queued `wait`, served 1 s of prefill, 10 tokens 0.1 s apart
        t0 = float(i)
        recs.append(
            RequestRecord(
                str(i),
                arrival_s=t0,
                prompt_tokens=50,
                prefill_start_s=t0 + wait,
                prefill_service_s=1.0,
                first_token_s=t0 + wait + 1.0,
                decode_start_s=t0 + wait + 1.0,
                finish_s=t0 + wait + 1.0 + 0.9,
                output_tokens=10,
                status="done",
            )
        )
    recs.append(RequestRecord("r", arrival_s=2.5, prompt_tokens=9000, status="rejected"))
    s = summarize(recs, SLO(ttft_s=3.0, tbt_s=0.1 + 1e-9))
    assert (s.n_arrived, s.n_completed, s.n_rejected, s.n_failed) == (6, 5, 1, 0)
    assert s.unfinished == 0
    assert s.waiting == Stats(2.0, 2.0, pytest.approx(3.6), pytest.approx(3.96))
    assert s.ttft.mean == pytest.approx(3.0)
    assert s.tbt.mean == pytest.approx(0.1)
    assert s.e2e.mean == pytest.approx(3.9)
    # makespan: first arrival 0 to last finish 4 + 4 + 1.9 = 9.9
    assert s.makespan_s == pytest.approx(9.9)
    assert s.throughput_rps == pytest.approx(5 / 9.9)
    assert s.throughput_tokens_per_s == pytest.approx(50 / 9.9)
    # TTFT <= 3 s: waits 0, 1, 2 make it (TTFT 1, 2, 3)
    assert s.goodput_rps == pytest.approx(3 / 9.9)
    assert s.slo_attainment == pytest.approx(3 / 6)
    assert s.wait_parts["before_prefill"] == pytest.approx(2.0)
    assert s.wait_parts["for_decoder"] == 0.0


def test_parts_compose_into_end_to_end() -> None:
    rng = random.Random(4)
    for i in range(200):
        a = rng.uniform(0, 100)
        start = a + rng.uniform(0, 5)
        service = rng.uniform(0.1, 3)
        first = start + service + rng.uniform(0, 2)
        dec = first + rng.uniform(0, 3)
        stall = rng.uniform(0, 1)
        fin = dec + stall + rng.uniform(0.1, 20)
        r = RequestRecord(
            str(i),
            arrival_s=a,
            prompt_tokens=1,
            prefill_start_s=start,
            prefill_service_s=service,
            first_token_s=first,
            decode_start_s=dec,
            decode_stall_s=stall,
            finish_s=fin,
            output_tokens=rng.randint(2, 50),
            status="done",
        )
        assert r.waiting_s == pytest.approx(
            r.wait_before_prefill_s + r.wait_between_stages_s + r.wait_for_decoder_s + stall
        )
        assert r.waiting_s + r.prefill_service_s + r.decode_service_s == pytest.approx(r.e2e_s)


def test_empty_and_unfinished_runs() -> None:
    s = summarize([])
    assert s.n_arrived == 0 and math.isnan(s.waiting.mean) and s.throughput_rps == 0.0
    cut = summarize([RequestRecord("x", 0.0, 10, prefill_start_s=1.0, status="running")])
    assert cut.unfinished == 1 and cut.n_completed == 0
