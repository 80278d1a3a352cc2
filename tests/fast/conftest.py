"""Fixtures for the contrib (fast) graph: both precisions exported once per session from the
default GGUF into a temporary directory, plus the transformers reference."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from e2llm_edge.device.fast_runner import (
    FastLayerStack,
    VariantEmbedder,
    VariantHead,
    contrib_supported,
)
from onnx_export.export import export_model
from onnx_export.manifest import Manifest
from onnx_export.source import fetch_default_gguf

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "reference_smollm2.json"


@dataclass
class FastModel:
    """Embed, all layers in one session and head of one contrib precision."""

    manifest: Manifest
    precision: str
    embed: VariantEmbedder
    layers: FastLayerStack
    head: VariantHead

    def logits(self, h: np.ndarray) -> np.ndarray:
        return self.head.run(h)

    def greedy(self, ids: list[int], n: int) -> tuple[list[int], list[tuple[np.ndarray, float]]]:
        """n greedy tokens after `ids` on a fresh cache, with each step's logits and bound
        (logits within one bound of the top are exact, the others within the bound)."""
        cache = self.layers.new_cache(len(ids) + n)
        h = self.layers.run(self.embed.run(np.asarray([ids], np.int64)), 0, cache)
        out, logits = [], []
        for _ in range(n):
            lg, bound = self.head.session.run(None, {"hidden": h[:, -1:]})
            logits.append((lg[0, -1], float(bound[0, -1])))
            out.append(int(lg[0, -1].argmax()))
            h = self.layers.run(
                self.embed.run(np.asarray([[out[-1]]], np.int64)), cache.length, cache
            )
        cache.release()
        return out, logits


@pytest.fixture(scope="session")
def reference() -> dict[str, Any]:
    return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="session")
def fast_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not contrib_supported():
        pytest.skip("this onnxruntime lacks the com.microsoft contrib operators")
    out = tmp_path_factory.mktemp("fast_model")
    gguf = fetch_default_gguf()
    for precision in ("exact", "int8"):
        export_model(
            gguf, out, ranges="0-30", progress=False, graph_name="contrib", precision=precision
        )
    return out


def _load(fast_dir: Path, precision: str) -> FastModel:
    m = Manifest.load(fast_dir)
    v = ("contrib", precision)
    return FastModel(
        m,
        precision,
        VariantEmbedder(m, v, verify=False),
        FastLayerStack(
            m,
            0,
            int(m.config["n_layers"]),
            precision=precision,
            verify=False,
            max_batch=8,
            context=1024,
        ),
        VariantHead(m, v, verify=False),
    )


@pytest.fixture(scope="session")
def exact(fast_dir: Path) -> FastModel:
    return _load(fast_dir, "exact")


@pytest.fixture(scope="session")
def int8(fast_dir: Path) -> FastModel:
    return _load(fast_dir, "int8")
