"""Measure this device's per-layer costs for one model (`e2llm profile`).

The planner's cost model is fitted from these figures, not from FLOP formulas: one decoder
layer's prefill time at several prompt lengths, one layer's decode step at several batch
sizes (with a 128-token past), and the embedding and head costs. Layers of a Llama model
are identical in shape, so layer 0 stands for all. The result is cached per model
fingerprint and thread count, so agents restarting on the same device start at once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from e2llm_edge.device.fast_runner import VariantEmbedder, VariantHead, load_stage
from e2llm_edge.device.runner import StageCache, configure_threads
from e2llm_edge.wire.messages import ProfileData, ProfileMeta
from onnx_export.manifest import Manifest
from onnx_export.source import cache_dir

log = logging.getLogger(__name__)

PREFILL_TOKENS = (16, 64, 256, 1024)
DECODE_BATCHES = (1, 2, 4, 8)
MAX_CONCURRENCY = 16
PAST_TOKENS = 128


def _best(fn: Callable[[], object], reps: int) -> float:
    """Fastest of `reps` runs after one warm-up: the device's capability, not its noise."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _fill(points: dict[int, float], upto: int) -> list[float]:
    """Per-concurrency list 1..upto by linear interpolation/extrapolation of measured points.

    A bigger batch never takes less time per step than a smaller one: noisy samples (a busy
    machine) are made non-decreasing first, so the extrapolation cannot turn negative.
    """
    xs = sorted(points)
    ys = list(np.maximum.accumulate([points[x] for x in xs]))
    out = []
    for c in range(1, upto + 1):
        if c <= xs[-1]:
            out.append(float(np.interp(c, xs, ys)))
        else:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            out.append(float(ys[-1] + slope * (c - xs[-1])))
    return out


def profile_problem(prof: dict[str, Any]) -> str | None:
    """What the planner would reject in this profile (None: it is valid)."""
    from planner.errors import InventoryError
    from planner.inventory import Inventory

    doc = {
        "devices": [
            {
                "id": "this-device",
                "memory_mb": 1.0,
                "link": {"bandwidth_mbps": 1.0, "latency_ms": 1.0},
                "profile": {k: v for k, v in prof.items() if k != "measured"},
            }
        ]
    }
    try:
        Inventory.from_dict(doc, source="profile")
    except InventoryError as exc:
        return str(exc)
    return None


def measure_profile(
    manifest: Manifest,
    threads: int | None = None,
    reps: int = 3,
    variant: tuple[str, str] = ("standard", "fp32"),
) -> dict[str, Any]:
    """The profile dict in the inventory schema (planner/inventory.py), for `variant`."""
    n = configure_threads(threads)
    cfg = manifest.config
    h = int(cfg["hidden_size"])
    # a small model's context may be shorter than the usual sample points
    ctx = int(cfg["max_position"])
    points = [t for t in PREFILL_TOKENS if t <= ctx]
    if len(points) < 2 and ctx not in points:
        points.append(ctx)
    past_tokens = max(1, min(PAST_TOKENS, ctx - 16))
    stack = load_stage(
        manifest,
        0,
        1,
        variant,
        prefer_ranges=False,
        max_batch=max(DECODE_BATCHES),
        context=min(past_tokens + 16, ctx),
    )
    emb, head = VariantEmbedder(manifest, variant), VariantHead(manifest, variant)
    rng = np.random.default_rng(0)
    prefill = []
    for tokens in points:
        x = rng.normal(0, 1, (1, tokens, h)).astype(np.float32)

        def pre(x: np.ndarray = x, n: int = tokens) -> None:
            stack.run(x, 0, stack.new_cache(n))

        prefill.append(_best(pre, reps))
    decode: dict[int, float] = {}
    head_decode: dict[int, float] = {}
    past = rng.normal(0, 1, (1, past_tokens, h)).astype(np.float32)
    for b in DECODE_BATCHES:
        caches = []
        for _ in range(b):
            c = stack.new_cache(min(past_tokens + 8, ctx))
            stack.run(past, 0, c)
            caches.append(c)
        step = rng.normal(0, 1, (b, 1, h)).astype(np.float32)

        def one_step(step: np.ndarray = step, caches: list[StageCache] = caches) -> None:
            stack.run_batch(step, caches)

        # every timed step grows the past by one token: 128..~140, close enough to 128
        decode[b] = _best(one_step, reps)
        del caches

        def head_step(step: np.ndarray = step) -> None:
            head.run(step)

        head_decode[b] = _best(head_step, reps)
    n_ids = min(256, ctx)
    ids = rng.integers(0, int(cfg["vocab_size"]), (1, n_ids), dtype=np.int64)
    embed_s = _best(lambda: emb.run(ids), reps) / n_ids
    one = rng.normal(0, 1, (1, 1, h)).astype(np.float32)
    return {
        "prefill_tokens": points,
        "layer_prefill_s": [round(v, 7) for v in prefill],
        "layer_decode_s": [round(v, 7) for v in _fill(decode, MAX_CONCURRENCY)],
        "embed_s": round(embed_s, 9),
        "head_prefill_s": round(_best(lambda: head.run(one), reps), 7),
        "head_decode_s": [round(v, 7) for v in _fill(head_decode, MAX_CONCURRENCY)],
        "measured": {
            "threads": n,
            "graph": variant[0],
            "precision": variant[1],
            "past_tokens": past_tokens,
            "decode_batches": list(DECODE_BATCHES),
            "model": manifest.name,
            "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }


def profile_path(
    manifest: Manifest, threads: int, variant: tuple[str, str] = ("standard", "fp32")
) -> Path:
    name = f"{manifest.fingerprint[:16]}-{variant[0]}-{variant[1]}-t{threads}.yaml"
    return cache_dir() / "profiles" / name


def load_or_measure_profile(
    manifest: Manifest,
    threads: int | None = None,
    path: Path | None = None,
    variant: tuple[str, str] | None = None,
    on_measure: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The cached profile of this device, measured first if there is none (then
    ``on_measure`` is called, so a caller can tell its user why it waits)."""
    from e2llm_edge.device.fast_runner import choose_variant

    variant = variant or choose_variant(manifest)
    n = configure_threads(threads)
    path = path or profile_path(manifest, n, variant)
    if path.is_file():
        try:
            d = yaml.safe_load(path.read_text())
            problem = profile_problem(d) if isinstance(d, dict) else "not a mapping"
            if problem is None:
                return d
            log.warning("%s: cached profile unusable (%s), measuring again", path, problem)
        except yaml.YAMLError:
            log.warning("%s: unreadable cached profile, measuring again", path)
    log.info("measuring the device profile (%d threads)...", n)
    if on_measure is not None:
        on_measure()
    prof = measure_profile(manifest, threads, variant=variant)
    problem = profile_problem(prof)
    if problem is not None:  # a bug, not noise: _fill keeps measured figures valid
        raise ValueError(f"measured profile is invalid: {problem}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(prof, sort_keys=False))
    tmp.replace(path)
    return prof


def profile_data(prof: dict[str, Any]) -> ProfileData:
    """The profile as the typed struct a device announces (`DeviceProfileMsg.profile`)."""
    meta = prof.get("measured")
    return ProfileData(
        prefill_tokens=[int(x) for x in prof["prefill_tokens"]],
        layer_prefill_s=[float(x) for x in prof["layer_prefill_s"]],
        layer_decode_s=[float(x) for x in prof["layer_decode_s"]],
        embed_s=float(prof["embed_s"]),
        head_prefill_s=float(prof["head_prefill_s"]),
        head_decode_s=[float(x) for x in prof["head_decode_s"]],
        measured=ProfileMeta(
            threads=int(meta["threads"]),
            graph=str(meta["graph"]),
            precision=str(meta["precision"]),
            past_tokens=int(meta["past_tokens"]),
            decode_batches=[int(x) for x in meta["decode_batches"]],
            model=str(meta["model"]),
            at=str(meta["at"]),
        )
        if isinstance(meta, dict)
        else None,
    )
