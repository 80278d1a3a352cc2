"""Graph builders for the fast segments: com.microsoft contrib operators, GGUF weights kept as is.

Same three builders as `onnx_export.graph`; a layer is SkipSimplifiedLayerNormalization,
one packed-QKV MatMulNBits, GroupQueryAttention over a preallocated KV buffer (past and
present share it), MatMulNBits projections and QuickGelu(alpha=1) as SiLU. Precision
`exact` keeps fp32 activations (`accuracy_level=0`): the weights are exactly the GGUF's, so
greedy tokens match transformers on the dequantized GGUF. `int8` quantizes activations
(`accuracy_level=4`). The Q8_0 head is screened in both precisions (`_screened_head`): int8
screening, exact rescoring of the tokens near the top, so greedy tokens are exact in
0.6-0.7x the exact head's time. Shapes: B batch, T new tokens, C cache capacity, H hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto, helper

from onnx_export import rope
from onnx_export.errors import ExportError
from onnx_export.graph import GraphBuilder, gelu_tanh, softcap
from onnx_export.onnx_writer import SegmentModel
from onnx_export.source import ModelConfig, ModelWeights, RawTensor

PRECISIONS = ("exact", "int8")
MS = "com.microsoft"
BLOCK = 32
F32, I32, I64 = TensorProto.FLOAT, TensorProto.INT32, TensorProto.INT64
_ACCURACY = {"exact": 0, "int8": 4}


# ----------------------------------------------------------------------------- GGUF repacking


@dataclass(frozen=True)
class NBits:
    """One MatMulNBits weight: `packed` (N, nb, 32*bits/8) uint8, `scales` (N, nb) f32,
    optional packed uint8 `zero_points`; dequantized value = (q - zp) * scale."""

    bits: int
    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None = None


@dataclass(frozen=True)
class Quantized:
    """A `[N, K]` GGUF matrix as a sum of MatMulNBits parts plus an optional block term:
    W[n, k] = sum(parts)[n, k] + block[n, k // 32] (the Q4_1 minimum, per block)."""

    n: int
    k: int
    parts: list[NBits]
    block: np.ndarray | None  # (N, nb) f32


def _blocks(raw: RawTensor, block_bytes: int) -> np.ndarray:
    n, k = raw.shape
    if k % BLOCK:
        raise ValueError(f"{raw.qtype} tensor {raw.shape}: K not a multiple of {BLOCK}")
    return np.ascontiguousarray(raw.data).reshape(n, k // BLOCK, block_bytes)


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 from two uint8 columns (…, 2) -> f32 (…)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_gguf(qs: np.ndarray) -> np.ndarray:
    """GGUF Q4 block bytes (…, 16): element i in the low nibble of byte i, i+16 in the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # (…, 32) values 0..15


def pack4(q: np.ndarray) -> np.ndarray:
    """MatMulNBits 4-bit packing of (…, 32) values 0..15: byte i = q[2i] | q[2i+1] << 4."""
    q = q.astype(np.uint8)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))


def quantize_raw(raw: RawTensor, bits8: bool = False) -> Quantized | None:
    """The GGUF blocks of `raw` as MatMulNBits parts, or None for unsupported types.

    Q4_0: d*(q-8) is MatMulNBits' default zero point. Q4_1: d*q + m = d*(q-8) + (m + 8d), the
    second term a per-block constant. Q8_0: q + 128 = 16*hi + lo split in two 4-bit parts,
    16d*(hi-8) + d*(lo-0), or with `bits8` one 8-bit part. Measured for the 49152 x 576 head
    (onnxruntime 1.32, 2 threads, M=1 / M=8): the pair 3.2 / 11.9 ms with fp32 activations,
    2.5 / 4.9 ms with int8; one 8-bit part 86 / 105 ms with fp32 (no fast kernel), 1.5 /
    3.5 ms with int8 (the screened head's choice).
    """
    n, k = raw.shape
    if raw.qtype in ("Q4_0", "Q4_1"):
        off = 2 if raw.qtype == "Q4_0" else 4
        b = _blocks(raw, off + 16)
        d = _f16(b[..., 0:2])
        q = _nibbles_gguf(b[..., off:])
        block = None
        if raw.qtype == "Q4_1":
            block = (_f16(b[..., 2:4]) + np.float32(8) * d).astype(np.float32)
        return Quantized(n, k, [NBits(4, pack4(q), d)], block)
    if raw.qtype == "Q8_0":
        b = _blocks(raw, 34)
        d = _f16(b[..., 0:2])
        u = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)  # (N, nb, 32)
        if bits8:
            return Quantized(n, k, [NBits(8, np.ascontiguousarray(u), d)], None)
        nb = k // BLOCK
        zero = np.zeros((n, (nb + 1) // 2), np.uint8)
        return Quantized(
            n,
            k,
            [NBits(4, pack4(u >> 4), np.float32(16) * d), NBits(4, pack4(u & 0x0F), d, zero)],
            None,
        )
    return None


def dequantize_nbits(qz: Quantized) -> np.ndarray:
    """The `[N, K]` fp32 matrix a `Quantized` represents, by MatMulNBits' own formula."""
    n, k = qz.n, qz.k
    nb = k // BLOCK
    w = np.zeros((n, nb, BLOCK), np.float32)
    for p in qz.parts:
        if p.bits == 4:
            q = np.stack([p.packed & 0x0F, p.packed >> 4], axis=-1).reshape(n, nb, BLOCK)
            zp = (
                np.full((n, nb), 8, np.float32)
                if p.zero_points is None
                else np.stack([p.zero_points & 0x0F, p.zero_points >> 4], -1).reshape(n, -1)[:, :nb]
            )
        else:
            q = p.packed.reshape(n, nb, BLOCK)
            zp = (
                np.full((n, nb), 128, np.float32)
                if p.zero_points is None
                else p.zero_points.reshape(n, nb)
            )
        w += (q.astype(np.float32) - zp.astype(np.float32)[..., None]) * p.scales[..., None]
    if qz.block is not None:
        w += qz.block[..., None]
    return w.reshape(n, k)


def concat_rows(parts: list[Quantized]) -> Quantized | None:
    """Stack matrices with the same K and layout along N (packed QKV, gate+up), else None."""
    first = parts[0]
    shapes = [[(p.bits, p.zero_points is not None) for p in q.parts] for q in parts]
    if (
        any(s != shapes[0] for s in shapes)
        or any(q.k != first.k for q in parts)
        or len({q.block is None for q in parts}) != 1
    ):
        return None

    def cat(xs: list[np.ndarray | None]) -> np.ndarray | None:
        return None if xs[0] is None else np.concatenate(xs, axis=0)  # type: ignore[arg-type]

    merged = [
        NBits(
            ps[0].bits,
            np.concatenate([p.packed for p in ps]),
            np.concatenate([p.scales for p in ps]),
            cat([p.zero_points for p in ps]),
        )
        for ps in zip(*(q.parts for q in parts), strict=True)
    ]
    return Quantized(sum(q.n for q in parts), first.k, merged, cat([q.block for q in parts]))


# ----------------------------------------------------------------------------- pieces


class Linear:
    """x @ W.T for GGUF matrices, x flat `(M, K)`: MatMulNBits parts plus the block term, or
    fp32 MatMul for types without an exact 4/8-bit form (F32, F16, k-quants).

    The Q4_1 block term is (per-block sums of x) @ block.T: one small MatMul against a 0/1
    block indicator and one Gemm that adds onto the MatMulNBits output (few ops: at decode
    each costs more in dispatch than in arithmetic).
    """

    def __init__(self, g: GraphBuilder, precision: str) -> None:
        self.g, self.precision = g, precision
        self._sums: dict[str, str] = {}

    def block_sums(self, x: str, k: int) -> str:
        """(M, K) -> (M, K/32), once per input."""
        if x not in self._sums:
            ind = np.kron(np.eye(k // BLOCK, dtype=np.float32), np.ones((BLOCK, 1), np.float32))
            self._sums[x] = self.g.op(
                "MatMul", [x, self.g.const(ind, np.float32)], hint="block_sums"
            )
        return self._sums[x]

    def __call__(
        self,
        x: str,
        raws: list[RawTensor | None],
        name: str,
        dense: Callable[[], np.ndarray],
        bias: np.ndarray | None = None,
    ) -> str:
        g = self.g
        qs = [quantize_raw(r) if r is not None else None for r in raws]
        qz = concat_rows([q for q in qs if q is not None]) if None not in qs else None
        if qz is None:
            y = g.op("MatMul", [x, g.init(name, np.ascontiguousarray(dense().T))])
            return g.op("Add", [y, g.init(name + ".bias", bias)]) if bias is not None else y
        acc = _ACCURACY[self.precision]
        out = None
        for j, p in enumerate(qz.parts):
            pre = f"{name}.p{j}"
            ins = [
                x,
                g.init(pre + ".qweight", p.packed),
                g.init(pre + ".scales", p.scales),
                g.init(pre + ".zp", p.zero_points) if p.zero_points is not None else "",
            ]
            if bias is not None and j == 0:
                ins += ["", g.init(name + ".bias", bias)]
            y = g.op(
                "MatMulNBits",
                ins,
                hint="mmnb",
                domain=MS,
                K=qz.k,
                N=qz.n,
                bits=p.bits,
                block_size=BLOCK,
                accuracy_level=acc,
            )
            out = y if out is None else g.op("Add", [out, y])
        assert out is not None
        if qz.block is not None:
            out = g.op(
                "Gemm",
                [
                    self.block_sums(x, qz.k),
                    g.init(name + ".block_min", np.ascontiguousarray(qz.block.T)),
                    out,
                ],
                hint="q4_1",
            )
        return out


def rope_cache(cfg: ModelConfig, sliding: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin `(max_position, rot_dim/2)` as transformers computes them (fp32 angles), for
    full-attention layers or, where their RoPE differs (Gemma 3), sliding-window ones."""
    return rope.cos_sin(cfg, sliding)


def _dense(w: ModelWeights, names: list[str]) -> Callable[[], np.ndarray]:
    """fp32 rows of `names` stacked, read only if no exact quantized form exists."""
    return lambda: np.concatenate([w.get(n) for n in names])


def _skip_norm(g: GraphBuilder, x: str, skip: str, gamma: str, eps: float) -> tuple[str, str]:
    """(rmsnorm(x + skip) * gamma, x + skip)."""
    out, total = g.fresh("norm"), g.fresh("resid")
    g.nodes.append(
        helper.make_node(
            "SkipSimplifiedLayerNormalization",
            [x, skip, gamma],
            [out, "", "", total],
            domain=MS,
            epsilon=eps,
        )
    )
    return out, total


def _norm(g: GraphBuilder, x: str, gamma: str, eps: float) -> str:
    return g.op(
        "SimplifiedLayerNormalization", [x, gamma], hint="norm", axis=-1, epsilon=eps, stash_type=1
    )


def _finish(g: GraphBuilder) -> SegmentModel:
    return g.segment((MS, 1))


def check_config(cfg: ModelConfig) -> str | None:
    """Why this graph cannot hold `cfg`, or None: GroupQueryAttention's rotary kernel wants
    a rotating part of each head that is a multiple of 16 wide."""
    if (cfg.rot_dim // 2) % 8:
        return (
            f"the contrib graph needs a rotary dimension that is a multiple of 16 "
            f"(this model rotates {cfg.rot_dim} of {cfg.head_dim}); use --graph standard"
        )
    return None


def _check(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"contrib graph: precision {precision!r} not in {PRECISIONS}")


# ----------------------------------------------------------------------------- segments


def layers_model(
    cfg: ModelConfig, start: int, end: int, w: ModelWeights, precision: str = "exact"
) -> SegmentModel:
    """Layers [start, end) in one graph.

    Inputs: hidden (B,T,H) f32, seqlens_k (B,) i32 = tokens in cache after this step - 1,
    total_sequence_length () i32 = max over the batch of seqlens_k + 1, and per layer
    past_key_<i>/past_value_<i> (B,nkv,C,d) f32: a preallocated buffer to bind also as
    present_key_<i>/present_value_<i> (GroupQueryAttention then writes in place). Rotary
    positions follow from seqlens_k, so each request in a batch has its own position.
    """
    _check(precision)
    g = GraphBuilder(f"contrib_{precision}_layers_{start}_{end}")
    lin = Linear(g, precision)
    nh, nkv, d, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.rms_norm_eps
    kv_shape: list[int | str] = ["batch", nkv, "capacity", d]
    x_in = g.add_input("hidden", F32, ["batch", "tokens", cfg.hidden_size])
    in_shape = g.op("Shape", [x_in])
    bt_shape = g.op(
        "Concat", [g.op("Slice", [in_shape, g.const([0]), g.const([2])]), g.const([-1])], axis=0
    )  # (B, T, -1)
    x = g.op("Reshape", [x_in, g.const([-1, cfg.hidden_size])])  # (M = B T, H) from here on
    seqlens = g.add_input("seqlens_k", I32, ["batch"])
    total = g.add_input("total_sequence_length", I32, [])
    tables: dict[bool, tuple[str, str]] = {}

    def rope_inputs(layer: int) -> tuple[str, str]:
        local = cfg.is_sliding(layer) and cfg.rope_local_theta is not None
        if local not in tables:
            cos, sin = rope_cache(cfg, local)
            tag = "rope.local" if local else "rope"
            tables[local] = (g.init(tag + ".cos", cos), g.init(tag + ".sin", sin))
        return tables[local]

    def raw(n: str) -> RawTensor | None:
        return stored(w, n)

    def head_norm(t: str, n_heads: int, weight: str) -> str:  # (M, n d) -> (M, n d)
        per_head = g.op("Reshape", [t, g.const([-1, n_heads, d])])
        return g.op("Reshape", [_norm(g, per_head, weight, eps), g.const([-1, n_heads * d])])

    delta: str | None = None  # the last sublayer output not yet added to the residual `x`
    out_kv: list[tuple[int, str, str]] = []
    for i in range(start, end):
        p = f"model.layers.{i}."

        def gamma(n: str, p: str = p) -> str:
            return g.init(p + n, w.get(p + n))

        ln1 = gamma("input_layernorm.weight")
        if delta is None:
            h = _norm(g, x, ln1, eps)
        else:
            h, x = _skip_norm(g, delta, x, ln1, eps)
        names = [f"{p}self_attn.{n}_proj" for n in "qkv"]
        bias = np.concatenate([w.get(n + ".bias") for n in names]) if cfg.attention_bias else None
        qkv = lin(
            h,
            [raw(n + ".weight") for n in names],
            p + "qkv_proj",
            _dense(w, [n + ".weight" for n in names]),
            bias,
        )  # (M, (nh + 2 nkv) d)
        if cfg.qk_norm:
            q, k, v = g.fresh("q"), g.fresh("k"), g.fresh("v")
            g.nodes.append(
                helper.make_node(
                    "Split", [qkv, g.const([nh * d, nkv * d, nkv * d])], [q, k, v], axis=-1
                )
            )
            q = head_norm(q, nh, gamma("self_attn.q_norm.weight"))
            k = head_norm(k, nkv, gamma("self_attn.k_norm.weight"))
            qkv_in = [g.op("Reshape", [t, bt_shape]) for t in (q, k, v)]
        else:
            qkv_in = [g.op("Reshape", [qkv, bt_shape]), "", ""]
        pk = g.add_input(f"past_key_{i}", F32, kv_shape)
        pv = g.add_input(f"past_value_{i}", F32, kv_shape)
        attn, pres_k, pres_v = g.fresh("attn"), g.fresh("present_k"), g.fresh("present_v")
        cos_n, sin_n = rope_inputs(i)
        extra: dict[str, Any] = {}
        if cfg.attn_softcap is not None:
            extra["softcap"] = float(cfg.attn_softcap)
        if cfg.is_sliding(i):
            assert cfg.sliding_window is not None
            extra["local_window_size"] = int(cfg.sliding_window)
        g.nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [*qkv_in, pk, pv, seqlens, total, cos_n, sin_n],
                [attn, pres_k, pres_v],
                domain=MS,
                num_heads=nh,
                kv_num_heads=nkv,
                do_rotary=1,
                rotary_interleaved=0,
                scale=float(cfg.scale),
                **extra,
            )
        )  # (B, T, nh d)
        out_kv.append((i, pres_k, pres_v))
        o_name = p + "self_attn.o_proj.weight"
        attn2 = g.op("Reshape", [attn, g.const([-1, nh * d])])  # (M, nh d)
        o = lin(attn2, [raw(o_name)], p + "o_proj", _dense(w, [o_name]))
        if cfg.sandwich_norm:
            o = _norm(g, o, gamma("post_attention_layernorm.weight"), eps)
            ln2 = gamma("pre_feedforward_layernorm.weight")
        else:
            ln2 = gamma("post_attention_layernorm.weight")
        h2, x = _skip_norm(g, o, x, ln2, eps)
        gu_names = [p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]
        gu = lin(
            h2, [raw(n) for n in gu_names], p + "gate_up_proj", _dense(w, gu_names)
        )  # (M, 2 I)
        gate, up = g.fresh("gate"), g.fresh("up")
        g.nodes.append(
            helper.make_node(
                "Split", [gu, g.const([cfg.intermediate_size] * 2)], [gate, up], axis=-1
            )
        )
        if cfg.hidden_act == "gelu_tanh":
            act = g.op("Mul", [gelu_tanh(g, gate), up])
        else:
            act = g.op("Mul", [g.op("QuickGelu", [gate], domain=MS, alpha=1.0), up])  # SiLU * up
        d_name = p + "mlp.down_proj.weight"
        delta = lin(act, [raw(d_name)], p + "down_proj", _dense(w, [d_name]))
        if cfg.sandwich_norm:
            delta = _norm(g, delta, gamma("post_feedforward_layernorm.weight"), eps)
    assert delta is not None
    g.add_output(
        "hidden_out",
        g.op("Reshape", [g.op("Add", [x, delta]), in_shape]),
        F32,
        ["batch", "tokens", cfg.hidden_size],
    )
    for i, k, v in out_kv:
        g.add_output(f"present_key_{i}", k, F32, kv_shape)
        g.add_output(f"present_value_{i}", v, F32, kv_shape)
    return _finish(g)


def stored(w: ModelWeights, name: str) -> RawTensor | None:
    """The GGUF blocks of `name`, or None when the source keeps no quantized form (HF)."""
    try:
        return w.raw(name)
    except ExportError:
        return None


def embed_model(cfg: ModelConfig, w: ModelWeights, precision: str = "exact") -> SegmentModel:
    """input_ids (B,T) i64 -> hidden (B,T,H); a Q8_0 table stays int8 with its block scales."""
    _check(precision)
    g = GraphBuilder(f"contrib_{precision}_embed")
    ids = g.add_input("input_ids", I64, ["batch", "tokens"])
    name = "model.embed_tokens.weight"
    raw = stored(w, name)
    if raw is not None and raw.qtype == "Q8_0":
        b = _blocks(raw, 34)
        q = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(raw.shape)  # (V, H)
        d = _f16(b[..., 0:2])  # (V, H/32)
        rows = g.op(
            "Cast", [g.op("Gather", [g.init(name + ".q8", q), ids], axis=0)], to=F32
        )  # (B, T, H)
        scales = g.op("Gather", [g.init(name + ".scales", d), ids], axis=0)  # (B, T, H/32)
        shape = g.op(
            "Concat", [g.op("Shape", [ids]), g.const([cfg.hidden_size // BLOCK, BLOCK])], axis=0
        )
        blocks = g.op(
            "Mul", [g.op("Reshape", [rows, shape]), g.op("Unsqueeze", [scales, g.const([-1])])]
        )
        hidden = g.op(
            "Reshape",
            [blocks, g.op("Concat", [g.op("Shape", [ids]), g.const([cfg.hidden_size])], axis=0)],
        )
    else:
        hidden = g.op("Gather", [g.init(name, w.get(name)), ids], axis=0)
    if cfg.embed_scale is not None:
        hidden = g.op("Mul", [hidden, g.const(cfg.embed_scale, np.float32)])
    g.add_output("hidden", hidden, F32, ["batch", "tokens", cfg.hidden_size])
    return _finish(g)


def head_model(
    cfg: ModelConfig, w: ModelWeights, precision: str = "exact", *, screened: bool = True
) -> SegmentModel:
    """hidden (B,T,H) -> logits (B,T,V), logit_bound (B,T): final RMSNorm and the lm_head.

    A Q8_0 head (the tied embedding) is screened (`_screened_head`): greedy tokens are those
    of the exact fp32 product in both precisions, in 0.6-0.7x the exact head's time. Other
    heads, or `screened=False` (`alternative_heads`), are one `Linear`, their bound 0: not
    screened, logits as the precision computes them.
    """
    _check(precision)
    g = GraphBuilder(f"contrib_{precision}_head")
    x_in = g.add_input("hidden", F32, ["batch", "tokens", cfg.hidden_size])
    x = g.op("Reshape", [x_in, g.const([-1, cfg.hidden_size])])  # (B T, H)
    h = _norm(g, x, g.init("model.norm.weight", w.get("model.norm.weight")), cfg.rms_norm_eps)
    name = _head_name(cfg)
    raw = stored(w, name)
    if screened and _screenable(raw):
        assert raw is not None
        logits, bound = _screened_head(g, h, raw)
    else:
        logits = Linear(g, precision)(h, [raw], "lm_head", _dense(w, [name]))
        rows = g.op("Slice", [g.op("Shape", [h]), g.const([0]), g.const([1])])
        bound = g.op("ConstantOfShape", [rows], value=helper.make_tensor("zero", F32, [1], [0]))
    if cfg.final_softcap is not None:
        # monotonic and 1-Lipschitz: the argmax and the bound survive it
        logits = softcap(g, logits, cfg.final_softcap)
    bt = g.op("Slice", [g.op("Shape", [x_in]), g.const([0]), g.const([2])])
    g.add_output(
        "logits",
        g.op("Reshape", [logits, g.op("Concat", [bt, g.const([-1])], axis=0)]),
        F32,
        ["batch", "tokens", cfg.vocab_size],
    )
    g.add_output("logit_bound", g.op("Reshape", [bound, bt]), F32, ["batch", "tokens"])
    return _finish(g)


def _head_name(cfg: ModelConfig) -> str:
    return "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"


def _screenable(raw: RawTensor | None) -> bool:
    return raw is not None and raw.qtype == "Q8_0"


def alternative_heads(
    cfg: ModelConfig, w: ModelWeights, precision: str
) -> dict[str, Callable[[], SegmentModel]]:
    """Extra head segments, by name suffix: the unscreened head beside a screened one.

    The screen needs onnxruntime's 8-bit int8 kernel (x86 AVX2/AVX512, ARM with dotprod);
    without it (a Raspberry Pi 4's Cortex-A72) MatMulNBits falls back to a path measured
    ~25x slower than the 4-bit pair, so `VariantHead` times both and keeps the unscreened
    one where the screen is that slow.
    """
    if not _screenable(stored(w, _head_name(cfg))):
        return {}
    return {"head_unscreened": lambda: head_model(cfg, w, precision, screened=False)}


RESCORE_CAP = 1024
"""Most tokens of one row rescored (about 9 KB of working memory each)."""


def _screened_head(g: GraphBuilder, h: str, raw: RawTensor) -> tuple[str, str]:
    """Logits of a Q8_0 head, (M, V), exact near the top, and their bound eps, (M,).

    1. Screen: one 8-bit MatMulNBits with int8 activations (`accuracy_level=4`, about 0.5x
       the exact 4-bit pair's time; 0.6-0.7x with the rescoring). The weights are exact;
       the only error is the activations' per-32-block int8 rounding, at most amax_b/254
       per element, so every logit is within
       eps = sum_b amax_b/254 * max_n |W[n, block b]|_1 (+ slack) of exact.
    2. Rescore: the band, every token whose screened logit is within 2 eps of the row's
       best, gets its exact fp32 dot product (Gather of its int8 row; measured at decode:
       median 26 tokens of 49152, at most 927). Any token outside the band has an exact
       logit below best - eps, under the exact logit of the screened best: the argmax
       (greedy token) is the exact one, certified per row.
    Tokens outside the band keep screened logits (within eps); `logit_bound` reports eps,
    so callers and tests can tell which logits are exact. A row whose band holds more than
    `RESCORE_CAP` tokens (flat logits: the first positions of a prompt, garbage hidden
    states), or whose hidden state is not finite, keeps its screened logits with bound +inf
    (nothing certified): the head's memory stays bounded, at most `RESCORE_CAP` rescored
    tokens per row.

    "Certified" rests on how onnxruntime quantizes activations for this kernel: per block
    of 32, scale amax/127, round to nearest (MLAS `QuantizeARow_CompInt8` on x86, the 8-bit
    dotprod kernels on ARM), with x1.01 and +0.01 for fp32 sums. `tests/fast/test_head.py`
    checks the bound against the exact product on this machine's kernels.
    """
    qz = quantize_raw(raw, bits8=True)
    assert qz is not None
    p = qz.parts[0]
    n, k, nb = qz.n, qz.k, qz.k // BLOCK
    wq = g.init("lm_head.q8", p.packed)  # (V, nb, 32) uint8 = q + 128, for both steps
    sc = g.init("lm_head.scales", p.scales)  # (V, nb) f32
    screened = g.op(
        "MatMulNBits",
        [h, wq, sc],
        hint="screen",
        domain=MS,
        K=k,
        N=n,
        bits=8,
        block_size=BLOCK,
        accuracy_level=4,
    )  # (M, V)
    l1 = np.concatenate(
        [
            np.abs(p.packed[a : a + 4096].astype(np.float64) - 128).sum(-1)
            * p.scales[a : a + 4096].astype(np.float64)
            for a in range(0, n, 4096)  # in row blocks: float64 of a whole head is GBs
        ]
    )  # (V, nb): |W[n, block]|_1
    per_amax = (l1.max(0) / 254.0 * 1.01).astype(np.float32)[:, None]  # (nb, 1)
    amax = g.op(
        "ReduceMax",
        [g.op("Abs", [g.op("Reshape", [h, g.const([-1, nb, BLOCK])])]), g.const([-1])],
        keepdims=0,
    )  # (M, nb)
    eps = g.op(
        "Add", [g.op("MatMul", [amax, g.const(per_amax, np.float32)]), g.const(1e-2, np.float32)]
    )  # (M, 1); slack for fp32 sums
    best = g.op("ReduceMax", [screened, g.const([-1])], keepdims=1)  # (M, 1)
    band = g.op("Sub", [best, g.op("Mul", [eps, g.const(2.0, np.float32)])])
    in_band = g.op("GreaterOrEqual", [screened, band])  # (M, V)
    size = g.op(
        "ReduceSum", [g.op("Cast", [in_band], to=F32), g.const([-1])], keepdims=1
    )  # (M, 1); counted in fp32 (exact to 2^24), 5x faster than int64
    total = g.op("ReduceSum", [h, g.const([-1])], keepdims=1)  # NaN or inf if any element is
    finite = g.op("Not", [g.op("Or", [g.op("IsNaN", [total]), g.op("IsInf", [total])])])
    certified = g.op(
        "And", [g.op("LessOrEqual", [size, g.const(float(RESCORE_CAP), np.float32)]), finite]
    )
    idx = g.op(
        "Transpose", [g.op("NonZero", [g.op("And", [in_band, certified])])], perm=[1, 0]
    )  # (c, 2): (row, token) pairs to rescore
    rows = g.op("Squeeze", [g.op("Gather", [idx, g.const([0])], axis=1), g.const([1])])  # (c,)
    toks = g.op("Squeeze", [g.op("Gather", [idx, g.const([1])], axis=1), g.const([1])])
    wr = g.op(
        "Mul",
        [
            g.op(
                "Sub",
                [
                    g.op("Cast", [g.op("Gather", [wq, toks], axis=0)], to=F32),
                    g.const(128.0, np.float32),
                ],
            ),
            g.op("Unsqueeze", [g.op("Gather", [sc, toks], axis=0), g.const([-1])]),
        ],
    )
    xr = g.op("Reshape", [g.op("Gather", [h, rows], axis=0), g.const([-1, nb, BLOCK])])
    exact = g.op("ReduceSum", [g.op("Mul", [wr, xr]), g.const([-1, -2])], keepdims=0)  # (c,)
    logits = g.op("ScatterND", [screened, idx, exact])
    bound = g.op("Where", [certified, eps, g.const(np.inf, np.float32)])
    return logits, g.op("Squeeze", [bound, g.const([-1])])
