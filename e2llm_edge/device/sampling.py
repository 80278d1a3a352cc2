"""Token sampling: greedy by default, temperature / top-p with a per-request seed.

Lives in the runtime (numpy only) because the last pipeline stage of a replica samples;
the parameters (`Sampling`) are a wire struct, checked when a request's context arrives.
A request's generator is seeded from (seed, step) so any device continuing a request after
a failover draws exactly the numbers the first one would have.
"""

from __future__ import annotations

import numpy as np

from e2llm_edge.wire.messages import Sampling, SamplingError

__all__ = ["Sampling", "SamplingError", "sample"]


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
