"""Rotary position tables for every RoPE variant the exporter supports, computed as
transformers computes them (fp32 inverse frequencies, angles in fp32), so both graph
families and the reference agree to the last bit where it matters.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from onnx_export.source import ModelConfig


def inv_freq(cfg: ModelConfig, sliding: bool = False) -> np.ndarray:
    """Inverse frequencies `(rot_dim/2,)` f32 of the layers of one kind.

    Sliding-window layers with their own base (Gemma 3) use it unscaled; every other layer
    uses `rope_theta` and `rope_scaling`.
    """
    dim = cfg.rot_dim
    local = sliding and cfg.rope_local_theta is not None
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = (np.float32(1.0) / (np.float32(theta) ** exps)).astype(np.float32)
    s: dict[str, Any] | None = None if local else cfg.rope_scaling
    if s is None:
        return base
    if s["type"] == "linear":
        return (base / np.float32(s["factor"])).astype(np.float32)
    if s["type"] == "factors":
        return (base / np.asarray(s["factors"], np.float32)).astype(np.float32)
    if s["type"] == "llama3":
        return _llama3(base, s)
    if s["type"] == "yarn":
        return _yarn(cfg.rope_theta, dim, s)
    raise ValueError(f"unknown rope scaling {s['type']!r}")


def attention_factor(cfg: ModelConfig, sliding: bool = False) -> float:
    """The factor cos/sin are multiplied by (1 unless the scaling says otherwise)."""
    if sliding and cfg.rope_local_theta is not None:
        return 1.0
    s = cfg.rope_scaling or {}
    return float(s.get("attention_factor", 1.0))


def _llama3(base: np.ndarray, s: dict[str, Any]) -> np.ndarray:
    """transformers' `_compute_llama3_parameters`, step for step in fp32."""
    f32 = np.float32
    factor, lo, hi = f32(s["factor"]), f32(s["low_freq_factor"]), f32(s["high_freq_factor"])
    old = f32(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / lo, old / hi
    wavelen = f32(2 * math.pi) / base
    scaled = np.where(wavelen > low_wavelen, base / factor, base).astype(f32)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (f32(1) - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(f32)


def _yarn(theta: float, dim: int, s: dict[str, Any]) -> np.ndarray:
    """transformers' `_compute_yarn_parameters` (gpt-oss): inverse frequencies blended between
    interpolated and extrapolated by a linear ramp over the dimensions, in fp32 as torch
    computes them (float64 correction range, as Python floats there)."""
    f32 = np.float32
    factor, old = float(s["factor"]), float(s["original_max_position_embeddings"])
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)

    def corr(rot: float) -> float:
        return (dim * math.log(old / (rot * 2 * math.pi))) / (2 * math.log(theta))

    low, high = corr(beta_fast), corr(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=f32) - f32(low)) / f32(high - low), 0, 1).astype(f32)
    pos_freqs = (
        f32(theta) ** (np.arange(0, dim, 2, dtype=np.int64).astype(f32) / f32(dim))
    ).astype(f32)
    extra = (f32(1.0) / pos_freqs).astype(f32)
    inter = (f32(1.0) / (f32(factor) * pos_freqs)).astype(f32)
    keep = (f32(1) - ramp).astype(f32)
    return (inter * (f32(1) - keep) + extra * keep).astype(f32)


def cos_sin(cfg: ModelConfig, sliding: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin `(max_position, rot_dim/2)` f32: fp32 angles as transformers forms them,
    their cosines rounded once from float64."""
    ang = np.arange(cfg.max_position, dtype=np.float32)[:, None] * inv_freq(cfg, sliding)[None, :]
    a = attention_factor(cfg, sliding)
    ang64 = ang.astype(np.float64)
    return (np.cos(ang64) * a).astype(np.float32), (np.sin(ang64) * a).astype(np.float32)


def llama3_divisors(theta: float, dim: int, s: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3's scaling, as llama.cpp's converter stores them in
    `rope_freqs.weight` (float64 arithmetic, as its converter does)."""
    freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    old, lo, hi = s["original_max_position_embeddings"], s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / freqs
    smooth = (old / wavelen - lo) / (hi - lo)
    mid = 1.0 / ((1 - smooth) / s["factor"] + smooth)
    return np.where(wavelen < old / hi, 1.0, np.where(wavelen > old / lo, s["factor"], mid))
