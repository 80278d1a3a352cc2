"""Process facts the runtime reports (telemetry) and the harness watches (soak runs)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Any


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process (Linux /proc); 0 where it cannot be read."""
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def release_freed_memory() -> None:
    """Hand memory the allocator holds but no longer uses back to the system (glibc's
    malloc_trim; nothing elsewhere). Loading a session parses the whole model file and
    copies its weights before freeing the parsed copy: without this a device kept up to
    ~350 MB of freed heap resident per Qwen2.5-0.5B-sized segment."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Any:
    """glibc's malloc_trim, looked up once (find_library runs ldconfig: milliseconds)."""
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


def last_level_cache_bytes() -> int:
    """Size of this CPU's largest cache (Linux sysfs); 0 where it cannot be read."""
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = os.listdir(base)
    except OSError:
        return 0
    for name in entries:
        try:
            with open(f"{base}/{name}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        units = {"K": 1024, "M": 1024**2, "G": 1024**3}
        try:
            size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
        except ValueError:
            continue
        best = max(best, size)
    return best
