"""Run contrib segments: KV caches live in preallocated buffers bound with IO binding.

GroupQueryAttention writes each step's keys/values in place when past and present are bound
to the same buffer, so decode copies nothing per step. Batched decode advances B requests
in one session run: their caches are slots of one pooled buffer `(slots, nkv, C, d)` per
layer, kept contiguous so a batch binds a view of the pool (slots move only when the set of
requests in flight changes, never per step).
"""

from __future__ import annotations

import itertools
import logging
import mmap
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from e2llm_edge.device.runner import (
    Embedder,
    Head,
    LayerStack,
    Part,
    Stage,
    StageCache,
    in_chunks,
    open_parts,
    open_segments,
    prefill_run_options,
)
from e2llm_edge.sysinfo import release_freed_memory
from onnx_export.errors import ExportError
from onnx_export.manifest import VARIANT_PREFERENCE, Manifest, Segment, kv_windows

log = logging.getLogger(__name__)
_serials = itertools.count()

CONTRIB_OPS = (
    "GroupQueryAttention",
    "MatMulNBits",
    "SkipSimplifiedLayerNormalization",
    "QuickGelu",
)


def contrib_supported(windows: bool = False) -> bool:
    """Whether this onnxruntime has the com.microsoft operators the contrib graph uses and,
    with `windows` (a model with sliding-window layers), GroupQueryAttention's window-sized
    KV buffer (`sliding_window_cache`: onnxruntime 1.32 has it)."""
    try:
        import onnxruntime.capi.onnxruntime_pybind11_state as C

        have = {s.name: s for s in C.get_all_operator_schema() if s.domain == "com.microsoft"}
    except (ImportError, AttributeError):
        return False
    if not all(op in have for op in CONTRIB_OPS):
        return False
    return not windows or "sliding_window_cache" in have["GroupQueryAttention"].attributes


@dataclass
class FastCache:
    """One request's KV for layers [start, end): views into a pool slot or its own buffer.
    A sliding-window layer's buffer (`windows`: layer -> window) is window-sized: its rows
    [0, min(T, window)) hold the last positions of the T it has seen (the graph's
    GroupQueryAttention evicts; `onnx_export.fast_graph.layers_model`)."""

    start: int
    end: int
    capacity: int
    keys: dict[int, np.ndarray]  # layer -> (1, nkv, C, d), C >= capacity (window: C = window)
    values: dict[int, np.ndarray]
    slot: int | None = None
    filled: dict[int, int] = field(default_factory=dict)  # tokens seen per layer
    pool: KVPool | None = None
    serial: int = field(default_factory=lambda: next(_serials))
    windows: dict[int, int] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return min(self.filled.values()) if self.filled else 0

    def held(self, layer: int) -> int:
        """Positions `layer` holds: all it has seen, or its last window of them."""
        return min(self.filled[layer], self.windows.get(layer, self.filled[layer]))

    @property
    def nbytes(self) -> int:
        return sum(
            self.held(i) * self.keys[i].shape[1] * self.keys[i].shape[3] * 4 * 2 for i in self.keys
        )

    def kv(self, layer: int) -> tuple[int, np.ndarray, np.ndarray]:
        n = self.held(layer)
        return self.filled[layer] - n, self.keys[layer][:, :, :n], self.values[layer][:, :, :n]

    def load(self, layer: int, key: np.ndarray, value: np.ndarray, token_start: int) -> None:
        have, n = self.filled[layer], key.shape[2]
        end = token_start + n
        if end > self.capacity:
            raise ValueError(
                f"layer {layer}: {end} tokens exceed the cache capacity {self.capacity}"
            )
        window = self.windows.get(layer)
        if window is not None and have == 0 and n >= min(end, window):
            keep = min(end, window)  # the operator's layout: the last positions from row 0
            self.keys[layer][:, :, :keep] = key[:, :, n - keep :]
            self.values[layer][:, :, :keep] = value[:, :, n - keep :]
        elif token_start != have or window is not None:
            raise ValueError(
                f"layer {layer}: chunk holds tokens [{token_start}, {end}), cache holds {have}"
                + (f" (a window of {window}: send its last positions at once)" if window else "")
            )
        else:
            self.keys[layer][:, :, token_start:end] = key
            self.values[layer][:, :, token_start:end] = value
        self.filled[layer] = end

    def advance(self, n: int) -> None:
        for i in self.filled:
            self.filled[i] += n

    def release(self) -> None:
        """Give a pool slot back (the cache must not be used afterwards)."""
        if self.pool is not None and self.slot is not None:
            self.pool.free(self)


def kv_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """fp32 zeros whose pages become resident only as they are written, 4 KB at a time.

    np.zeros is lazy too, but numpy asks for transparent huge pages on arrays over 4 MB
    (madvise), so the first token written in each head's run of a large KV buffer made 2 MB
    of it resident: Qwen2.5-0.5B's 24 layers took 96-100 MB for a 200-token request in a
    4096-token slot (the 1.5B: ~220 MB). An anonymous mapping of its own, huge pages
    declined, holds what was written: 5.7 MB for those 200 tokens."""
    n = int(np.prod(shape))
    size = max(4 * n, 1)
    if hasattr(mmap, "MAP_ANONYMOUS"):  # Unix: private, as the heap is (not shared memory)
        buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    else:
        buf = mmap.mmap(-1, size)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux; elsewhere no huge pages are asked for
        buf.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(buf, np.float32, count=n).reshape(shape)


class KVPool:
    """`slots` caches of `context` tokens per layer in one buffer per layer, allocated lazily
    (`kv_buffer`: unused context costs no resident memory)."""

    def __init__(
        self,
        layers: range,
        slots: int,
        context: int,
        nkv: int,
        d: int,
        windows: dict[int, int] | None = None,
    ) -> None:
        """`windows`: layer -> window of the sliding-window layers (buffers of that size)."""
        self.layers, self.slots, self.context = layers, slots, context
        self.windows = dict(windows or {})
        rows = {i: self.windows.get(i, context) for i in layers}
        self.keys = {i: kv_buffer((slots, nkv, rows[i], d)) for i in layers}
        self.values = {i: kv_buffer((slots, nkv, rows[i], d)) for i in layers}
        # Weak: a cache the runtime drops (no explicit release) frees its slot by itself.
        self._owner: list[weakref.ref[FastCache] | None] = [None] * slots

    def owner(self, s: int) -> FastCache | None:
        ref = self._owner[s]
        return ref() if ref is not None else None

    def alloc(self, capacity: int) -> FastCache | None:
        free = [s for s in range(self.slots) if self.owner(s) is None]
        if capacity > self.context or not free:
            return None
        s = free[0]
        c = FastCache(
            self.layers.start,
            self.layers.stop,
            self.context,
            {i: self.keys[i][s : s + 1] for i in self.layers},
            {i: self.values[i][s : s + 1] for i in self.layers},
            slot=s,
            filled={i: 0 for i in self.layers},
            pool=self,
            windows=self.windows,
        )
        self._owner[s] = weakref.ref(c)
        return c

    def free(self, cache: FastCache) -> None:
        if cache.slot is not None and self.owner(cache.slot) is cache:
            self._owner[cache.slot] = None
        cache.slot = None

    def _place(self, cache: FastCache, s: int) -> None:
        cache.slot = s
        cache.keys = {i: self.keys[i][s : s + 1] for i in self.layers}
        cache.values = {i: self.values[i][s : s + 1] for i in self.layers}
        self._owner[s] = weakref.ref(cache)

    def _swap(self, a: int, b: int) -> None:
        """Exchange the contents (used tokens only) and owners of slots a and b."""
        ca, cb = self.owner(a), self.owner(b)
        n = max(c.length if c is not None else 0 for c in (ca, cb))
        for buf in (*self.keys.values(), *self.values.values()):
            rows = min(n, buf.shape[2])
            tmp = buf[a, :, :rows].copy()
            buf[a, :, :rows] = buf[b, :, :rows]
            buf[b, :, :rows] = tmp
        self._owner[a], self._owner[b] = None, None
        if ca is not None:
            self._place(ca, b)
        if cb is not None:
            self._place(cb, a)

    def contiguous(self, caches: list[FastCache]) -> int:
        """Move `caches` (all in this pool) into adjacent slots; return the first one.

        Already adjacent: nothing moves. Otherwise the batch gathers in slots [0, B), each
        outsider swapped with a slot of the window not held by the batch (B - inside of them).
        """
        slots = sorted(c.slot for c in caches if c.slot is not None)
        if len(slots) != len(caches) or any(
            self.owner(c.slot) is not c for c in caches if c.slot is not None
        ):
            raise ValueError("a cache in the batch is not in this stage's pool")
        if slots[-1] - slots[0] == len(slots) - 1:
            return slots[0]
        b, wanted = len(caches), {id(c) for c in caches}
        for c in caches:
            assert c.slot is not None
            if c.slot >= b:
                free = next(j for j in range(b) if id(self.owner(j)) not in wanted)
                self._swap(c.slot, free)
        return 0


class _Bound:
    """A session with its IO binding and the identity of what is currently bound."""

    def __init__(self, part: Part) -> None:
        self.layers, self.session = part.layers, part.session
        self.io = part.session.io_binding()
        self.key: tuple[Any, ...] | None = None


class FastLayerStack:
    """Layers [start, end) of a contrib variant: a `Stage` with IO-bound, in-place KV.
    `profile`: a file prefix for onnxruntime's per-operator profiler (`bench/op_profile.py`)."""

    def __init__(
        self,
        manifest: Manifest,
        start: int,
        end: int,
        *,
        precision: str = "exact",
        verify: bool = True,
        threads: int | None = None,
        max_batch: int = 8,
        context: int | None = None,
        profile: str | None = None,
        prefer_ranges: bool = True,
        one_session: bool = True,
        parts: list[Part] | None = None,
    ) -> None:
        """`parts`: sessions opened elsewhere (bench/range_sessions.py compares loaders)."""
        cfg = manifest.config
        self.start, self.end = start, end
        self.precision = precision
        self.nkv, self.d, self.hidden = (
            int(cfg["n_kv_heads"]),
            int(cfg["head_dim"]),
            int(cfg["hidden_size"]),
        )
        self.context = min(int(context or cfg["max_position"]), int(cfg["max_position"]))
        self.windows = {i: w for i, w in kv_windows(cfg).items() if start <= i < end}
        self.parts = parts or open_parts(
            manifest,
            start,
            end,
            ("contrib", precision),
            prefer_ranges=prefer_ranges,
            one_session=one_session,
            verify=verify,
            threads=threads,
            profile=profile,
        )
        self.bound = [_Bound(p) for p in self.parts]
        self.max_batch = max_batch
        self._pool: KVPool | None = None
        self._seqlens = np.zeros(max(1, max_batch), np.int32)
        self._total = np.zeros((), np.int32)

    # -- caches

    def reconfigure(self, max_batch: int) -> None:
        """A new pool size (a role or concurrency change): same sessions, no reload. Every
        cache of the old pool must have been dropped."""
        self.max_batch = max_batch
        self._pool = None
        self._seqlens = np.zeros(max(1, max_batch), np.int32)
        for bd in self.bound:
            bd.key = None

    @property
    def pool(self) -> KVPool:
        if self._pool is None:
            self._pool = KVPool(
                range(self.start, self.end),
                self.max_batch,
                self.context,
                self.nkv,
                self.d,
                self.windows,
            )
        return self._pool

    def new_cache(self, capacity: int) -> FastCache:
        """A pool slot when one is free and `capacity` fits, else a buffer of its own."""
        c = self.pool.alloc(capacity) if self.max_batch > 0 else None
        if c is not None:
            return c
        layers = range(self.start, self.end)

        def buf(i: int) -> np.ndarray:
            return kv_buffer((1, self.nkv, self.windows.get(i, capacity), self.d))

        return FastCache(
            self.start,
            self.end,
            capacity,
            {i: buf(i) for i in layers},
            {i: buf(i) for i in layers},
            filled={i: 0 for i in layers},
            windows=self.windows,
        )

    # -- running

    def run(self, hidden: np.ndarray, start_pos: int, cache: StageCache) -> np.ndarray:
        """One sequence: hidden (1, T, H) at positions start_pos.. -> (1, T, H)."""
        assert isinstance(cache, FastCache)
        if start_pos != cache.length:
            raise ValueError(f"start_pos {start_pos} != cache length {cache.length}")
        t = hidden.shape[1]
        if start_pos + t > cache.capacity:
            raise ValueError(f"{start_pos + t} tokens exceed the cache capacity {cache.capacity}")
        chunked = in_chunks(self.run, hidden, start_pos, cache)
        if chunked is not None:
            return chunked
        self._seqlens[0] = start_pos + t - 1
        self._total[...] = start_pos + t
        out = self._forward(
            hidden, cache.keys, cache.values, ("one", cache.serial, cache.slot), self._seqlens[:1]
        )
        cache.advance(t)
        return out

    def run_batch(self, hidden: np.ndarray, caches: list[StageCache]) -> np.ndarray:
        """Batched decode: hidden (B, 1, H), request b at position caches[b].length."""
        fc = [c for c in caches if isinstance(c, FastCache)]
        b = len(caches)
        if b == 1 or len(fc) != b or any(c.pool is not self._pool or c.slot is None for c in fc):
            return np.concatenate(
                [self.run(hidden[j : j + 1], c.length, c) for j, c in enumerate(caches)], axis=0
            )
        lengths = [c.length for c in fc]
        if any(n + 1 > c.capacity for n, c in zip(lengths, fc, strict=True)):
            raise ValueError("a request's cache is full")
        pool = self.pool
        lo = pool.contiguous(fc)
        order = np.argsort([c.slot or 0 for c in fc])  # batch row r holds request order[r]
        x = np.ascontiguousarray(hidden[order])
        self._seqlens[:b] = [lengths[j] for j in order]
        self._total[...] = max(lengths) + 1
        keys = {i: pool.keys[i][lo : lo + b] for i in range(self.start, self.end)}
        values = {i: pool.values[i][lo : lo + b] for i in range(self.start, self.end)}
        out = self._forward(x, keys, values, ("pool", lo, b), self._seqlens[:b])
        for c in fc:
            c.advance(1)
        res = np.empty_like(out)
        res[order] = out
        return res

    def _forward(
        self,
        hidden: np.ndarray,
        keys: dict[int, np.ndarray],
        values: dict[int, np.ndarray],
        key: tuple[Any, ...],
        seqlens: np.ndarray,
    ) -> np.ndarray:
        x = np.ascontiguousarray(hidden, dtype=np.float32)
        many = x.shape[1] > 1
        for bd in self.bound:
            io = bd.io
            if bd.key != key:  # bind the KV buffers once per cache (or batch), not per step
                for i in bd.layers:
                    for nm, arr in ((f"key_{i}", keys[i]), (f"value_{i}", values[i])):
                        _bind(io.bind_input, "past_" + nm, arr)
                        _bind(io.bind_output, "present_" + nm, arr)
                bd.key = key
            _bind(io.bind_input, "seqlens_k", seqlens)
            _bind(io.bind_input, "total_sequence_length", self._total)
            _bind(io.bind_input, "hidden", x)
            out = np.empty(x.shape, np.float32)
            _bind(io.bind_output, "hidden_out", out)
            bd.session.run_with_iobinding(io, prefill_run_options() if many else None)
            x = out
        if many:
            release_freed_memory()
        return x


def _bind(fn: Any, name: str, arr: np.ndarray) -> None:
    """Bind a C-contiguous numpy array (or view) by pointer: no copy in or out."""
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: buffer is not contiguous")
    fn(name, "cpu", 0, arr.dtype, list(arr.shape), arr.ctypes.data)


def _segments(manifest: Manifest, kind: str, variant: tuple[str, str]) -> list[Segment]:
    segs = manifest.by_kind(kind, *variant)
    if not segs:
        raise ExportError(
            f"{manifest.directory}: manifest has no {kind} segment for {variant[0]}/{variant[1]}"
        )
    return segs


def _session(manifest: Manifest, seg: Segment, verify: bool, threads: int | None) -> Any:
    return open_segments(manifest, [seg], verify=verify, threads=threads)


class VariantEmbedder(Embedder):
    """`Embedder` of any graph variant (same input_ids -> hidden interface)."""

    def __init__(
        self,
        manifest: Manifest,
        variant: tuple[str, str],
        *,
        verify: bool = True,
        threads: int | None = None,
    ) -> None:
        self.session = _session(manifest, _segments(manifest, "embed", variant)[0], verify, threads)


class VariantHead(Head):
    """`Head` of any graph variant (same hidden -> logits interface).

    With two head segments (the screened head and `head_unscreened`), the screened one is
    timed once; if it takes over `FAST_ENOUGH_S` (its fast path: 1-3 ms here), the other is
    timed too and kept when the screen is `SLOW_SCREEN` times slower: onnxruntime lacks a
    fast 8-bit int8 kernel on some CPUs (no ARM dotprod), and the screen then costs ~25x.
    """

    SLOW_SCREEN = 3.0
    FAST_ENOUGH_S = 0.010

    def __init__(
        self,
        manifest: Manifest,
        variant: tuple[str, str],
        *,
        verify: bool = True,
        threads: int | None = None,
    ) -> None:
        segs = _segments(manifest, "head", variant)
        self.session, self.segment = _session(manifest, segs[0], verify, threads), segs[0]
        hidden = (
            np.random.default_rng(0)
            .normal(0, 1, (1, 1, int(manifest.config["hidden_size"])))
            .astype(np.float32)
        )
        if len(segs) > 1 and (first := _best_of(self.session, hidden)) > self.FAST_ENOUGH_S:
            other = _session(manifest, segs[1], verify, threads)
            second = _best_of(other, hidden)
            if first > self.SLOW_SCREEN * second:
                log.warning(
                    "head %s takes %.1f ms, %s %.1f ms: using the latter (no fast "
                    "8-bit int8 kernel on this CPU?)",
                    segs[0].name,
                    first * 1e3,
                    segs[1].name,
                    second * 1e3,
                )
                self.session, self.segment = other, segs[1]


def _best_of(session: Any, hidden: np.ndarray, runs: int = 3) -> float:
    best = float("inf")
    for _ in range(runs + 1):  # the first run allocates
        t = time.perf_counter()
        session.run(None, {"hidden": hidden})
        best = min(best, time.perf_counter() - t)
    return best


PREFERENCE = VARIANT_PREFERENCE


def choose_variant(manifest: Manifest) -> tuple[str, str]:
    """The best complete variant: exact contrib (fast, same tokens), else the portable
    graph; int8 (fastest, tokens drift) only when it is all there is or asked for."""
    have = set(manifest.variants())
    if not contrib_supported(windows=bool(kv_windows(manifest.config))):
        have = {v for v in have if v[0] != "contrib"}
    for v in PREFERENCE:
        if v in have:
            return v
    raise ExportError(
        f"{manifest.directory}: no complete variant this onnxruntime can run "
        f"(have {manifest.variants()})"
    )


def check_variant(manifest: Manifest, graph: str, precision: str) -> None:
    if (graph, precision) not in manifest.variants():
        raise ExportError(
            f"{manifest.directory}: no complete {graph}/{precision} variant "
            f"(have {manifest.variants()}); export it with "
            f"e2llm export --graph {graph} --precision {precision}"
        )


def load_stage(
    manifest: Manifest,
    start: int,
    end: int,
    variant: tuple[str, str],
    *,
    verify: bool = True,
    threads: int | None = None,
    prefer_ranges: bool = True,
    one_session: bool = True,
    max_batch: int = 0,
    context: int | None = None,
) -> Stage:
    """The `Stage` running layers [start, end) of `variant`: the one place that picks the
    runner class. The layers run as one session composed on the device from the segments
    the manifest has (exported ranges where present and `prefer_ranges`, else per-layer;
    `one_session=False`: a session per segment). `max_batch` > 0 gives contrib stages a
    pool of that many adjacent KV slots of `context` tokens for batched decode (0: every
    cache its own buffer)."""
    if variant[0] == "contrib":
        return FastLayerStack(
            manifest,
            start,
            end,
            precision=variant[1],
            verify=verify,
            threads=threads,
            max_batch=max_batch,
            context=context,
            prefer_ranges=prefer_ranges,
            one_session=one_session,
        )
    return LayerStack(
        manifest,
        start,
        end,
        verify=verify,
        prefer_ranges=prefer_ranges,
        one_session=one_session,
        threads=threads,
    )
