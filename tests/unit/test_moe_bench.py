"""`bench/moe.py`, short, on the tests' tiny gpt-oss shape: the random MXFP4 GGUF it writes
exports and runs, the child process measures, and the figures it reports are sane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from onnx_export.source import load_gguf

BENCH = Path(__file__).resolve().parents[2] / "bench" / "moe.py"

pytestmark = pytest.mark.slow


def test_tiny_shape_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    shape = ["--layers", "2", "--hidden", "64", "--experts", "8", "--used", "2", "--vocab", "300"]
    run = ["--prompt", "8", "--steps", "3", "--workdir", str(tmp_path), "--json", str(out)]
    subprocess.run([sys.executable, str(BENCH), *shape, *run], check=True, capture_output=True)
    r = json.loads(out.read_text())
    assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0
    assert r["gguf_bytes"] == (tmp_path / "model.gguf").stat().st_size
    w = load_gguf(tmp_path / "model.gguf")
    assert (w.config.n_experts, w.config.n_experts_used, w.config.sliding_layers) == (8, 2, [0])
    assert w.raw("model.layers.1.mlp.experts.7.down_proj.weight").qtype == "MXFP4"
