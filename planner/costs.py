"""The one cost model shared by the planner (DP, GA, role search) and the simulator.

Per device and layer: prefill seconds for a prompt of P tokens and decode seconds for one
step of a batch, from the measured profile or else a roofline estimate
(max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth)). A stage's time is its
compute, the hop that brings its input (device -> broker -> device) and the agent's own
work per pass (`DeviceProfile.pass_s`, `io_s_per_mb`: messages in and out, and the KV a
PREFILL stage hands on). Decoders run
their batch as up to k micro-batches through a k-stage pipeline, so one token of every
request takes a *cycle* = max(sum of stage times, k x slowest stage).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from planner.inventory import Device, Hardware, Inventory, Link, hop_s, relay
from planner.model import ModelSpec
from planner.plan import micro_batch
from planner.workload import Workload

TOKEN_ID_BYTES = 4
"""What crosses the loop-back hop per token when the embedding is on stage 0."""
WORKSPACE_BUFFERS = 2
"""Activation buffers of the largest pass a device keeps (input and output)."""


@dataclass(frozen=True)
class Layout:
    """Where the layers of one replica live: ordered devices and layer boundaries."""

    devices: tuple[int, ...]
    """Inventory indices in pipeline order."""
    bounds: tuple[int, ...]
    """len(devices)+1 boundaries 0 = b0 < b1 < ... < bk = L; stage i holds [b_i, b_i+1)."""
    embed_last: bool
    """The embedding sits on the last stage (with the head) instead of the first."""

    def embed_on(self, i: int) -> bool:
        """Stage i runs the embedding."""
        k = len(self.devices)
        return i == (k - 1 if self.embed_last else 0)

    def head_on(self, i: int) -> bool:
        """Stage i runs the head."""
        return i == len(self.devices) - 1


KV_MESSAGE_BYTES = 1024 * 1024
"""Most KV bytes the agents put in one message (`e2llm_edge.device.kv_transfer.
KV_CHUNK_BYTES`; a layer's KV is cut into messages of at most this)."""


class CostModel:
    """Seconds and bytes for a model on an inventory under a workload's mean lengths."""

    def __init__(
        self, inventory: Inventory, model: ModelSpec, workload: Workload, max_concurrency: int = 16
    ) -> None:
        self.inventory = inventory
        self.model = model
        self.workload = workload
        self.max_concurrency = max_concurrency
        self.n_layers = model.n_layers
        self.links: list[Link] = [d.link for d in inventory.devices]
        self.capacity = np.array([d.memory_bytes for d in inventory.devices])
        self._flops = np.asarray(model.layer_flops_per_token, dtype=float)
        self._flop_scale = (
            self._flops / self._flops.mean() if self._flops.mean() > 0 else np.ones(self.n_layers)
        )
        self.weight_prefix = np.concatenate([[0.0], np.cumsum(model.layer_param_bytes)])
        # Context a decode step attends over, on average across a request's life.
        self.decode_context = workload.mean_prompt_tokens + workload.mean_output_tokens / 2
        self.prompt_tokens = workload.mean_prompt_tokens
        self.peak_prompt_tokens = workload.peak_prompt_tokens
        self.peak_context_tokens = workload.peak_context_tokens
        self._prefill_cache = lru_cache(maxsize=4096)(self._prefill_layers)
        # KV bytes per KV token of each layer: sliding-window layers hold min(context,
        # window) of a request's context, counted at the workload's mean context (for a
        # mix of lengths that over-counts: the mean of min(c, w) is at most min(mean, w))
        self.kv_layer = np.asarray(model.layer_kv_bytes_per_token(workload.mean_context_tokens))
        self.kv_prefix = np.concatenate([[0.0], np.cumsum(self.kv_layer)])
        self._decode_held = self._held(self.decode_context)

    def _held(self, context: float) -> np.ndarray:
        """Positions each layer holds and attends over for a request of `context`.  # (L,)"""
        return np.array([self.model.kv_positions(i, context) for i in range(self.n_layers)])

    def least_layer_kv_bytes(self, context: float) -> float:
        """KV bytes of one request of `context` tokens in the layer that holds the least."""
        return min(self.model.request_kv_bytes(context, i, i + 1) for i in range(self.n_layers))

    def kv_bytes(self, start: int, end: int) -> float:
        """KV bytes one KV token (of the workload's requests) takes in layers [start, end)."""
        return float(self.kv_prefix[end] - self.kv_prefix[start])

    # ---- per device, per layer -------------------------------------------------------

    def prefill_layers(self, d: int, tokens: float) -> np.ndarray:
        """Seconds for each layer to prefill `tokens` tokens on device d.  # (L,)"""
        return self._prefill_cache(d, float(tokens))

    def _prefill_layers(self, d: int, tokens: float) -> np.ndarray:
        dev = self.inventory.devices[d]
        if dev.profile is not None:
            return dev.profile.layer_prefill(tokens) * self._flop_scale
        hw = _hardware(dev)
        m = self.model
        flops = tokens * (self._flops + m.attention_flops_per_token(1.0) * self._held(tokens / 2))
        nbytes = np.array([m.decode_weight_bytes(layer, tokens) for layer in range(m.n_layers)])
        nbytes = nbytes + tokens * (
            m.kv_bytes_per_token_per_layer + WORKSPACE_BUFFERS * m.activation_bytes_per_token
        )
        result: np.ndarray = np.maximum(flops / hw.flops_per_s, nbytes / hw.bytes_per_s)
        return result

    def decode_layers(self, d: int, batch: int) -> np.ndarray:
        """Seconds for each layer, one decode step of `batch` requests on device d.  # (L,)"""
        dev = self.inventory.devices[d]
        if dev.profile is not None:
            return dev.profile.layer_decode(batch) * self._flop_scale
        hw = _hardware(dev)
        m = self.model
        held = self._decode_held  # the context each layer attends over
        flops = batch * (self._flops + m.attention_flops_per_token(1.0) * held)
        nbytes = np.array([m.decode_weight_bytes(layer, batch) for layer in range(m.n_layers)])
        nbytes = nbytes + batch * held * m.kv_bytes_per_token_per_layer
        result: np.ndarray = np.maximum(flops / hw.flops_per_s, nbytes / hw.bytes_per_s)
        return result

    def embed_s(self, d: int, tokens: float) -> float:
        """Seconds to embed `tokens` tokens on device d."""
        dev = self.inventory.devices[d]
        if dev.profile is not None:
            return dev.profile.embed_s * tokens
        return (
            tokens
            * WORKSPACE_BUFFERS
            * self.model.activation_bytes_per_token
            / _hardware(dev).bytes_per_s
        )

    def head_s(self, d: int, decode: bool, batch: int) -> float:
        """Seconds for the head: one position (prefill) or one step of `batch` (decode)."""
        dev = self.inventory.devices[d]
        if dev.profile is not None:
            return dev.profile.head_decode(batch) if decode else dev.profile.head_prefill_s
        hw = _hardware(dev)
        m = self.model
        positions = batch if decode else 1
        return max(
            positions * m.head_flops_per_token / hw.flops_per_s, m.head_param_bytes / hw.bytes_per_s
        )

    def agent_pass_s(self, d: int) -> float:
        """The agent's own seconds per pass on device d beyond its layers (0: unmeasured)."""
        prof = self.inventory.devices[d].profile
        return prof.pass_s if prof is not None else 0.0

    def agent_io_s(self, d: int, nbytes: float) -> float:
        """The agent's own seconds on device d to send or receive `nbytes` (0: unmeasured)."""
        prof = self.inventory.devices[d].profile
        return prof.io_s_per_mb * nbytes * 1e-6 if prof is not None else 0.0

    # ---- stages -----------------------------------------------------------------------

    def in_bytes_per_token(
        self, devices: Sequence[int], i: int, embed_last: bool, decode: bool
    ) -> float:
        """Bytes per token of the message that feeds stage i (0 for a lone stage, and for
        stage 0 of a prefill: the prompt comes from the client). Stage 0 is fed by the
        last stage: hidden states if the embedding is there, else the sampled token ids."""
        if len(devices) == 1:
            return 0.0
        if i > 0 or embed_last:
            return float(self.model.activation_bytes_per_token)
        return float(TOKEN_ID_BYTES) if decode else 0.0

    def io_bytes_per_token(
        self, devices: Sequence[int], i: int, embed_last: bool, decode: bool
    ) -> float:
        """Bytes per token of the messages stage i takes in and sends on."""
        k = len(devices)
        if k == 1:
            return 0.0
        return self.in_bytes_per_token(devices, i, embed_last, decode) + self.in_bytes_per_token(
            devices, (i + 1) % k, embed_last, decode
        )

    def agent_stage_s(
        self, layout: Layout, i: int, *, decode: bool, tokens: float, kv_out: bool = False
    ) -> float:
        """The agent's own seconds for one pass of stage i: a pass's fixed cost, its input
        and output messages, and (a PREFILL replica's stage, `kv_out`) the KV of its
        layers sent on to the decoder."""
        d = layout.devices[i]
        nbytes = self.io_bytes_per_token(layout.devices, i, layout.embed_last, decode) * tokens
        if kv_out and not decode:  # a sliding-window layer sends its window
            nbytes += self.model.request_kv_bytes(tokens, layout.bounds[i], layout.bounds[i + 1])
        return self.agent_pass_s(d) + self.agent_io_s(d, nbytes)

    def in_hop_s(
        self, devices: Sequence[int], i: int, embed_last: bool, decode: bool, tokens: float
    ) -> float:
        """Seconds of the hop feeding stage i with `tokens` tokens' worth of input (the
        stage before it, or the last stage for stage 0)."""
        per_token = self.in_bytes_per_token(devices, i, embed_last, decode)
        if per_token == 0.0:
            return 0.0
        return hop_s(self.links[devices[i - 1]], self.links[devices[i]], tokens * per_token)

    def in_hop_vec(
        self,
        devices: Sequence[int],
        i: int,
        embed_last: bool,
        decode: bool,
        tokens: np.ndarray,
    ) -> np.ndarray:
        """`in_hop_s` for an array of token counts (the hop is affine in the bytes)."""
        per_token = self.in_bytes_per_token(devices, i, embed_last, decode)
        if per_token == 0.0:
            return np.zeros(len(tokens))
        src, dst = self.links[devices[i - 1]], self.links[devices[i]]
        latency = (src.latency_ms + dst.latency_ms) * 1e-3
        per_byte = 8.0 / (src.bandwidth_mbps * 1e6) + 8.0 / (dst.bandwidth_mbps * 1e6)
        result: np.ndarray = latency + tokens * per_token * per_byte
        return result

    def stage_times(
        self, layout: Layout, *, decode: bool, tokens: float, kv_out: bool = False
    ) -> list[float]:
        """Time of each stage for one pass of `tokens` prompt tokens or a decode micro-batch
        (`kv_out`: a PREFILL replica's pass, which also sends its KV on).

        Written plainly (per-layer sums) so tests can check the vectorised DP against it.
        """
        out = []
        batch = int(tokens)
        for i, d in enumerate(layout.devices):
            a, b = layout.bounds[i], layout.bounds[i + 1]
            per_layer = self.decode_layers(d, batch) if decode else self.prefill_layers(d, tokens)
            t = float(sum(per_layer[a:b]))
            if layout.embed_on(i):
                t += self.embed_s(d, tokens)
            if layout.head_on(i):
                t += self.head_s(d, decode, batch)
            t += self.in_hop_s(layout.devices, i, layout.embed_last, decode, tokens)
            t += self.agent_stage_s(layout, i, decode=decode, tokens=tokens, kv_out=kv_out)
            out.append(t)
        return out

    def stage_memory(self, layout: Layout, *, kv_tokens: float, pass_tokens: float) -> list[float]:
        """Bytes each stage needs: weights, KV cache for `kv_tokens`, activation workspace."""
        m = self.model
        out = []
        for i in range(len(layout.devices)):
            a, b = layout.bounds[i], layout.bounds[i + 1]
            out.append(
                float(sum(m.layer_param_bytes[a:b]))
                + m.edge_bytes(embed=layout.embed_on(i), head=layout.head_on(i))
                + kv_tokens * self.kv_bytes(a, b)
                + self.workspace_bytes(pass_tokens)
            )
        return out

    def workspace_bytes(self, pass_tokens: float) -> float:
        """Activation memory for the largest pass a stage runs."""
        return WORKSPACE_BUFFERS * pass_tokens * self.model.activation_bytes_per_token

    def decode_kv_tokens(self, concurrency: int) -> float:
        """KV tokens a decoder of this concurrency must hold: `concurrency` requests of
        the mean context (what the router reserves on average), and at least the longest
        context the workload reaches."""
        return max(concurrency * self.workload.mean_context_tokens, self.peak_context_tokens)

    def prefill_kv_tokens(self, n_stages: int) -> float:
        """KV tokens a prefill replica must hold: a mean prompt per pipeline stage in
        flight, and at least the longest prompt the workload reaches."""
        return max(n_stages * self.prompt_tokens, self.peak_prompt_tokens)

    def pass_tokens(self, role: str, concurrency: int, n_stages: int) -> float:
        """Tokens of the largest pass a replica of this role runs (its workspace)."""
        batch = float(micro_batch(concurrency, n_stages))
        if role == "decoder":
            return batch
        return max(batch, self.peak_prompt_tokens)

    def kv_budget_tokens(self, layout: Layout, pass_tokens: float) -> float:
        """KV tokens the replica can hold at once: the least over its stages of the memory
        left after weights and the workspace of a `pass_tokens` pass, per token of the
        stage's layers (negative: it cannot even hold its weights)."""
        base = self.stage_memory(layout, kv_tokens=0.0, pass_tokens=pass_tokens)
        out = float("inf")
        for i, d in enumerate(layout.devices):
            kv = self.kv_bytes(layout.bounds[i], layout.bounds[i + 1])
            out = min(out, (float(self.capacity[d]) - base[i]) / kv if kv > 0 else out)
        return out

    def kv_pieces(
        self, src: Layout, dst: Layout, prompt_tokens: float
    ) -> list[tuple[int, int, int, float, int]]:
        """The pieces a prompt's KV moves in from a prefill replica to a decoder: (source
        stage, sending device, receiving device, bytes, messages), in source stage order;
        each source stage sends the KV of its layers to the devices holding them in the
        decoder, one message per layer (more if a layer's KV exceeds `KV_MESSAGE_BYTES`)."""
        out = []
        kv = self.model.request_kv_bytes
        for i, s in enumerate(src.devices):
            for j, t in enumerate(dst.devices):
                lo = max(src.bounds[i], dst.bounds[j])
                hi = min(src.bounds[i + 1], dst.bounds[j + 1])
                if hi > lo:
                    messages = sum(
                        max(1, math.ceil(kv(prompt_tokens, k, k + 1) / KV_MESSAGE_BYTES))
                        for k in range(lo, hi)
                    )
                    out.append((i, s, t, kv(prompt_tokens, lo, hi), messages))
        return out

    def kv_flows(
        self, src: Layout, dst: Layout, prompt_tokens: float
    ) -> tuple[dict[int, float], dict[int, float]]:
        """Bytes each device sends and receives to move a prompt's KV between replicas.

        Each source device sends the KV of its layers to the devices holding them in the
        decoder (every byte crosses the broker: source uplink, then destination downlink);
        a sliding-window layer sends the prompt's last window of positions.
        """
        send: dict[int, float] = {}
        recv: dict[int, float] = {}
        for _, s, t, nbytes, _ in self.kv_pieces(src, dst, prompt_tokens):
            send[s] = send.get(s, 0.0) + nbytes
            recv[t] = recv.get(t, 0.0) + nbytes
        return send, recv

    def kv_delivery(
        self,
        src: Layout,
        dst: Layout,
        prompt_tokens: float,
        ready: Sequence[float],
        up_free: np.ndarray,
        down_free: np.ndarray,
    ) -> list[tuple[int, float]]:
        """(receiving device, when its agent has taken the piece in) for each piece of a
        prompt's KV, the pieces of source stage i leaving at `ready[i]`. Pieces queue on
        the links, whose next free times `up_free` and `down_free` (per device) are moved
        on; within a piece the broker relays message by message (`relay`), and the
        receiving agent takes each message in as it arrives."""
        out = []
        for i, s, t, nbytes, messages in self.kv_pieces(src, dst, prompt_tokens):
            r = relay(
                self.links[s],
                self.links[t],
                nbytes,
                messages,
                start=ready[i],
                up_free=float(up_free[s]),
                down_free=float(down_free[t]),
            )
            up_free[s], down_free[t] = r.up_free, r.down_free
            taken = max(
                r.last + self.agent_io_s(t, nbytes / messages),
                r.first + self.agent_io_s(t, nbytes),
            )
            out.append((t, taken))
        return out

    def kv_transfer_s(self, src: Layout, dst: Layout, prompt_tokens: float) -> float:
        """Seconds to move a prompt's KV cache from a prefill replica to a decoder on idle
        links once the prefill is done, until every receiving agent has taken its part in
        (`kv_delivery`; the senders' work is in their prefill pass,
        `stage_times(kv_out=True)`)."""
        n = len(self.inventory)
        k = len(src.devices)
        done = self.kv_delivery(src, dst, prompt_tokens, [0.0] * k, np.zeros(n), np.zeros(n))
        return max(t for _, t in done)

    def kv_link_s(self, layout: Layout, prompt_tokens: float) -> float:
        """Seconds the busiest link of a replica is occupied by one prompt's KV (sent out
        by a prefill replica, or received by a decoder): a bound on requests/s."""
        kv = self.model.request_kv_bytes
        return max(
            self.links[d].one_way_s(kv(prompt_tokens, layout.bounds[i], layout.bounds[i + 1]))
            for i, d in enumerate(layout.devices)
        )


def decode_cycle(stage_s: Sequence[float], concurrency: int) -> float:
    """Seconds per token of every request in a decoder running `concurrency` requests."""
    m = min(len(stage_s), concurrency)
    return max(sum(stage_s), m * max(stage_s))


def _hardware(dev: Device) -> Hardware:
    if dev.hardware is None:
        raise AssertionError(f"device {dev.id!r} has neither profile nor hardware")
    return dev.hardware
