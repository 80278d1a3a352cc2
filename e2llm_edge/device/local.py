"""The local path: every segment in one process. The reference the cluster must match.

Prefill runs the whole prompt in one pass (batch 1, empty past); decode feeds one token at
a time with the grown KV cache. Only the last position goes through the head.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from e2llm_edge.device.fast_runner import (
    VariantEmbedder,
    VariantHead,
    check_variant,
    choose_variant,
    load_stage,
)
from e2llm_edge.device.runner import Stage, StageCache
from e2llm_edge.device.sampling import Sampling, sample
from e2llm_edge.params import GenerationParams, ModelLimits, validate
from onnx_export.manifest import Manifest


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    step_s: list[float] = field(default_factory=list)

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1  # the first token comes out of prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0


class LocalModel:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        prefer_ranges: bool = True,
        verify: bool = True,
        threads: int | None = None,
        variant: tuple[str, str] | None = None,
    ) -> None:
        """`variant` (graph, precision) defaults to the best one the manifest holds and this
        onnxruntime runs: contrib/exact, else standard/fp32 (see `choose_variant`)."""
        self.manifest = Manifest.load(model_dir)
        cfg = self.manifest.config
        self.n_layers = int(cfg["n_layers"])
        self.limits = ModelLimits.from_config(cfg)
        self.context_length = self.limits.context_length
        self.eos_token_id: int | None = cfg.get("eos_token_id")
        self.variant = variant or choose_variant(self.manifest)
        check_variant(self.manifest, *self.variant)
        self.embed = VariantEmbedder(self.manifest, self.variant, verify=verify, threads=threads)
        # One request at a time here: each generate gets its own KV buffer, no pool.
        self.layers: Stage = load_stage(
            self.manifest,
            0,
            self.n_layers,
            self.variant,
            verify=verify,
            threads=threads,
            prefer_ranges=prefer_ranges,
        )
        self.head = VariantHead(self.manifest, self.variant, verify=verify, threads=threads)

    def forward(self, ids: list[int], start: int, cache: StageCache) -> np.ndarray:
        """Logits (V,) of the last of `ids`, placed at positions start..; grows `cache`."""
        return self._forward(ids, start, cache)[0]

    def _forward(self, ids: list[int], start: int, cache: StageCache) -> tuple[np.ndarray, float]:
        x = self.embed.run(np.asarray([ids], np.int64))
        h = self.layers.run(x, start, cache)
        logits, bound = self.head.run_with_bound(h[:, -1:, :])
        return logits[0, -1], float(bound[0, -1])

    def generate(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        sampling: Sampling | None = None,
        stats: GenerationStats | None = None,
        stop_at_eos: bool = True,
        logits_out: list[tuple[np.ndarray, float]] | None = None,
    ) -> Iterator[int]:
        """Yield new token ids one by one (streaming). `logits_out` collects each step's
        logits and bound (`Head.run_with_bound`)."""
        sampling = sampling or Sampling()
        params = GenerationParams(
            max_new_tokens=max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        validate(params, prompt_ids, self.limits)
        stats = stats if stats is not None else GenerationStats()
        stats.prompt_tokens = len(prompt_ids)
        cache = self.layers.new_cache(len(prompt_ids) + max_new_tokens)
        t0 = time.perf_counter()
        logits, bound = self._forward(prompt_ids, 0, cache)
        stats.prefill_s = time.perf_counter() - t0
        pos = len(prompt_ids)
        for step in range(max_new_tokens):
            if logits_out is not None:
                logits_out.append((logits, bound))
            tok = sample(logits, sampling, step)
            stats.new_tokens += 1
            yield tok
            if (stop_at_eos and tok == self.eos_token_id) or step == max_new_tokens - 1:
                return
            t = time.perf_counter()
            logits, bound = self._forward([tok], pos, cache)
            dt = time.perf_counter() - t
            stats.step_s.append(dt)
            stats.decode_s += dt
            pos += 1
