"""Process facts the runtime reports (telemetry) and the harness watches (soak runs)."""

from __future__ import annotations

import os


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (Linux /proc); 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
