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


WINDOW_S = 0.1
"""Each timing repeats the call for at least this long and takes the mean per call."""
DECODE_STEPS = 64
"""Most decode steps timed in one window (each grows the past by a token: 128..192)."""


def _best(
    fn: Callable[[], object],
    reps: int,
    *,
    window_s: float = WINDOW_S,
    max_calls: int | None = None,
    setup: Callable[[], None] | None = None,
) -> float:
    """Seconds per call sustained over a window, the fastest of `reps` windows after one
    warm-up: the device's capability, not its noise. `setup` (untimed) runs before the
    warm-up and before each window; a window ends after `window_s` or `max_calls` calls.

    A window, not one call: a CPU handed out in slices (a CFS quota, a shared VM, a
    throttled board) runs a call that fits in a slice at full speed. Under a 15% quota
    (10 ms period) the fastest single call timed one layer's 16-token prefill and its
    decode step at their full-speed figures, while the 1024-token prefill, spanning many
    slices, took 6.6x longer: a stage of many layers would have run ~6.7x slower than
    its profile said."""
    if setup is not None:
        setup()
    fn()
    best = float("inf")
    for _ in range(reps):
        if setup is not None:
            setup()
        calls = 0
        t0 = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= window_s or (max_calls is not None and calls >= max_calls):
                break
        best = min(best, elapsed / calls)
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
        context=min(past_tokens + DECODE_STEPS + 16, ctx),
    )
    emb, head = VariantEmbedder(manifest, variant), VariantHead(manifest, variant)
    rng = np.random.default_rng(0)
    text = np.asarray(manifest.profile_ids, np.int64)
    if text.size and int(text.max()) >= int(cfg["vocab_size"]):
        text = text[:0]  # not this model's ids: random hidden states instead

    def inputs(rows: int, n: int, at: int) -> np.ndarray:
        """(rows, n, H) layer inputs: the embedded profile text, row r reading it from
        position at + 97 r (cycled), so a mixture of experts routes each token as on real
        text; without it, random hidden states."""
        if not text.size:
            return rng.normal(0, 1, (rows, n, h)).astype(np.float32)
        pos = at + 97 * np.arange(rows)[:, None] + np.arange(n)[None, :]
        return emb.run(text[pos % text.size])

    prefill = []
    for tokens in points:
        x = inputs(1, tokens, 0)

        def pre(x: np.ndarray = x, n: int = tokens) -> None:
            stack.run(x, 0, stack.new_cache(n))

        prefill.append(_best(pre, reps))
    decode: dict[int, float] = {}
    head_decode: dict[int, float] = {}
    past = inputs(1, past_tokens, 0)
    # a window's steps grow the past; a small model's context bounds how many fit
    cache_len = min(past_tokens + DECODE_STEPS + 8, ctx)
    steps = min(DECODE_STEPS, cache_len - past_tokens)
    for b in DECODE_BATCHES:
        caches: list[StageCache] = []
        # each step feeds every request its next token: the experts a batch touches change
        # from step to step as in a real decode, not one fixed set
        steps_x = np.ascontiguousarray(
            inputs(b, steps, past_tokens).transpose(1, 0, 2)[..., None, :]
        )
        done = [0]

        def fresh(b: int = b, caches: list[StageCache] = caches, done: list[int] = done) -> None:
            caches.clear()
            done[0] = 0
            for _ in range(b):
                c = stack.new_cache(cache_len)
                stack.run(past, 0, c)
                caches.append(c)

        def one_step(
            steps_x: np.ndarray = steps_x, caches: list[StageCache] = caches, done: list[int] = done
        ) -> None:
            stack.run_batch(steps_x[done[0] % len(steps_x)], caches)  # (b, 1, H)
            done[0] += 1

        decode[b] = _best(one_step, reps, max_calls=steps, setup=fresh)
        caches.clear()

        def head_step(step: np.ndarray = steps_x[0]) -> None:
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
            "inputs": "text" if text.size else "random",
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
