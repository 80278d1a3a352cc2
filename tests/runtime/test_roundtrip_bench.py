"""`bench/mqtt_roundtrip.py --pauses`, short: the two-process ping-pong runs and reports
both hops for every pause (the figures behind the per-hop cost in the README)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.mosquitto

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_paused_two_process_roundtrips_report_both_hops(capsys: pytest.CaptureFixture[str]) -> None:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import mqtt_roundtrip

    asyncio.run(mqtt_roundtrip.pauses_case([0.0, 5.0], n=5))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("two processes")]
    assert len(lines) == 2, lines
    assert all("hop there median" in ln and "hop back median" in ln for ln in lines)


def test_tls_against_plaintext_round_trips_side_by_side(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`bench/mqtt_roundtrip.py --tls`, short: both transports, both sizes, and a ratio."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import mqtt_roundtrip

    got = asyncio.run(mqtt_roundtrip.tls_case(n=20, rounds=2))
    assert set(got) == {"2 KB", "1.2 MB"}
    assert all(len(v["plaintext"]) >= 20 and len(v["tls"]) >= 20 for v in got.values())
    out = capsys.readouterr().out
    assert out.count("TLS + client certificates + ACL") == 2
    assert out.count("TLS / plaintext (median round trip)") == 2
