"""Token sampling: greedy by default, temperature / top-p with a per-request seed.

Lives in the runtime (numpy only) because the last pipeline stage of a replica samples.
A request's generator is seeded from (seed, step) so any device continuing a request after
a failover draws exactly the numbers the first one would have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from e2llm_edge.errors import ParamError


class SamplingError(ParamError):
    """An invalid sampling parameter; ``field`` and the message name it."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and 0.0 <= self.temperature <= 10.0):
            raise SamplingError(
                "temperature", f"temperature must be in [0, 10], got {self.temperature!r}"
            )
        if not (isinstance(self.top_p, (int, float)) and 0.0 < self.top_p <= 1.0):
            raise SamplingError("top_p", f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise SamplingError("seed", f"seed must be a non-negative integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "seed": int(self.seed),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Sampling:
        return cls(
            temperature=float(d.get("temperature", 0.0)),
            top_p=float(d.get("top_p", 1.0)),
            seed=int(d.get("seed", 0)),
        )


def sample(logits: np.ndarray, sampling: Sampling, step: int) -> int:
    """One token id from a (V,) logits row; `step` is the index of the token being drawn."""
    if sampling.greedy:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / sampling.temperature
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if sampling.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, sampling.top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    rng = np.random.default_rng([sampling.seed, step])
    return int(rng.choice(p.shape[0], p=p))
