"""Run model segments with onnxruntime: the one execution engine of the local path and agents.

Threading: each session has its own intra-op pool whose threads spin only inside a run
(``session.force_spinning_stop``). Spinning between runs is what hurt before: with 30+
sessions, or several agent processes on one small machine, idle pools spinning stole the
cores from the session actually running (measured here: a 2-process pipeline at 46 ms/step
with spinning pools vs 18 ms with none; 30 spinning per-session pools at ~2 tokens/s).
A global pool cannot stop spinning from Python, so none is used.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from e2llm_edge.device.ranges import compose
from e2llm_edge.sysinfo import release_freed_memory
from onnx_export.errors import ExportError
from onnx_export.manifest import Manifest, Segment, kv_windows

log = logging.getLogger(__name__)

_threads_lock = threading.Lock()
_threads: int | None = None


def default_threads() -> int:
    """E2LLM_THREADS, else the CPUs this process may use (cgroup/affinity aware)."""
    env = os.environ.get("E2LLM_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover (non-Linux)
        return os.cpu_count() or 1


def configure_threads(threads: int | None = None) -> int:
    """Fix the process's onnxruntime thread count once (the first caller wins); return it.

    One count per process keeps its profile (measured with that count) true for every
    session it later opens.
    """
    global _threads
    with _threads_lock:
        if _threads is None:
            _threads = threads or default_threads()
        return _threads


def make_session(
    path: Path | bytes,
    threads: int | None = None,
    *,
    profile: str | None = None,
    external_dir: Path | None = None,
    name: str | None = None,
) -> Any:
    """An InferenceSession with the process's thread settings (a file path or model bytes).
    `profile`: a file prefix; onnxruntime then records every operator's time
    (`session.end_profiling()` writes the JSON, `bench/op_profile.py` reads it).
    `external_dir`: where the external data of a model given as bytes lives; `name`: what
    an error calls the model (default: its path).

    One thread: no pool, each run executes on the calling thread. More: a per-session pool
    that spins during a run (between operators) and sleeps as soon as the run ends, so an
    idle agent costs no CPU. Measured side by side (``bench/local_decode.py``): 2 threads
    this way decode ~1.3-1.4x faster than 1 thread, while a spinning 2-thread global pool
    was slower than 1 thread on this 2-vCPU machine.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    n = configure_threads(threads)
    so.intra_op_num_threads = n
    so.inter_op_num_threads = 1
    if n > 1:
        so.add_session_config_entry("session.force_spinning_stop", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if external_dir is not None:
        so.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(external_dir)
        )
    try:
        src = path if isinstance(path, bytes) else str(path)
        session = ort.InferenceSession(src, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
        where = name or ("<model bytes>" if isinstance(path, bytes) else path)
        raise ExportError(f"{where}: onnxruntime cannot load it ({exc})") from exc
    release_freed_memory()
    return session


_prefill_options: Any = None


def prefill_run_options() -> Any:
    """Run options for a run of more than one token: onnxruntime hands the arena's free
    chunks back when the run ends (`memory.enable_memory_arena_shrinkage`). A prefill
    chunk's activations grow the arena, which otherwise keeps them for the life of the
    session while decode needs a fraction; decode runs keep the arena as it is. Measured on
    Qwen2.5-0.5B (all 24 layers, 256-token chunk): 50 -> 20 MB held after a prefill, 13 MB
    with `release_freed_memory` after it; decode and prefill speed unchanged within noise
    (bench/results/real_models.md)."""
    global _prefill_options
    if _prefill_options is None:
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        _prefill_options = options
    return _prefill_options


def open_segments(
    manifest: Manifest,
    segments: list[Segment],
    *,
    verify: bool = True,
    threads: int | None = None,
    profile: str | None = None,
) -> Any:
    """One session running `segments` in order (one segment, or a chain of contiguous layer
    segments), composed on the device with the weights read where they lie in the model
    directory (`e2llm_edge.device.ranges`); with `verify`, every file is checked against the
    manifest's sha256 first."""
    model, folder = compose(manifest, segments, verify=verify)
    files = [manifest.path(s) for s in segments]
    name = str(files[0]) if len(files) == 1 else f"{files[0]} .. {files[-1].name}"
    return make_session(model, threads, profile=profile, external_dir=folder, name=name)


@dataclass(frozen=True)
class Part:
    """One session of a stage and the layers it runs."""

    layers: range
    session: Any


def open_parts(
    manifest: Manifest,
    start: int,
    end: int,
    variant: tuple[str, str],
    *,
    prefer_ranges: bool = True,
    one_session: bool = True,
    verify: bool = True,
    threads: int | None = None,
    profile: str | None = None,
) -> list[Part]:
    """The sessions for layers [start, end) of `variant`: the manifest's cover (exported
    ranges where present and `prefer_ranges`, else per-layer segments), composed into one
    session, or with `one_session=False` one session per segment (slower, and each file's
    copy of shared constants stays separate: bench/range_sessions.py)."""
    segs = manifest.cover(start, end, *variant, longest=prefer_ranges)
    groups = [segs] if one_session else [[s] for s in segs]
    return [
        Part(
            range(g[0].layers.start, g[-1].layers.stop),
            open_segments(manifest, g, verify=verify, threads=threads, profile=profile),
        )
        for g in groups
    ]


class StageCache(Protocol):
    """One request's KV cache for the layers of one stage."""

    @property
    def length(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def kv(self, layer: int) -> tuple[int, np.ndarray, np.ndarray]:
        """What `layer` holds: the position of its first token and its keys and values
        `(1, nkv, n, d)` (views where possible). A sliding-window layer holds its last
        min(length, window) positions; every other layer all `length` from 0."""
        ...

    def load(self, layer: int, key: np.ndarray, value: np.ndarray, token_start: int) -> None:
        """Write a received chunk `(1, nkv, n, d)` at tokens [token_start, token_start + n)
        (a sliding-window layer: into an empty layer, at least the last window of them)."""
        ...


class Stage(Protocol):
    """What an agent runs: layers [start, end) of one graph variant."""

    start: int
    end: int

    def new_cache(self, capacity: int) -> StageCache:
        """An empty cache able to hold `capacity` tokens."""
        ...

    def run(self, hidden: np.ndarray, start_pos: int, cache: StageCache) -> np.ndarray:
        """One sequence: hidden `(1, T, H)` at positions start_pos.. -> `(1, T, H)`."""
        ...

    def run_batch(self, hidden: np.ndarray, caches: list[StageCache]) -> np.ndarray:
        """Batched decode: hidden `(B, 1, H)`, request b at position caches[b].length."""
        ...


@dataclass
class KVCache:
    """Per-layer past keys/values `(B, nkv, S, d)`, grown by the graph's Concat each step;
    sliding-window layers (`windows`: layer -> window) are cut back to their last `window`
    positions after each step (`dropped`: positions no longer held, per layer)."""

    keys: dict[int, np.ndarray] = field(default_factory=dict)
    values: dict[int, np.ndarray] = field(default_factory=dict)
    windows: dict[int, int] = field(default_factory=dict)
    dropped: dict[int, int] = field(default_factory=dict)

    @property
    def length(self) -> int:
        if not self.keys:
            return 0
        i = next(iter(self.keys))
        return self.dropped.get(i, 0) + self.keys[i].shape[2]

    def kv(self, layer: int) -> tuple[int, np.ndarray, np.ndarray]:
        return self.dropped.get(layer, 0), self.keys[layer], self.values[layer]

    def load(self, layer: int, key: np.ndarray, value: np.ndarray, token_start: int) -> None:
        have = self.dropped.get(layer, 0) + self.keys[layer].shape[2]
        window = self.windows.get(layer)
        end = token_start + key.shape[2]
        if window is not None and have == 0 and end - token_start >= min(end, window):
            self.keys[layer], self.values[layer] = key, value
            self.dropped[layer] = token_start
        elif token_start != have:
            raise ValueError(
                f"layer {layer}: chunk starts at token {token_start}, cache holds {have}"
            )
        else:
            self.keys[layer] = np.concatenate([self.keys[layer], key], axis=2)
            self.values[layer] = np.concatenate([self.values[layer], value], axis=2)
        self.trim()

    def trim(self) -> None:
        """Cut sliding-window layers back to their last `window` positions."""
        for i, w in self.windows.items():
            n = self.keys[i].shape[2] if i in self.keys else 0
            if n > w:
                self.keys[i] = self.keys[i][:, :, n - w :]
                self.values[i] = self.values[i][:, :, n - w :]
                self.dropped[i] = self.dropped.get(i, 0) + n - w

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for d in (self.keys, self.values) for a in d.values())


# Prompts longer than this are prefilled in chunks of it, each attending to the cache so far,
# by both graphs (bit-identical outputs). Attention's scratch then grows with the chunk, not
# the prompt, and it is faster (the scores fit the caches). Measured here for all 30 layers
# (onnxruntime 1.32, 2 threads), peak memory growth of a 2000-token prefill: contrib 81 -> 19
# MB beyond its preallocated KV cache; standard, whose scores and mask are (heads, T, T),
# 299 -> 107 MB in all (92 MB of it the KV cache). Time for 1000 tokens: contrib 862 -> 795 ms
# exact and 919 -> 854 ms int8, standard 1069 -> 846 ms. Chunks of 192-384 were alike.
PREFILL_CHUNK = 256


def in_chunks(
    run: Callable[[np.ndarray, int, StageCache], np.ndarray],
    hidden: np.ndarray,
    start_pos: int,
    cache: StageCache,
) -> np.ndarray | None:
    """`run` chunk by chunk when `hidden` (1, T, H) is longer than PREFILL_CHUNK, else None."""
    t, n = hidden.shape[1], PREFILL_CHUNK
    if t <= n:
        return None
    return np.concatenate(
        [run(hidden[:, s : s + n], start_pos + s, cache) for s in range(0, t, n)], axis=1
    )


class LayerStack:
    """Layers [start, end) of a model as few sessions as the manifest allows."""

    def __init__(
        self,
        manifest: Manifest,
        start: int,
        end: int,
        *,
        verify: bool = True,
        prefer_ranges: bool = True,
        one_session: bool = True,
        threads: int | None = None,
        parts: list[Part] | None = None,
    ) -> None:
        """`parts`: sessions opened elsewhere (bench/range_sessions.py compares loaders)."""
        cfg = manifest.config
        self.start, self.end = start, end
        self.n_kv_heads, self.head_dim = int(cfg["n_kv_heads"]), int(cfg["head_dim"])
        self.windows = {i: w for i, w in kv_windows(cfg).items() if start <= i < end}
        self.parts = parts or open_parts(
            manifest,
            start,
            end,
            ("standard", "fp32"),
            prefer_ranges=prefer_ranges,
            one_session=one_session,
            verify=verify,
            threads=threads,
        )
        self.outputs = [
            ["hidden_out", *(f"present_{kv}_{i}" for i in p.layers for kv in ("key", "value"))]
            for p in self.parts
        ]

    def empty_past(self, batch: int) -> KVCache:
        z = np.zeros((batch, self.n_kv_heads, 0, self.head_dim), np.float32)
        layers = range(self.start, self.end)
        return KVCache({i: z for i in layers}, {i: z for i in layers}, dict(self.windows))

    def new_cache(self, capacity: int) -> KVCache:
        return self.empty_past(1)

    def run(self, hidden: np.ndarray, start_pos: int, cache: StageCache) -> np.ndarray:
        assert isinstance(cache, KVCache)
        chunked = in_chunks(self.run, hidden, start_pos, cache)
        if chunked is not None:
            return chunked
        t = hidden.shape[1]
        pos = np.arange(start_pos, start_pos + t, dtype=np.int64)[None, :]
        return self.forward(hidden, pos, np.ones((1, start_pos + t), np.int64), cache)

    def run_batch(self, hidden: np.ndarray, caches: list[StageCache]) -> np.ndarray:
        """The portable graph advances each request on its own (its KV grows by Concat)."""
        return np.concatenate(
            [self.run(hidden[b : b + 1], c.length, c) for b, c in enumerate(caches)], axis=0
        )

    def forward(
        self,
        hidden: np.ndarray,
        position_ids: np.ndarray,
        attention_mask: np.ndarray,
        cache: KVCache,
    ) -> np.ndarray:
        """Advance `hidden` (B, T, H) through the layers; `cache` grows by T in place."""
        many = hidden.shape[1] > 1
        for part, names in zip(self.parts, self.outputs, strict=True):
            feeds: dict[str, np.ndarray] = {
                "hidden": hidden,
                "position_ids": position_ids,
                "attention_mask": attention_mask,
            }
            for i in part.layers:
                feeds[f"past_key_{i}"] = cache.keys[i]
                feeds[f"past_value_{i}"] = cache.values[i]
            outs = part.session.run(names, feeds, prefill_run_options() if many else None)
            hidden = outs[0]
            for j, i in enumerate(part.layers):
                cache.keys[i] = outs[1 + 2 * j]
                cache.values[i] = outs[2 + 2 * j]
            cache.trim()
        if many:
            release_freed_memory()
        return hidden


class Embedder:
    def __init__(self, manifest: Manifest, *, verify: bool = True, threads: int | None = None):
        self.session = open_segments(
            manifest, [_only(manifest, "embed")], verify=verify, threads=threads
        )

    def run(self, ids: np.ndarray) -> np.ndarray:
        """(B, T) int64 -> (B, T, H) float32."""
        out: np.ndarray = self.session.run(None, {"input_ids": ids})[0]
        return out


class Head:
    def __init__(self, manifest: Manifest, *, verify: bool = True, threads: int | None = None):
        self.session = open_segments(
            manifest, [_only(manifest, "head")], verify=verify, threads=threads
        )

    def run(self, hidden: np.ndarray) -> np.ndarray:
        """(B, T, H) -> (B, T, V) logits."""
        return self.run_with_bound(hidden)[0]

    def run_with_bound(self, hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Logits (B, T, V) and their error bound (B, T). A finite bound (the screened
        contrib head): logits within one bound of the row's top are exact, all within the
        bound. +inf: the row was not certified (flat or non-finite; screened logits). 0: no
        screening, logits as the precision computes them (exact for standard/fp32 and
        contrib/exact)."""
        out = self.session.run(None, {"hidden": hidden})
        bound = out[1] if len(out) > 1 else np.zeros(out[0].shape[:2], np.float32)
        return out[0], bound


def _only(manifest: Manifest, kind: str) -> Segment:
    segs = manifest.by_kind(kind)
    if not segs:
        raise ExportError(f"{manifest.directory}: manifest has no {kind} segment")
    return segs[0]
