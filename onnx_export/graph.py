"""Graph builders for the portable segments: standard ONNX operators only, fp32 throughout.

Each builder appends nodes to a `GraphBuilder` and returns output names, so the same code
builds a single layer, a contiguous layer range (one session for many layers) or a test
graph. Shapes: B batch, T new tokens, P past tokens, S = P + T, H hidden, nh heads,
nkv key/value heads, g = nh / nkv, d head dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_export import rope
from onnx_export.onnx_writer import SegmentModel, is_deferred, spill
from onnx_export.source import ModelConfig, ModelWeights

OPSET = 18
PRECISIONS = ("fp32",)
FLOAT_MIN = float(np.finfo(np.float32).min)  # the additive mask value transformers uses


@dataclass
class GraphBuilder:
    """Collects nodes and initializers with unique names."""

    name: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    arrays: list[tuple[str, np.ndarray]] = field(default_factory=list)  # streamed when saved
    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    outputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    spill: bool = False
    """Large initializers go to temporary files as they are made (`onnx_writer.spill`):
    for layer ranges, whose arrays would otherwise all be held until the file is written."""
    _n: int = 0
    _consts: dict[tuple[str, bytes], str] = field(default_factory=dict)

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(
        self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, **attrs: Any
    ) -> str:
        outs = [self.fresh(hint or op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, **attrs))
        return outs[0]

    def init(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array)
        if is_deferred(array):
            self.arrays.append((name, spill(array) if self.spill else array))
        else:
            self.inits.append(numpy_helper.from_array(array, name))
        return name

    def const(self, value: np.ndarray | list[int] | float, dtype: type = np.int64) -> str:
        arr: np.ndarray = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str + str(arr.shape), arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(self.fresh("const"), arr)
        return self._consts[key]

    def add_input(self, name: str, elem: int, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def add_output(self, name: str, src: str, elem: int, shape: list[int | str]) -> None:
        self.nodes.append(helper.make_node("Identity", [src], [name]))
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def segment(self, *domains: tuple[str, int]) -> SegmentModel:
        """The model, its large initializers kept as arrays until saved (`SegmentModel`);
        `domains` adds operator sets (e.g. com.microsoft) to the default one."""
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        m = helper.make_model(
            graph,
            opset_imports=[
                helper.make_opsetid("", OPSET),
                *(helper.make_opsetid(d, v) for d, v in domains),
            ],
            producer_name="e2llm-edge onnx_export",
        )
        m.ir_version = 9
        return SegmentModel(m, list(self.arrays))

    def model(self) -> onnx.ModelProto:
        """The whole model as one proto (small graphs and tests)."""
        return self.segment().to_proto()


# ----------------------------------------------------------------------------- pieces


def rms_norm(g: GraphBuilder, x: str, weight: str, eps: float) -> str:
    """x * rsqrt(mean(x^2) + eps) * w, in fp32 as transformers' LlamaRMSNorm."""
    sq = g.op("Mul", [x, x])
    mean = g.op("ReduceMean", [sq, g.const([-1])], keepdims=1)
    inv = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [mean, g.const(eps, np.float32)])])])
    return g.op("Mul", [weight, g.op("Mul", [x, inv])], hint="rmsnorm")


def rope_tables(
    g: GraphBuilder, position_ids: str, cfg: ModelConfig, sliding: bool = False
) -> tuple[str, str]:
    """cos/sin `[B, 1, T, r]` for rotate-half RoPE over the first r = rot_dim dims of each
    head, from int64 positions `[B, T]` (`onnx_export.rope` holds the frequencies)."""
    pos = g.op("Cast", [position_ids], to=TensorProto.FLOAT)  # (B, T)
    pos3 = g.op("Unsqueeze", [pos, g.const([-1])])  # (B, T, 1)
    freqs = g.op("Mul", [pos3, g.const(rope.inv_freq(cfg, sliding), np.float32)])  # (B, T, r/2)
    emb = g.op("Concat", [freqs, freqs], axis=-1)  # (B, T, r)
    emb4 = g.op("Unsqueeze", [emb, g.const([1])])  # (B, 1, T, r)
    cos, sin = g.op("Cos", [emb4], hint="cos"), g.op("Sin", [emb4], hint="sin")
    factor = rope.attention_factor(cfg, sliding)
    if factor != 1.0:
        cos = g.op("Mul", [cos, g.const(factor, np.float32)])
        sin = g.op("Mul", [sin, g.const(factor, np.float32)])
    return cos, sin


def apply_rope(g: GraphBuilder, x: str, cos: str, sin: str, head_dim: int, rot_dim: int) -> str:
    """x * cos + rotate_half(x) * sin with rotate_half(x) = [-x2, x1] over the first
    `rot_dim` dims of each head (the rest pass through); x is (B, h, T, d)."""
    rest = None
    if rot_dim != head_dim:
        xr, rest = g.fresh("x_rot"), g.fresh("x_pass")
        g.nodes.append(
            helper.make_node(
                "Split", [x, g.const([rot_dim, head_dim - rot_dim])], [xr, rest], axis=-1
            )
        )
        x = xr
    half = rot_dim // 2
    x1, x2 = g.fresh("x1"), g.fresh("x2")
    g.nodes.append(helper.make_node("Split", [x, g.const([half, half])], [x1, x2], axis=-1))
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    out = g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])], hint="rope")
    return out if rest is None else g.op("Concat", [out, rest], axis=-1)


def attention_bias(
    g: GraphBuilder, attention_mask: str, t_len: str, s_len: str, window: int | None = None
) -> str:
    """Additive mask `[B, 1, 1, T, S]`: causal over the S = P + T positions and padding.

    Query i (absolute index P + i) may see key j when j <= P + i and attention_mask[b, j],
    and, with a sliding `window`, when j > P + i - window.
    """
    zero, one = g.const(0), g.const(1)
    p_len = g.op("Sub", [s_len, t_len])
    q_idx = g.op("Add", [g.op("Range", [zero, t_len, one]), p_len])  # (T,)
    k_idx = g.op("Range", [zero, s_len, one])  # (S,)
    k_row = g.op("Unsqueeze", [k_idx, g.const([0])])  # (1, S)
    q_col = g.op("Unsqueeze", [q_idx, g.const([1])])  # (T, 1)
    causal = g.op("LessOrEqual", [k_row, q_col])  # (T, S)
    if window is not None:
        lower = g.op("Sub", [q_col, g.const(window)])
        causal = g.op("And", [causal, g.op("Greater", [k_row, lower])])
    pad = g.op("Cast", [attention_mask], to=TensorProto.BOOL)  # (B, S)
    pad5 = g.op("Unsqueeze", [pad, g.const([1, 2, 3])])  # (B, 1, 1, 1, S)
    allowed = g.op("And", [causal, pad5])  # (B, 1, 1, T, S)
    return g.op(
        "Where", [allowed, g.const(0.0, np.float32), g.const(FLOAT_MIN, np.float32)], hint="mask"
    )


def gelu_tanh(g: GraphBuilder, x: str) -> str:
    """GELU, tanh approximation, in torch's order of operations (Gemma's MLP)."""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Add", [x, g.op("Mul", [cube, g.const(0.044715, np.float32)])])
    beta = math.sqrt(2.0) * (2.0 / math.sqrt(math.pi)) * 0.5
    t = g.op("Tanh", [g.op("Mul", [inner, g.const(beta, np.float32)])])
    half_x = g.op("Mul", [x, g.const(0.5, np.float32)])
    return g.op("Mul", [half_x, g.op("Add", [t, g.const(1.0, np.float32)])], hint="gelu")


def softcap(g: GraphBuilder, x: str, cap: float) -> str:
    """tanh(x / cap) * cap (Gemma 2's attention and final logits)."""
    t = g.op("Tanh", [g.op("Div", [x, g.const(cap, np.float32)])])
    return g.op("Mul", [t, g.const(cap, np.float32)], hint="softcap")


def linear(
    g: GraphBuilder, x: str, w: np.ndarray, name: str, bias: np.ndarray | None = None
) -> str:
    """x @ w.T (+ b); `w` is `[out, in]` as in transformers, stored transposed."""
    y = g.op("MatMul", [x, g.init(name, np.ascontiguousarray(w.T))])
    if bias is not None:
        y = g.op("Add", [y, g.init(name + ".bias", bias)])
    return y


def softmax_with_sink(
    g: GraphBuilder, scores: str, sinks: np.ndarray, name: str, nkv: int, grp: int
) -> str:
    """gpt-oss's attention sinks: each head's learned logit joins the softmax over the keys
    `(B, nkv, g, T, S)` as one more column, which is then dropped (probabilities sum to
    less than one)."""
    sink = g.init(name, sinks.astype(np.float32).reshape(1, nkv, grp, 1, 1))
    lead = g.op("Slice", [g.op("Shape", [scores]), g.const([0]), g.const([4])])
    col = g.op("Expand", [sink, g.op("Concat", [lead, g.const([1])], axis=0)])
    probs = g.op("Softmax", [g.op("Concat", [scores, col], axis=-1)], axis=-1)
    return g.op("Slice", [probs, g.const([0]), g.const([-1]), g.const([-1])], hint="probs")


def clamped_swiglu(g: GraphBuilder, cfg: ModelConfig, gate: str, up: str) -> str:
    """gpt-oss's expert activation, in transformers' order of operations:
    (clip(up, -l, l) + 1) * min(gate, l) * sigmoid(alpha * min(gate, l))."""
    if cfg.swiglu_limit is not None:
        lim = cfg.swiglu_limit
        gate = g.op("Min", [gate, g.const(lim, np.float32)])
        up = g.op("Clip", [up, g.const(-lim, np.float32), g.const(lim, np.float32)])
    glu = g.op(
        "Mul", [gate, g.op("Sigmoid", [g.op("Mul", [gate, g.const(cfg.swiglu_alpha, np.float32)])])]
    )
    return g.op("Mul", [g.op("Add", [up, g.const(1.0, np.float32)]), glu], hint="swiglu")


def moe_block(
    g: GraphBuilder,
    cfg: ModelConfig,
    x: str,
    router_w: np.ndarray,
    router_b: np.ndarray,
    name: str,
    expert: Callable[[str, int, str], str],
) -> str:
    """The mixture of experts over tokens `x (M, H)` -> `(M, H)`: the router's top-k logits,
    softmaxed, weigh the chosen experts' outputs.

    Each expert runs only on the tokens that chose it: its token rows are found with NonZero,
    gathered, passed through `expert(rows, e, "gate"|"up"|"down")` (rows @ W.T + b, however
    the weights are stored) and added back with ScatterND, in expert order as transformers
    adds them. An expert no token chose runs on zero rows, which costs nothing, so a decode
    step computes k experts per token, never all of them.
    """
    logits = linear(g, x, router_w, name, router_b)  # (M, E)
    top, idx = g.fresh("top"), g.fresh("experts")
    g.nodes.append(
        helper.make_node(
            "TopK",
            [logits, g.const([cfg.n_experts_used])],
            [top, idx],
            axis=-1,
            largest=1,
            sorted=1,
        )
    )
    weights = g.op("Softmax", [top], axis=-1)  # (M, k)
    acc = g.op("Mul", [x, g.const(0.0, np.float32)])  # zeros (M, H)
    for e in range(cfg.n_experts):
        hit = g.op("NonZero", [g.op("Equal", [idx, g.const(e)])])  # (2, n): token, slot
        pairs = g.op("Transpose", [hit], perm=[1, 0])  # (n, 2)
        tok = g.op("Reshape", [g.op("Gather", [hit, g.const([0])], axis=0), g.const([-1])])
        rows = g.op("Gather", [x, tok], axis=0)  # (n, H)
        act = clamped_swiglu(g, cfg, expert(rows, e, "gate"), expert(rows, e, "up"))
        out = expert(act, e, "down")  # (n, H)
        w = g.op("Unsqueeze", [g.op("GatherND", [weights, pairs]), g.const([-1])])
        acc = g.op(
            "ScatterND",
            [acc, g.op("Unsqueeze", [tok, g.const([-1])]), g.op("Mul", [out, w])],
            reduction="add",
        )
    return acc


@dataclass
class LayerIO:
    """Names shared by all layers of one segment: RoPE tables and masks are built once per
    kind of layer (full or sliding window) that the segment holds."""

    position_ids: str
    attention_mask: str
    b_dim: str  # (1,) int64 tensors holding B and T
    t_dim: str
    t_scalar: str
    s_scalar: str
    _cache: dict[Any, tuple[str, str]] = field(default_factory=dict)

    def rope(self, g: GraphBuilder, cfg: ModelConfig, layer: int) -> tuple[str, str]:
        sliding = cfg.is_sliding(layer) and cfg.rope_local_theta is not None
        key = ("rope", sliding)
        if key not in self._cache:
            self._cache[key] = rope_tables(g, self.position_ids, cfg, sliding)
        return self._cache[key]

    def mask(self, g: GraphBuilder, cfg: ModelConfig, layer: int, past_k: str) -> str:
        """The additive mask of `layer`. A sliding-window layer's past may hold only the
        last positions (the runner keeps its window, `kv_windows`): its S = P + T columns
        are the last S of `attention_mask`, and the causal and window tests, relative
        to the query, hold on those columns as on all."""
        if cfg.is_sliding(layer):
            p_dim = g.op("Slice", [g.op("Shape", [past_k]), g.const([2]), g.const([3])])
            s_dim = g.op("Add", [p_dim, self.t_dim])
            cols = g.op(
                "Slice",
                [self.attention_mask, g.op("Neg", [s_dim]), g.const([2**62]), g.const([1])],
            )
            s_len = g.op("Squeeze", [s_dim, g.const([0])])
            return attention_bias(g, cols, self.t_scalar, s_len, cfg.sliding_window)
        if "mask" not in self._cache:
            m = attention_bias(g, self.attention_mask, self.t_scalar, self.s_scalar)
            self._cache["mask"] = (m, m)
        return self._cache["mask"][0]


def head_norm(g: GraphBuilder, x: str, weight: np.ndarray, name: str, eps: float) -> str:
    """RMSNorm over the last axis of (B, h, T, d) with a (d,) weight (Q/K norms)."""
    return rms_norm(g, x, g.init(name, weight), eps)


def decoder_layer(
    g: GraphBuilder,
    cfg: ModelConfig,
    x: str,
    io: LayerIO,
    past_k: str,
    past_v: str,
    get: Callable[[str], np.ndarray],
    idx: int,
) -> tuple[str, str, str]:
    """One decoder layer. Returns (hidden, present_k, present_v)."""
    p = f"model.layers.{idx}."
    nh, nkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    grp = nh // nkv
    eps = cfg.rms_norm_eps

    def bias(n: str) -> np.ndarray | None:
        return get(p + n) if cfg.attention_bias else None

    def norm(t: str, n: str) -> str:
        return rms_norm(g, t, g.init(p + n, get(p + n)), eps)

    h = norm(x, "input_layernorm.weight")
    q, k, v = (
        linear(
            g,
            h,
            get(f"{p}self_attn.{n}_proj.weight"),
            f"{p}{n}_proj",
            bias(f"self_attn.{n}_proj.bias"),
        )
        for n in "qkv"
    )

    def heads(t: str, n: int) -> str:  # (B, T, n*d) -> (B, n, T, d)
        shape = g.op("Concat", [io.b_dim, io.t_dim, g.const([n, d])], axis=0)
        return g.op("Transpose", [g.op("Reshape", [t, shape])], perm=[0, 2, 1, 3])

    q4, k4 = heads(q, nh), heads(k, nkv)  # (B, nh, T, d), (B, nkv, T, d)
    if cfg.qk_norm:
        q4 = norm(q4, "self_attn.q_norm.weight")
        k4 = norm(k4, "self_attn.k_norm.weight")
    cos, sin = io.rope(g, cfg, idx)
    q4 = apply_rope(g, q4, cos, sin, d, cfg.rot_dim)
    k4 = apply_rope(g, k4, cos, sin, d, cfg.rot_dim)
    v4 = heads(v, nkv)
    present_k = g.op("Concat", [past_k, k4], axis=2, hint="present_k")  # (B, nkv, S, d)
    present_v = g.op("Concat", [past_v, v4], axis=2, hint="present_v")

    # Group queries by their KV head instead of repeating K/V: (B, nkv, g, T, d).
    q5 = g.op(
        "Reshape",
        [q4, g.op("Concat", [io.b_dim, g.const([nkv, grp]), io.t_dim, g.const([d])], axis=0)],
    )
    k5 = g.op("Unsqueeze", [present_k, g.const([2])])  # (B, nkv, 1, S, d)
    v5 = g.op("Unsqueeze", [present_v, g.const([2])])
    scores = g.op("MatMul", [q5, g.op("Transpose", [k5], perm=[0, 1, 2, 4, 3])])  # (B,nkv,g,T,S)
    scores = g.op("Mul", [scores, g.const(cfg.scale, np.float32)])
    if cfg.attn_softcap is not None:
        scores = softcap(g, scores, cfg.attn_softcap)
    scores = g.op("Add", [scores, io.mask(g, cfg, idx, past_k)])
    if cfg.attn_sinks:
        probs = softmax_with_sink(g, scores, get(p + "self_attn.sinks"), p + "sinks", nkv, grp)
    else:
        probs = g.op("Softmax", [scores], axis=-1)
    ctx = g.op("MatMul", [probs, v5])  # (B, nkv, g, T, d)
    ctx = g.op(
        "Reshape", [ctx, g.op("Concat", [io.b_dim, g.const([nh]), io.t_dim, g.const([d])], axis=0)]
    )  # (B, nh, T, d)
    ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])  # (B, T, nh, d)
    ctx = g.op("Reshape", [ctx, g.op("Concat", [io.b_dim, io.t_dim, g.const([nh * d])], axis=0)])
    o_bias = get(p + "self_attn.o_proj.bias") if cfg.o_bias else None
    attn = linear(g, ctx, get(p + "self_attn.o_proj.weight"), p + "o_proj", o_bias)
    if cfg.sandwich_norm:
        attn = norm(attn, "post_attention_layernorm.weight")
    x = g.op("Add", [x, attn])

    h2 = norm(
        x,
        "pre_feedforward_layernorm.weight"
        if cfg.sandwich_norm
        else "post_attention_layernorm.weight",
    )
    if cfg.moe:

        def expert(x: str, e: int, n: str) -> str:
            q = f"{p}mlp.experts.{e}.{n}_proj."
            return linear(g, x, get(q + "weight"), q[:-1], get(q + "bias"))

        flat = g.op("Reshape", [h2, g.const([-1, cfg.hidden_size])])
        router = (get(p + "mlp.router.weight"), get(p + "mlp.router.bias"))
        moe = moe_block(g, cfg, flat, *router, p + "mlp.router", expert)
        moe = g.op("Reshape", [moe, g.op("Shape", [x])])
        return g.op("Add", [x, moe], hint="hidden"), present_k, present_v
    gate = linear(g, h2, get(p + "mlp.gate_proj.weight"), p + "gate_proj")
    up = linear(g, h2, get(p + "mlp.up_proj.weight"), p + "up_proj")
    if cfg.hidden_act == "gelu_tanh":
        act = gelu_tanh(g, gate)
    else:
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate])])  # SiLU
    down = linear(g, g.op("Mul", [act, up]), get(p + "mlp.down_proj.weight"), p + "down_proj")
    if cfg.sandwich_norm:
        down = norm(down, "post_feedforward_layernorm.weight")
    return g.op("Add", [x, down], hint="hidden"), present_k, present_v


# ----------------------------------------------------------------------------- segments

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def layers_model(
    cfg: ModelConfig, start: int, end: int, w: ModelWeights, precision: str = "fp32"
) -> SegmentModel:
    """Layers [start, end) in one graph.

    Inputs: hidden (B,T,H) f32, position_ids (B,T) i64, attention_mask (B,S) i64 (1 = real
    token), past_key_<i>/past_value_<i> (B,nkv,P,d) f32 per layer. Outputs: hidden_out,
    present_key_<i>/present_value_<i> (B,nkv,S,d). P = 0 for prefill; one file serves both.
    """
    ranged = end - start > 1  # built whole before it is written: spill, release per layer
    g = GraphBuilder(f"layers_{start}_{end}", spill=ranged)
    kv_shape: list[int | str] = ["batch", cfg.n_kv_heads, "past", cfg.head_dim]
    x = g.add_input("hidden", F32, ["batch", "tokens", cfg.hidden_size])
    pos = g.add_input("position_ids", I64, ["batch", "tokens"])
    mask_in = g.add_input("attention_mask", I64, ["batch", "total"])
    shape = g.op("Shape", [x])
    b_dim = g.op("Slice", [shape, g.const([0]), g.const([1])])
    t_dim = g.op("Slice", [shape, g.const([1]), g.const([2])])
    s_dim = g.op("Slice", [g.op("Shape", [mask_in]), g.const([1]), g.const([2])])
    t_scalar = g.op("Squeeze", [t_dim, g.const([0])])
    s_scalar = g.op("Squeeze", [s_dim, g.const([0])])
    io = LayerIO(pos, mask_in, b_dim, t_dim, t_scalar, s_scalar)
    out_kv: list[tuple[int, str, str]] = []
    for i in range(start, end):
        if ranged:
            w.release()  # the source pages of the layers before: their arrays are spilled
        pk = g.add_input(f"past_key_{i}", F32, kv_shape)
        pv = g.add_input(f"past_value_{i}", F32, kv_shape)
        x, k, v = decoder_layer(g, cfg, x, io, pk, pv, w.get, i)
        out_kv.append((i, k, v))
    g.add_output("hidden_out", x, F32, ["batch", "tokens", cfg.hidden_size])
    present_shape: list[int | str] = ["batch", cfg.n_kv_heads, "total", cfg.head_dim]
    for i, k, v in out_kv:
        g.add_output(f"present_key_{i}", k, F32, present_shape)
        g.add_output(f"present_value_{i}", v, F32, present_shape)
    return g.segment()


def embed_model(cfg: ModelConfig, w: ModelWeights, precision: str = "fp32") -> SegmentModel:
    """input_ids (B,T) i64 -> hidden (B,T,H), scaled where the model scales embeddings."""
    g = GraphBuilder("embed")
    ids = g.add_input("input_ids", I64, ["batch", "tokens"])
    table = g.init("model.embed_tokens.weight", w.get("model.embed_tokens.weight"))
    hidden = g.op("Gather", [table, ids], axis=0)
    if cfg.embed_scale is not None:
        hidden = g.op("Mul", [hidden, g.const(cfg.embed_scale, np.float32)])
    g.add_output("hidden", hidden, F32, ["batch", "tokens", cfg.hidden_size])
    return g.segment()


def head_model(cfg: ModelConfig, w: ModelWeights, precision: str = "fp32") -> SegmentModel:
    """hidden (B,T,H) -> logits (B,T,V): final RMSNorm and lm_head (tied or not)."""
    g = GraphBuilder("head")
    x = g.add_input("hidden", F32, ["batch", "tokens", cfg.hidden_size])
    h = rms_norm(g, x, g.init("model.norm.weight", w.get("model.norm.weight")), cfg.rms_norm_eps)
    w_name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    logits = g.op("MatMul", [h, g.init("lm_head", w.get_t(w_name))])  # as `linear`, one copy
    if cfg.final_softcap is not None:
        logits = softcap(g, logits, cfg.final_softcap)
    g.add_output("logits", logits, F32, ["batch", "tokens", cfg.vocab_size])
    return g.segment()
