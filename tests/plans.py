"""A pinned PREFILL/DECODER plan for end-to-end tests that prove the KV handoff or show
both roles: the planner's own role search may prefer mixed replicas on a small pool (and
its choice follows measured, noisy profiles), so such tests pin the pair they need."""

from __future__ import annotations

from pathlib import Path

import yaml


def pinned_pd(
    path: Path,
    prefill: tuple[str, str],
    decoder: tuple[str, str],
    n_layers: int,
    split: int | None = None,
    decoder_concurrency: int = 4,
) -> Path:
    """Write to `path` a plan of two 2-device replicas, layers split at `split` (default:
    the middle), for `e2llm orchestrator --plan`; returns `path`."""
    cut = n_layers // 2 if split is None else split

    def stage(dev: str, a: int, b: int) -> dict[str, object]:
        return {
            "device_id": dev,
            "layer_start": a,
            "layer_end": b,
            "embed": a == 0,
            "head": b == n_layers,
            "predicted_prefill_s": 0.1,
            "predicted_decode_s": 0.01,
        }

    plan = {
        "version": 1,
        "method": "pinned",
        "n_layers": n_layers,
        "predicted": {},
        "replicas": [
            {
                "replica_id": i,
                "role": role,
                "concurrency": 1 if role == "prefill" else decoder_concurrency,
                "stages": [stage(a, 0, cut), stage(b, cut, n_layers)],
            }
            for i, (role, (a, b)) in enumerate((("prefill", prefill), ("decoder", decoder)))
        ],
    }
    path.write_text(yaml.safe_dump(plan))
    return path
