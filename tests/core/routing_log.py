"""The real router, recording every call the simulator makes and what it decided: what
the runtime-vs-simulator replay and the simulator's own routing tests compare."""

from __future__ import annotations

from typing import Any, ClassVar

from planner.routing import Router


class Recording(Router):
    """The real router, logging every call the simulator makes and what it answered."""

    log: ClassVar[list[tuple[str, tuple[Any, ...], Any]]] = []

    def arrive(self, *a: Any) -> None:
        Recording.log.append(("arrive", a, None))
        super().arrive(*a)

    def prefill_done(self, *a: Any) -> None:
        Recording.log.append(("prefill_done", a, None))
        super().prefill_done(*a)

    def kv_moved(self, *a: Any) -> None:
        Recording.log.append(("kv_moved", a, None))
        super().kv_moved(*a)

    def finish(self, *a: Any) -> None:
        Recording.log.append(("finish", a, None))
        super().finish(*a)

    def decide(self, now: float) -> list[Any]:
        out = super().decide(now)
        Recording.log.append(("decide", (now,), out))
        return out
