"""KV cache handoff between devices: cut a layer's cache into ~1 MB messages, put it back
together on the other side.

A PREFILL replica's stage sends each layer it holds to the DECODER device holding the same
layer; messages of about 1 MB are the sweet spot measured on Mosquitto (smaller ones pay
per-message overhead, larger ones stall the broker's queue for everyone else).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from e2llm_edge.errors import CodecError
from e2llm_edge.wire.messages import AttemptKey, KVChunk, RequestContext, RequestId

KV_CHUNK_BYTES = 1024 * 1024
"""Target payload per KV message; ~1 MB is the sweet spot measured on Mosquitto."""

KV_TOKEN_AXIS = 2


def chunk_array_pairs(
    key: np.ndarray,
    value: np.ndarray,
    *,
    axis: int = KV_TOKEN_AXIS,
    target_bytes: int = KV_CHUNK_BYTES,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Split (key, value) along ``axis`` into slices of about ``target_bytes`` together.

    Yields ``(start, key_slice, value_slice)``; at least one slice per token, and one
    (possibly empty) slice for zero tokens.
    """
    if key.shape[axis] != value.shape[axis]:
        raise ValueError(f"key has {key.shape[axis]} tokens, value {value.shape[axis]}")
    n = key.shape[axis]
    per_token = (key.nbytes + value.nbytes) // max(n, 1)
    step = max(1, target_bytes // max(per_token, 1))
    for start in range(0, max(n, 1), step):
        sl = [slice(None)] * key.ndim
        sl[axis] = slice(start, min(n, start + step))
        yield start, key[tuple(sl)], value[tuple(sl)]


def kv_chunks(
    who: AttemptKey,
    layer: int,
    key: np.ndarray,
    value: np.ndarray,
    *,
    token_start: int = 0,
    plan_version: int = 0,
    context: RequestContext | None = None,
    sent_at: float = 0.0,
    target_bytes: int = KV_CHUNK_BYTES,
) -> list[KVChunk]:
    """One layer's KV cache (B, H, T, D) as KVChunk messages of about ``target_bytes``;
    the first carries the request's context."""
    n_total = key.shape[KV_TOKEN_AXIS]
    parts = list(chunk_array_pairs(key, value, target_bytes=target_bytes))
    return [
        KVChunk(
            request_id=RequestId(who.request_id),
            attempt=who.attempt,
            layer=layer,
            token_start=token_start + start,
            n_tokens_total=n_total,
            key=k,
            value=v,
            chunk=i,
            n_chunks=len(parts),
            context=context if i == 0 else None,
            sent_at=sent_at,
            plan_version=plan_version,
            seq=i,
        )
        for i, (start, k, v) in enumerate(parts)
    ]


@dataclass
class _LayerParts:
    n_chunks: int
    n_tokens_total: int
    parts: dict[int, KVChunk]


class KVAssembler:
    """Collects KVChunk messages per (attempt, layer) and says when a layer is complete.

    Duplicates (QoS 1 redelivery) are ignored; inconsistent chunks raise CodecError so the
    caller can fail the request.
    """

    def __init__(self) -> None:
        self._layers: dict[tuple[AttemptKey, int], _LayerParts] = {}

    def add(self, chunk: KVChunk) -> bool:
        """Store one chunk; True when its layer is now complete."""
        who = AttemptKey(chunk.request_id, chunk.attempt)
        where = f"kv_chunk[{who} layer {chunk.layer}]"
        if not 0 <= chunk.chunk < chunk.n_chunks:
            raise CodecError(f"{where}.chunk", f"{chunk.chunk} not in [0, {chunk.n_chunks})")
        entry = self._layers.get((who, chunk.layer))
        if entry is None:
            entry = _LayerParts(chunk.n_chunks, chunk.n_tokens_total, {})
            self._layers[(who, chunk.layer)] = entry
        if (entry.n_chunks, entry.n_tokens_total) != (chunk.n_chunks, chunk.n_tokens_total):
            raise CodecError(
                where,
                f"chunk {chunk.chunk} says {chunk.n_chunks} chunks / "
                f"{chunk.n_tokens_total} tokens, earlier ones "
                f"{entry.n_chunks} / {entry.n_tokens_total}",
            )
        if chunk.key.shape != chunk.value.shape:
            raise CodecError(
                f"{where}.value",
                f"shape {list(chunk.value.shape)} differs from key {list(chunk.key.shape)}",
            )
        entry.parts.setdefault(chunk.chunk, chunk)
        return self.layer_complete(who, chunk.layer)

    def layer_complete(self, who: AttemptKey, layer: int) -> bool:
        entry = self._layers.get((who, layer))
        return entry is not None and len(entry.parts) == entry.n_chunks

    def take(self, who: AttemptKey, layer: int) -> tuple[int, np.ndarray, np.ndarray]:
        """Remove a complete layer and return ``(token_start, key, value)`` concatenated."""
        entry = self._layers.get((who, layer))
        if entry is None or len(entry.parts) != entry.n_chunks:
            raise KeyError(f"layer {layer} of {who} is not complete")
        del self._layers[(who, layer)]
        parts = [entry.parts[i] for i in range(entry.n_chunks)]
        where = f"kv_chunk[{who} layer {layer}]"
        expect = parts[0].token_start
        for p in parts:
            if p.token_start != expect:
                raise CodecError(
                    f"{where}.token_start",
                    f"chunk {p.chunk} starts at {p.token_start}, expected {expect}",
                )
            expect += p.key.shape[KV_TOKEN_AXIS]
        got = expect - parts[0].token_start
        if got != entry.n_tokens_total:
            raise CodecError(
                where, f"chunks hold {got} tokens, n_tokens_total says {entry.n_tokens_total}"
            )
        key = np.concatenate([p.key for p in parts], axis=KV_TOKEN_AXIS)
        value = np.concatenate([p.value for p in parts], axis=KV_TOKEN_AXIS)
        return parts[0].token_start, key, value

    def discard(self, who: AttemptKey) -> int:
        """Drop every partial layer of an attempt (released or timed out); returns count."""
        doomed = [k for k in self._layers if k[0] == who]
        for k in doomed:
            del self._layers[k]
        return len(doomed)

    def pending_bytes(self) -> int:
        return sum(
            p.key.nbytes + p.value.nbytes for e in self._layers.values() for p in e.parts.values()
        )
