"""KV buffers hold what was written: a few tokens in a large pool cost a few pages, not the
2 MB transparent huge pages numpy asks for on large arrays (Linux /proc needed to see it)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from e2llm_edge.device.fast_runner import kv_buffer

pytestmark = pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux /proc")


def mappings(arr: np.ndarray) -> list[dict[str, int]]:
    """/proc/self/smaps fields (Rss, THPeligible, ...) of every mapping `arr` lies in."""
    lo, hi = arr.ctypes.data, arr.ctypes.data + arr.nbytes
    out: list[dict[str, int]] = []
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if fields and "-" in fields[0] and not fields[0].endswith(":"):
            start, stop = (int(x, 16) for x in fields[0].split("-"))
            inside = start < hi and lo < stop
            if inside:
                out.append({})
        elif inside and fields[0].endswith(":") and len(fields) >= 2 and fields[1].isdigit():
            out[-1][fields[0][:-1]] = int(fields[1])
    return out


def test_a_few_tokens_in_a_large_pool_are_a_few_pages() -> None:
    pool = kv_buffer((8, 2, 4096, 64))  # 16.8 MB: 8 slots of 4096 tokens, 2 heads of 64
    assert pool.dtype == np.float32 and pool.flags.c_contiguous and pool.flags.writeable
    pool[0, :, :10] = 1.0  # 10 tokens of slot 0: 2.5 KB per head, 1 MB apart
    maps = mappings(pool)
    assert sum(m["Rss"] for m in maps) <= 4 * 4  # kB: a page or two per head
    assert not any(m.get("THPeligible") for m in maps)  # huge pages declined
    assert float(pool.sum()) == 2 * 10 * 64 and float(pool[1:].sum()) == 0.0
