"""Request streams: seeded sampling and Azure trace replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from planner import Workload, load_azure_trace
from planner.errors import WorkloadError
from planner.workload import trace_path, workload_of


def test_sampling_is_seeded_and_has_the_requested_means() -> None:
    wl = Workload(576, 588, 2.0)
    a = wl.sample_requests(4000, np.random.default_rng(0))
    b = wl.sample_requests(4000, np.random.default_rng(0))
    assert a == b
    assert np.mean([r.prompt_tokens for r in a]) == pytest.approx(576, rel=0.05)
    assert np.mean([r.output_tokens for r in a]) == pytest.approx(588, rel=0.05)
    gaps = np.diff([r.arrival_s for r in a])
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert a[0].arrival_s == 0.0


def test_fixed_lengths_and_clipping() -> None:
    wl = Workload(5000, 5000, 1.0, length_dist="fixed", arrival="fixed", max_context_tokens=6000)
    reqs = wl.sample_requests(3, np.random.default_rng(0))
    assert [r.arrival_s for r in reqs] == [0.0, 1.0, 2.0]
    assert all(r.prompt_tokens == 5000 and r.output_tokens == 1000 for r in reqs)


def test_invalid_workload() -> None:
    with pytest.raises(WorkloadError, match="arrival_rate_rps must be > 0, got 0"):
        Workload(10, 10, 0)


def test_trace_from_csv_is_time_scaled(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:47.6805900,9000,109\n"
        "2023-11-16 18:15:48.6805900,879,55\n"
    )
    native = load_azure_trace(csv)
    assert [r.arrival_s for r in native] == pytest.approx([0.0, 1.0, 2.0])
    slow = load_azure_trace(csv, rate_rps=0.25, max_context_tokens=4096)
    assert [r.arrival_s for r in slow] == pytest.approx([0.0, 4.0, 8.0])
    assert slow[1].prompt_tokens == 4095 and slow[1].output_tokens == 1
    wl = workload_of(slow)
    assert wl.arrival_rate_rps == pytest.approx(0.25)


def test_trace_missing_columns(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,b\n1,2\n")
    with pytest.raises(WorkloadError, match="lacks columns"):
        load_azure_trace(csv)


def test_real_conversation_trace() -> None:
    """The shipped trace (gzip of Azure's CSV), as `e2llm simulate --trace conv` reads it."""
    reqs = load_azure_trace(trace_path("conv"), rate_rps=1.0, limit=500)
    assert len(reqs) == 500
    wl = workload_of(reqs)
    assert wl.arrival_rate_rps == pytest.approx(1.0, rel=1e-6)
    assert 100 < wl.mean_prompt_tokens < 3000
