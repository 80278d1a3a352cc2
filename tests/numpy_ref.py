"""A numpy reference of the Llama math, written independently of the ONNX graph builders."""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """x (B, h, T, d), pos (B, T): rotate-half rotary embedding."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    ang = pos[:, None, :, None] * inv  # (B, 1, T, d/2)
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + np.concatenate([-x2, x1], -1) * sin


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """q (B, nh, T, d), k/v (B, nkv, S, d), mask (B, S) of 0/1; causal over the last T of S."""
    _, nh, t, d = q.shape
    nkv, s = k.shape[1], k.shape[2]
    k = np.repeat(k, nh // nkv, axis=1)
    v = np.repeat(v, nh // nkv, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d)  # (B, nh, T, S)
    qi = np.arange(t)[:, None] + (s - t)
    allowed = (np.arange(s)[None, :] <= qi)[None, None] & (mask[:, None, None, :] == 1)
    scores = np.where(allowed, scores, np.finfo(np.float32).min)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return p @ v


def swiglu(x: np.ndarray, wg: np.ndarray, wu: np.ndarray, wd: np.ndarray) -> np.ndarray:
    g = x @ wg.T
    return ((g / (1 + np.exp(-g))) * (x @ wu.T)) @ wd.T


def layer(
    x: np.ndarray,
    pos: np.ndarray,
    mask: np.ndarray,
    past_k: np.ndarray,
    past_v: np.ndarray,
    w: dict[str, np.ndarray],
    cfg: dict,
) -> tuple[np.ndarray, ...]:
    """One decoder layer, float64; w holds HF-named tensors without the layer prefix."""
    b, t, _ = x.shape
    nh, nkv, d = cfg["n_heads"], cfg["n_kv_heads"], cfg["head_dim"]
    h = rms_norm(x, w["input_layernorm.weight"], cfg["rms_norm_eps"])

    def proj(n: str, heads: int) -> np.ndarray:
        y = h @ w[f"self_attn.{n}_proj.weight"].T
        if f"self_attn.{n}_proj.bias" in w:
            y = y + w[f"self_attn.{n}_proj.bias"]
        return y.reshape(b, t, heads, d).transpose(0, 2, 1, 3)

    q = rope(proj("q", nh), pos, cfg["rope_theta"])
    k = np.concatenate([past_k, rope(proj("k", nkv), pos, cfg["rope_theta"])], axis=2)
    v = np.concatenate([past_v, proj("v", nkv)], axis=2)
    a = attention(q, k, v, mask).transpose(0, 2, 1, 3).reshape(b, t, nh * d)
    x = x + a @ w["self_attn.o_proj.weight"].T
    h2 = rms_norm(x, w["post_attention_layernorm.weight"], cfg["rms_norm_eps"])
    mlp = [w[f"mlp.{n}_proj.weight"] for n in ("gate", "up", "down")]
    x = x + swiglu(h2, *mlp)
    return x, k, v
