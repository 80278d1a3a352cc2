"""Exact layer split of one replica: the DP that minimises the slowest pipeline stage.

For an ordered device list, choose boundaries 0 = b0 < ... < bk = L (every device gets at
least one layer) and where the embedding sits (first stage, or last stage next to the
head), subject to each device's memory. Pass 1 finds the least possible bottleneck V*;
pass 2 minimises the sum of stage times among splits whose every stage is <= V* (the
latency, and for decoders the other half of the cycle). Both passes are vectorised over
the decoder concurrencies 1..C, which only change micro-batch size and KV memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from planner.costs import CostModel, Layout, micro_batch

INF = float("inf")


@dataclass(frozen=True)
class Split:
    """The DP's answer for one device list, role and concurrency."""

    layout: Layout
    """Devices, boundaries, embedding placement."""
    stage_s: tuple[float, ...]
    """Time of each stage (compute + transfer in)."""

    @property
    def bottleneck_s(self) -> float:
        """Slowest stage."""
        return max(self.stage_s)

    @property
    def total_s(self) -> float:
        """Sum of stage times (pipeline latency)."""
        return sum(self.stage_s)

    def cycle_s(self, concurrency: int) -> float:
        """Seconds per token per request when decoding `concurrency` requests."""
        m = min(len(self.stage_s), concurrency)
        return max(self.total_s, m * self.bottleneck_s)


def _by_cycle(concurrency: int) -> Callable[[Split], tuple[float, float]]:
    """Sort key of decoder splits: cycle at this concurrency, then bottleneck."""
    return lambda s: (s.cycle_s(concurrency), s.bottleneck_s)


class SplitSolver:
    """Solves layer splits on one cost model, caching per-device prefix sums."""

    def __init__(self, cm: CostModel) -> None:
        self.cm = cm
        L = cm.n_layers
        self._count = np.arange(L + 1)[None, :] - np.arange(L + 1)[:, None]  # (L+1, L+1)
        self._valid = self._count > 0
        wp = cm.weight_prefix
        self._wdiff = wp[None, :] - wp[:, None]  # (L+1, L+1) weight bytes of [a, b)
        self._prefill_pre: dict[int, np.ndarray] = {}
        self._decode_pre: dict[int, np.ndarray] = {}

    def _prefill_prefix(self, d: int) -> np.ndarray:
        if d not in self._prefill_pre:
            per_layer = self.cm.prefill_layers(d, self.cm.prompt_tokens)
            self._prefill_pre[d] = np.concatenate([[0.0], np.cumsum(per_layer)])[None, :]
        return self._prefill_pre[d]  # (1, L+1)

    def _decode_prefix(self, d: int) -> np.ndarray:
        if d not in self._decode_pre:
            rows = [
                np.concatenate([[0.0], np.cumsum(self.cm.decode_layers(d, b))])
                for b in range(1, self.cm.max_concurrency + 1)
            ]
            self._decode_pre[d] = np.stack(rows)
        return self._decode_pre[d]  # (C, L+1), row b-1

    def prefill(self, devices: tuple[int, ...]) -> Split | None:
        """Best split for a PREFILL replica on these devices (None if it cannot hold)."""
        cm = self.cm
        p = cm.prompt_tokens
        tokens = np.array([p])
        results = [
            self._solve(
                devices,
                embed_last,
                decode=False,
                tokens=tokens,
                kv_tokens=np.array([p]),
                workspace_tokens=tokens,
                rows=None,
            )[0]
            for embed_last in self._variants(devices)
        ]
        found = [r for r in results if r is not None]
        return min(found, key=lambda s: (s.bottleneck_s, s.total_s)) if found else None

    def decode(self, devices: tuple[int, ...], *, mixed: bool = False) -> list[Split | None]:
        """Best split for a DECODER (or mixed) replica at each concurrency 1..C."""
        cm = self.cm
        k = len(devices)
        conc = np.arange(1, cm.max_concurrency + 1)
        batch = np.array([micro_batch(int(c), k) for c in conc])
        kv_tokens = conc * cm.workload.mean_context_tokens
        work = np.maximum(batch, cm.prompt_tokens) if mixed else batch
        per_variant = [
            self._solve(
                devices,
                embed_last,
                decode=True,
                tokens=batch.astype(float),
                kv_tokens=kv_tokens,
                workspace_tokens=work.astype(float),
                rows=batch - 1,
            )
            for embed_last in self._variants(devices)
        ]
        out: list[Split | None] = []
        for ci, c in enumerate(conc):
            found = [s for v in per_variant if (s := v[ci]) is not None]
            out.append(min(found, key=_by_cycle(int(c))) if found else None)
        return out

    @staticmethod
    def _variants(devices: tuple[int, ...]) -> tuple[bool, ...]:
        return (False,) if len(devices) == 1 else (False, True)

    def _stage_costs(
        self,
        devices: tuple[int, ...],
        i: int,
        embed_last: bool,
        *,
        decode: bool,
        tokens: np.ndarray,
        kv_tokens: np.ndarray,
        workspace_tokens: np.ndarray,
        rows: np.ndarray | None,
    ) -> np.ndarray:
        """C[n, a, b]: time of stage i holding layers [a, b) (inf if invalid).  # (n, L+1, L+1)"""
        cm = self.cm
        d = devices[i]
        k = len(devices)
        pre = self._decode_prefix(d)[rows] if decode else self._prefill_prefix(d)
        layout = Layout(devices, (0,) * (k + 1), embed_last)
        embed, head = layout.embed_on(i), layout.head_on(i)
        const = np.array(
            [
                (cm.embed_s(d, t) if embed else 0.0)
                + (cm.head_s(d, decode, int(t)) if head else 0.0)
                + cm.in_hop_s(devices, i, embed_last, decode, t)
                for t in tokens
            ]
        )
        cost = pre[:, None, :] - pre[:, :, None] + const[:, None, None]
        kv = cm.model.kv_bytes_per_token_per_layer
        edge = cm.model.edge_bytes(embed=embed, head=head)
        fixed = edge + np.array([cm.workspace_bytes(w) for w in workspace_tokens])
        mem = (
            self._wdiff[None]
            + (kv_tokens * kv)[:, None, None] * self._count[None]
            + fixed[:, None, None]
        )
        ok = self._valid[None] & (mem <= cm.capacity[d])
        result: np.ndarray = np.where(ok, cost, INF)
        return result

    def _solve(
        self,
        devices: tuple[int, ...],
        embed_last: bool,
        *,
        decode: bool,
        tokens: np.ndarray,
        kv_tokens: np.ndarray,
        workspace_tokens: np.ndarray,
        rows: np.ndarray | None,
    ) -> list[Split | None]:
        L = self.cm.n_layers
        k = len(devices)
        n = len(tokens)
        if k > L:
            return [None] * n
        costs = [
            self._stage_costs(
                devices,
                i,
                embed_last,
                decode=decode,
                tokens=tokens,
                kv_tokens=kv_tokens,
                workspace_tokens=workspace_tokens,
                rows=rows,
            )
            for i in range(k)
        ]
        # Pass 1: F[n, b] = least bottleneck of stages 0..i covering layers [0, b).
        f = costs[0][:, 0, :]
        for i in range(1, k):
            f = np.maximum(f[:, :, None], costs[i]).min(axis=1)
        best = f[:, L]  # (n,)
        # Pass 2: least sum with every stage <= best; keep argmins to backtrack.
        masked = [np.where(c <= best[:, None, None], c, INF) for c in costs]
        g = masked[0][:, 0, :]
        back = []
        for i in range(1, k):
            tot = g[:, :, None] + masked[i]
            back.append(tot.argmin(axis=1))  # (n, L+1)
            g = tot.min(axis=1)
        out: list[Split | None] = []
        for j in range(n):
            if not np.isfinite(best[j]) or not np.isfinite(g[j, L]):
                out.append(None)
                continue
            bounds = [L]
            for i in range(k - 1, 0, -1):
                bounds.append(int(back[i - 1][j, bounds[-1]]))
            bounds.append(0)
            bounds.reverse()
            stage_s = tuple(float(costs[i][j, bounds[i], bounds[i + 1]]) for i in range(k))
            out.append(Split(Layout(devices, tuple(bounds), embed_last), stage_s))
        return out
