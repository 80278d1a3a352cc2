"""The simulation kernel: a heap of (time, order, seq) events whose handlers return more.

`order` breaks ties between simultaneous events by kind (lower first); `seq` keeps
insertion order among equals, so runs are deterministic.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

Handler = Callable[[float], Iterable["Event"] | None]
Event = tuple[float, int, Handler]
"""A follow-up: (time, order, handler); the handler is called with the event time."""


class EventQueue:
    """Runs handlers in (time, order, seq) order until the heap is empty."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, int, Handler]] = []
        self._seq = 0
        self.now = 0.0
        self.processed = 0

    def schedule(self, time: float, order: int, handler: Handler) -> None:
        """Add an event; it may not lie in the past."""
        if time < self.now:
            raise ValueError(f"event at {time} scheduled in the past (now {self.now})")
        heapq.heappush(self._heap, (time, order, self._seq, handler))
        self._seq += 1

    def run(self, until: float = float("inf")) -> None:
        """Process events up to and including time `until`."""
        while self._heap and self._heap[0][0] <= until:
            time, _, _, handler = heapq.heappop(self._heap)
            self.now = time
            self.processed += 1
            for t, order, h in handler(time) or ():
                self.schedule(t, order, h)
