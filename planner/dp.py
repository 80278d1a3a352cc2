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

import numpy as np

from planner.costs import CostModel, Layout, micro_batch

INF = float("inf")
CONCURRENCY_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
"""Decoder concurrencies the DP considers (up to the cost model's max_concurrency): a
geometric ladder, so a larger cap costs few more solves."""
_CACHE_ENTRIES = 1500


class Split:
    """The DP's answer for one device list, role and concurrency.

    The bottleneck and the sum of stage times come straight from the DP tables; the
    layer boundaries are backtracked only when asked for (most candidates the search
    scores are never built into a plan).
    """

    __slots__ = ("_build", "_layout", "_stage_s", "bottleneck_s", "n_stages", "total_s")

    def __init__(
        self,
        layout: Layout | None = None,
        stage_s: tuple[float, ...] | None = None,
        *,
        bottleneck_s: float | None = None,
        total_s: float | None = None,
        n_stages: int = 0,
        build: Callable[[], tuple[Layout, tuple[float, ...]]] | None = None,
    ) -> None:
        self._layout, self._stage_s, self._build = layout, stage_s, build
        if stage_s is not None and layout is not None:
            bottleneck_s, total_s, n_stages = max(stage_s), sum(stage_s), len(layout.devices)
        assert bottleneck_s is not None and total_s is not None
        self.n_stages: int = n_stages
        """Pipeline stages."""
        self.bottleneck_s: float = bottleneck_s
        """Slowest stage."""
        self.total_s: float = total_s
        """Sum of stage times (pipeline latency)."""

    def _materialise(self) -> None:
        if self._layout is None or self._stage_s is None:
            assert self._build is not None
            self._layout, self._stage_s = self._build()
            self._build = None

    @property
    def layout(self) -> Layout:
        """Devices, boundaries, embedding placement."""
        self._materialise()
        assert self._layout is not None
        return self._layout

    @property
    def stage_s(self) -> tuple[float, ...]:
        """Time of each stage (compute + transfer in)."""
        self._materialise()
        assert self._stage_s is not None
        return self._stage_s

    def cycle_s(self, concurrency: int) -> float:
        """Seconds per token per request when decoding `concurrency` requests."""
        m = min(self.n_stages, concurrency)
        return max(self.total_s, m * self.bottleneck_s)

    def __repr__(self) -> str:
        return f"Split(bottleneck_s={self.bottleneck_s:.4g}, total_s={self.total_s:.4g})"


def _by_cycle(concurrency: int) -> Callable[[Split], tuple[float, float]]:
    """Sort key of decoder splits: cycle at this concurrency, then bottleneck."""
    return lambda s: (s.cycle_s(concurrency), s.bottleneck_s)


class SplitSolver:
    """Solves layer splits on one cost model, caching per-device prefix sums."""

    def __init__(self, cm: CostModel) -> None:
        self.cm = cm
        L = cm.n_layers
        count = np.arange(L + 1)[None, :] - np.arange(L + 1)[:, None]  # (L+1, L+1)
        self._valid = count > 0
        wp = cm.weight_prefix
        self._wdiff = wp[None, :] - wp[:, None]  # (L+1, L+1) weight bytes of [a, b)
        kp = cm.kv_prefix
        self._kvdiff = kp[None, :] - kp[:, None]  # (L+1, L+1) KV bytes per token of [a, b)
        self._prefill_pre: dict[tuple[int, bool], np.ndarray] = {}
        self._decode_pre: dict[int, np.ndarray] = {}
        self.concurrencies = np.array(
            [c for c in CONCURRENCY_STEPS if c <= cm.max_concurrency]
            + ([cm.max_concurrency] if cm.max_concurrency not in CONCURRENCY_STEPS else [])
        )
        self._base: dict[tuple[int, bool, bool, bool, int, bool, bool], np.ndarray] = {}
        self._prefill_total: dict[tuple[tuple[int, ...], tuple[int, ...], bool], float] = {}
        m = cm.model
        self._weights = m.total_param_bytes
        self._kv_all_layers = cm.kv_bytes(0, m.n_layers)

    def prefill_s(self, layout: Layout) -> float:
        """Whole-pipeline time of one mean prompt on this layout (cached per layout)."""
        key = (layout.devices, layout.bounds, layout.embed_last)
        if key not in self._prefill_total:
            times = self.cm.stage_times(layout, decode=False, tokens=self.cm.prompt_tokens)
            self._prefill_total[key] = float(sum(times))
        return self._prefill_total[key]

    def fastest_token_s(self, devices: tuple[int, ...]) -> float:
        """A lower bound on the group's per-token time for one request: every layer, the
        head and the embedding on whichever of its devices is fastest at it, no hops."""
        cm = self.cm
        per_layer = np.min(np.stack([cm.decode_layers(d, 1) for d in devices]), axis=0)
        edges = min(cm.head_s(d, True, 1) for d in devices) + min(cm.embed_s(d, 1) for d in devices)
        return float(per_layer.sum()) + edges

    def _memory_short(self, devices: tuple[int, ...], kv_tokens: float, work: float) -> bool:
        """The group cannot hold the model and this KV even pooled (no split can)."""
        have = float(sum(self.cm.capacity[d] for d in devices))
        need = self._weights + kv_tokens * self._kv_all_layers + self.cm.workspace_bytes(work)
        return have < need

    def _prefill_prefix(self, d: int, kv_out: bool) -> np.ndarray:
        key = (d, kv_out)
        if key not in self._prefill_pre:
            cm = self.cm
            per_layer = cm.prefill_layers(d, cm.prompt_tokens)
            if kv_out:  # each layer's KV is sent on: the agent's work grows with the layers
                kv = cm.model.request_kv_bytes
                per_layer = per_layer + np.array(
                    [cm.agent_io_s(d, kv(cm.prompt_tokens, i, i + 1)) for i in range(cm.n_layers)]
                )
            self._prefill_pre[key] = np.concatenate([[0.0], np.cumsum(per_layer)])[None, :]
        return self._prefill_pre[key]  # (1, L+1)

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
        kv = cm.prefill_kv_tokens(len(devices))
        if self._memory_short(devices, kv, cm.peak_prompt_tokens):
            return None
        tokens = np.array([cm.prompt_tokens])
        results = [
            self._solve(
                devices,
                embed_last,
                decode=False,
                tokens=tokens,
                kv_tokens=np.array([kv]),
                workspace_tokens=np.array([cm.peak_prompt_tokens]),
                rows=None,
                kv_out=True,
            )[0]
            for embed_last in self._variants(devices)
        ]
        found = [r for r in results if r is not None]
        return min(found, key=lambda s: (s.bottleneck_s, s.total_s)) if found else None

    def decode(self, devices: tuple[int, ...], *, mixed: bool = False) -> list[Split | None]:
        """Best split for a DECODER (or mixed) replica at each concurrency 1..C (None at
        concurrencies off `CONCURRENCY_STEPS` and where nothing fits)."""
        cm = self.cm
        k = len(devices)
        out: list[Split | None] = [None] * cm.max_concurrency
        work1 = cm.peak_prompt_tokens if mixed else 1.0
        if self._memory_short(devices, cm.decode_kv_tokens(1), work1):
            return out
        conc = self.concurrencies
        batch = np.array([micro_batch(int(c), k) for c in conc])
        kv_tokens = np.array([cm.decode_kv_tokens(int(c)) for c in conc])
        work = np.maximum(batch, cm.peak_prompt_tokens) if mixed else batch
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
        for ci, c in enumerate(conc):
            found = [s for v in per_variant if (s := v[ci]) is not None]
            out[int(c) - 1] = min(found, key=_by_cycle(int(c))) if found else None
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
        kv_out: bool = False,
    ) -> np.ndarray:
        """Time of stage i holding layers [a, b) (inf if invalid): C[n, a, b] for a middle
        stage, C[n, b] (a = 0) for the first, C[n, a] (b = L) for the last; the same sums
        as `CostModel.stage_times` (`kv_out`: a PREFILL replica's)."""
        cm = self.cm
        d = devices[i]
        k = len(devices)
        layout = Layout(devices, (0,) * (k + 1), embed_last)
        embed, head = layout.embed_on(i), layout.head_on(i)
        mixed = bool(decode and workspace_tokens.max() > tokens.max())
        key = (d, decode, embed, head, k, mixed, kv_out)
        base = self._base.get(key)
        if base is None:
            pre = self._decode_prefix(d)[rows] if decode else self._prefill_prefix(d, kv_out)
            cost = pre[:, None, :] - pre[:, :, None]
            edge = cm.model.edge_bytes(embed=embed, head=head)
            fixed = edge + np.array([cm.workspace_bytes(w) for w in workspace_tokens])
            mem = (
                self._wdiff[None]
                + kv_tokens[:, None, None] * self._kvdiff[None]
                + fixed[:, None, None]
            )
            ok = self._valid[None] & (mem <= cm.capacity[d])
            base = np.where(ok, cost, INF)
            if len(self._base) >= _CACHE_ENTRIES:
                self._base.pop(next(iter(self._base)))
            self._base[key] = base
        const = cm.in_hop_vec(devices, i, embed_last, decode, tokens)
        io_per_token = cm.io_bytes_per_token(devices, i, embed_last, decode)
        const = const + cm.agent_pass_s(d) + cm.agent_io_s(d, 1.0) * io_per_token * tokens
        if embed:
            const = const + np.array([cm.embed_s(d, t) for t in tokens])
        if head:
            const = const + np.array([cm.head_s(d, decode, int(t)) for t in tokens])
        L = cm.n_layers
        if i == 0:
            sliced: np.ndarray = base[:, 0, :] + const[:, None]
        elif i == k - 1:
            sliced = base[:, :, L] + const[:, None]
        else:
            sliced = base + const[:, None, None]
        return sliced

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
        kv_out: bool = False,
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
                kv_out=kv_out,
            )
            for i in range(k)
        ]
        if k == 1:
            best = costs[0][:, L]
            g = costs[0]
            last_a = np.zeros(n, dtype=int)
            back: list[np.ndarray] = []
        else:
            # Pass 1: F[n, b] = least bottleneck of stages 0..i covering layers [0, b).
            f = costs[0]
            for i in range(1, k - 1):
                f = np.maximum(f[:, :, None], costs[i]).min(axis=1)
            best = np.maximum(f, costs[-1]).min(axis=1)  # (n,)
            # Pass 2: least sum with every stage <= best; keep argmins to backtrack.
            # within rounding of the least bottleneck: equal stages summed in another
            # order differ in the last bit, and must not lose the least sum
            cap = best[:, None] * (1 + 1e-12)
            g = np.where(costs[0] <= cap, costs[0], INF)
            back = []
            for i in range(1, k - 1):
                tot = g[:, :, None] + np.where(costs[i] <= cap[:, :, None], costs[i], INF)
                back.append(tot.argmin(axis=1))  # (n, L+1)
                g = tot.min(axis=1)
            tot_last = g + np.where(costs[-1] <= cap, costs[-1], INF)
            last_a = tot_last.argmin(axis=1)
            g = np.broadcast_to(tot_last.min(axis=1)[:, None], (n, L + 1))
        out: list[Split | None] = []
        for j in range(n):
            if not np.isfinite(best[j]) or not np.isfinite(g[j, L]):
                out.append(None)
                continue

            def build(j: int = j) -> tuple[Layout, tuple[float, ...]]:
                if k == 1:
                    return Layout(devices, (0, L), embed_last), (float(costs[0][j, L]),)
                bounds = [L, int(last_a[j])]
                for i in range(k - 2, 0, -1):
                    bounds.append(int(back[i - 1][j, bounds[-1]]))
                bounds.append(0)
                bounds.reverse()
                stage_s = [float(costs[0][j, bounds[1]])]
                stage_s += [float(costs[i][j, bounds[i], bounds[i + 1]]) for i in range(1, k - 1)]
                stage_s.append(float(costs[-1][j, bounds[-2]]))
                return Layout(devices, tuple(bounds), embed_last), tuple(stage_s)

            out.append(
                Split(bottleneck_s=float(best[j]), total_s=float(g[j, L]), n_stages=k, build=build)
            )
        return out
