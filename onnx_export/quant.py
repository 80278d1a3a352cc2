"""GGUF quantized blocks -> the weights onnxruntime's MatMulNBits holds, exactly (pure numpy).

MatMulNBits stores W[n, k] = (q - z) * s: unsigned `bits`-bit codes q, one scale s and one
zero point z per block of `block` (16 or 32) elements along K. With fp32 activations only
its 4-bit kernel is fast (8 and 2 bits: 15-30x slower here, onnxruntime 1.32); with int8
activations 4 and 8 bits are both fast. So every GGUF type becomes a `QMatrix`

    W = sum over parts p of (q_p - z_p) * s_p  +  o[n, k // block]

with 4-bit parts (or one 8-bit part where the caller allows it) and `o`, a constant per
block, for the block minimum of Q4_1, Q5_1, Q2_K, Q4_K and Q5_K (the graph adds it as
per-block sums of x times o). Codes wider than 4 bits split into a low and a high nibble:
two parts with scales s and 16 s / r (`Part.mult`, a power of two): the graph runs the high
part over x times that multiplier, exactly, so both parts read one array of scales.

Why it is exact: every type here decodes to integer codes c (at most 8 bits) times a block
scale that is an fp16 times an integer of at most 7 bits, so each (q - z) * s has at most
24 significant bits and is exact in fp32, as are gguf's own products. Types without a
block minimum are therefore bit for bit gguf's dequantization. With a minimum gguf rounds
once (d*q + m in fp32) where `QMatrix` keeps the two terms apart: equal whenever that sum is
representable, which `rounding_free` checks per tensor at export (no exception in either
real Qwen2.5 Q4_K_M file); `represented` evaluates a `QMatrix` exactly for the tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import IQ4_NL, Q4_K

QK_K = 256
_IQ4 = np.asarray(IQ4_NL.kvalues, np.int16)
ROWS_PER_CHUNK = 4096
"""Rows decoded at a time: bounds the int16 code buffer (a 151936 x 1536 table would
otherwise take 470 MB at once)."""


# ----------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Decoded:
    """Rows of a GGUF tensor as integers: value = codes * scales (+ offsets) per sub-block."""

    codes: np.ndarray  # (R, K) int16
    scales: np.ndarray  # (R, K // sub) float32
    offsets: np.ndarray | None  # (R, K // sub) float32, added to every element of the block


@dataclass(frozen=True)
class Layout:
    """What a GGUF type decodes to: `sub` elements per scale, codes in [lo, hi]."""

    sub: int
    lo: int
    hi: int
    has_offsets: bool
    decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray | None]]
    """(blocks, type_size) uint8 -> codes (blocks, elems), scales and offsets (blocks, subs)."""


def _f16(b: np.ndarray) -> np.ndarray:
    """Little-endian fp16 from two uint8 columns (…, 2) -> float32 (…)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nib(qs: np.ndarray) -> np.ndarray:
    """(B, 16) bytes -> (B, 32): element i in the low nibble of byte i, i + 16 in the high."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """(B, 4) bytes of a little-endian uint32 -> (B, 32) bits, bit i for element i."""
    word = np.ascontiguousarray(qh).view("<u4")  # (B, 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _shifts(x: np.ndarray, shape: tuple[int, ...], shifts: list[int], mask: int) -> np.ndarray:
    """Spread packed fields: x reshaped to `shape` (a size-1 axis where `shifts` go)."""
    s = np.asarray(shifts, dtype=x.dtype).reshape([1] * (len(shape) - 2) + [len(shifts), 1])
    return (x.reshape(shape) >> s) & mask


def _q4_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return _nib(b[:, 2:18]).astype(np.int16) - 8, _f16(b[:, 0:2])[:, None], None


def _q4_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return _nib(b[:, 4:20]).astype(np.int16), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q5_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    q = _nib(b[:, 6:22]) | (_bits32(b[:, 2:6]) << 4)
    return q.astype(np.int16) - 16, _f16(b[:, 0:2])[:, None], None


def _q5_1(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    q = _nib(b[:, 8:24]) | (_bits32(b[:, 4:8]) << 4)
    return q.astype(np.int16), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q8_0(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    q = np.ascontiguousarray(b[:, 2:34]).view(np.int8).astype(np.int16)
    return q, _f16(b[:, 0:2])[:, None], None


def _q2_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = b.shape[0]
    sc, d, dmin = b[:, 0:16], _f16(b[:, 80:82])[:, None], _f16(b[:, 82:84])[:, None]
    q = _shifts(b[:, 16:80], (n, 2, 1, 32), [0, 2, 4, 6], 3).reshape(n, QK_K)
    return q.astype(np.int16), d * (sc & 0x0F), -(dmin * (sc >> 4))


def _q3_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = b.shape[0]
    hmask, qs, packed, d = b[:, 0:32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = _shifts(packed[:, 0:8], (n, 1, 8), [0, 4], 0x0F).reshape(n, 16)
    high = _shifts(packed[:, 8:12], (n, 1, 4), [0, 2, 4, 6], 0x03).reshape(n, 16)
    sc = (low | (high << 4)).astype(np.int16) - 32
    ql = _shifts(qs, (n, 2, 1, 32), [0, 2, 4, 6], 3).reshape(n, QK_K)
    qh = _shifts(hmask, (n, 1, 1, 32), list(range(8)), 1).reshape(n, QK_K)
    q = ql.astype(np.int16) - ((qh ^ 1).astype(np.int16) << 2)  # the bit set means no -4
    return q, d[:, None] * sc, None


def _q4_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    q = _shifts(b[:, 16:144], (n, 4, 1, 32), [0, 4], 0x0F).reshape(n, QK_K)
    return q.astype(np.int16), d * sc, -(dmin * m)


def _q5_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]
    sc, m = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    ql = _shifts(b[:, 48:176], (n, 4, 1, 32), [0, 4], 0x0F).reshape(n, QK_K)
    qh = _shifts(b[:, 16:48], (n, 1, 1, 32), list(range(8)), 1).reshape(n, QK_K)
    return (ql | (qh << 4)).astype(np.int16), d * sc, -(dmin * m)


def _q6_k(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = b.shape[0]
    ql = _shifts(b[:, 0:128], (n, 2, 1, 64), [0, 4], 0x0F).reshape(n, QK_K)
    qh = _shifts(b[:, 128:192], (n, 2, 1, 32), [0, 2, 4, 6], 3).reshape(n, QK_K)
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    q = (ql | (qh << 4)).astype(np.int16) - 32
    return q, _f16(b[:, 208:210])[:, None] * sc, None


def _iq4_nl(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    return _IQ4[_nib(b[:, 2:18])], _f16(b[:, 0:2])[:, None], None


def _iq4_xs(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    n = b.shape[0]
    d = _f16(b[:, 0:2])[:, None]
    high = _shifts(
        np.ascontiguousarray(b[:, 2:4]).view("<u2"), (n, 1, 1), list(range(0, 16, 2)), 3
    ).reshape(n, 8)
    low = ((b[:, 4:8, None] >> np.array([0, 4], np.uint8)) & 0x0F).reshape(n, 8)
    ls = (low | (high.astype(np.uint8) << 4)).astype(np.int16) - 32
    q = _shifts(b[:, 8:136], (n, 8, 1, 16), [0, 4], 0x0F).reshape(n, QK_K)
    return _IQ4[q], d * ls, None


_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int16)


def _mxfp4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """gpt-oss's experts: an E8M0 exponent e and 32 E2M1 codes (low nibbles 0-15, high
    16-31); gguf's value is the doubled E2M1 value (an integer in [-12, 12]) times
    2^(e - 128), a power of two exact in fp32 for every e (2^-128 is subnormal)."""
    q = _shifts(b[:, 1:17], (b.shape[0], 1, 16), [0, 4], 0x0F).reshape(b.shape[0], 32)
    return _MXFP4[q], np.ldexp(np.float32(1), b[:, :1].astype(np.int32) - 128), None


LAYOUTS: dict[str, Layout] = {
    "Q4_0": Layout(32, -8, 7, False, _q4_0),
    "Q4_1": Layout(32, 0, 15, True, _q4_1),
    "Q5_0": Layout(32, -16, 15, False, _q5_0),
    "Q5_1": Layout(32, 0, 31, True, _q5_1),
    "Q8_0": Layout(32, -128, 127, False, _q8_0),
    "Q2_K": Layout(16, 0, 3, True, _q2_k),
    "Q3_K": Layout(16, -4, 3, False, _q3_k),
    "Q4_K": Layout(32, 0, 15, True, _q4_k),
    "Q5_K": Layout(32, 0, 31, True, _q5_k),
    "Q6_K": Layout(16, -32, 31, False, _q6_k),
    "IQ4_NL": Layout(32, -127, 113, False, _iq4_nl),
    "IQ4_XS": Layout(32, -127, 113, False, _iq4_xs),
    "MXFP4": Layout(32, -12, 12, False, _mxfp4),
}
"""Every GGUF type with an exact MatMulNBits form. IQ4_NL/IQ4_XS (a 16-entry codebook of
int8 values) are llama.cpp's fallback for K-quants on rows not a multiple of 256."""


def supported(qtype: str) -> bool:
    return qtype in LAYOUTS


def decode(qtype: str, data: np.ndarray, k: int) -> Decoded:
    """Rows of GGUF blocks (R, bytes per row) uint8 -> integer codes and block scales."""
    lay = LAYOUTS[qtype]
    elems, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    r = data.shape[0]
    if k % elems or data.shape[1] != k // elems * size:
        raise ValueError(f"{qtype}: {data.shape[1]} bytes per row do not hold {k} elements")
    codes, scales, offsets = lay.decode(np.ascontiguousarray(data).reshape(-1, size))
    subs = k // lay.sub
    return Decoded(
        codes.reshape(r, k),
        np.ascontiguousarray(scales, np.float32).reshape(r, subs),
        None if offsets is None else np.ascontiguousarray(offsets, np.float32).reshape(r, subs),
    )


# ----------------------------------------------------------------------------- MatMulNBits form


@dataclass(frozen=True)
class Part:
    """One MatMulNBits weight: codes in its packing, a scale and zero point per block."""

    bits: int  # 4 or 8
    block: int  # elements per scale along K: 16 or 32
    packed: np.ndarray  # (N, K // block, block * bits // 8) uint8, MatMulNBits' layout
    scales: np.ndarray  # (N, K // block) float32
    zero: int  # zero point of every block (8 or 128: MatMulNBits' default, no input needed)
    mult: int = 1  # scales are the GGUF's times this power of two (a high nibble's 16 / r)

    @property
    def default_zero(self) -> bool:
        return self.zero == 1 << (self.bits - 1)

    def codes(self) -> np.ndarray:
        """(N, K) uint8, unpacked."""
        n = self.packed.shape[0]
        if self.bits == 8:
            return self.packed.reshape(n, -1)
        return np.stack([self.packed & 0x0F, self.packed >> 4], axis=-1).reshape(n, -1)


@dataclass(frozen=True)
class QMatrix:
    """A `[N, K]` GGUF matrix as MatMulNBits parts plus an optional per-block offset."""

    qtype: str  # the GGUF type it came from
    n: int
    k: int
    parts: tuple[Part, ...]
    offsets: np.ndarray | None  # (N, K // offset_block) float32
    offset_block: int

    @property
    def nbytes(self) -> int:
        """Bytes of what the graph stores (codes, scales, offsets; zero points apart)."""
        own = sum(p.packed.nbytes + p.scales.nbytes for p in self.parts)
        return own + (0 if self.offsets is None else self.offsets.nbytes)

    @property
    def layout(self) -> tuple[tuple[tuple[int, int], ...], int | None]:
        """Matrices with equal layouts stack along N into one MatMulNBits (packed QKV)."""
        return (
            tuple((p.bits, p.block) for p in self.parts),
            None if self.offsets is None else self.offset_block,
        )


def pack4(q: np.ndarray) -> np.ndarray:
    """MatMulNBits 4-bit packing of (…, 2m) values 0..15: byte i = q[2i] | q[2i+1] << 4."""
    q = q.astype(np.uint8)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))


def _split(
    codes: np.ndarray, lo: int, hi: int, max_bits: int
) -> list[tuple[np.ndarray, int, int, int]]:
    """Codes in [lo, hi] -> [(unsigned codes, zero point, scale multiplier, bits)] summing
    to them.

    One 4-bit part when 16 values suffice, one 8-bit part when allowed, else the low and
    high nibbles l, h of u = c - lo. Preferably both with MatMulNBits' default zero point 8
    (no zero-point input): c = (l - 8) + (16 / r) (r h - z) with (16 / r) z = -lo - 8, the
    high part's codes r h shifted to the default (Q5_0, Q5_1, Q5_K: r = 2; Q6_K: r = 2).
    Otherwise (Q8_0, IQ4: -lo - 8 is no such multiple) c = (l - z_l) + 16 (h - z_h) with
    z_l + 16 z_h = -lo, a zero point shifted to the default where it fits.
    """
    span = hi - lo + 1
    if span <= 16 or (max_bits == 8 and span <= 256):
        bits = 4 if span <= 16 else 8
        mid = 1 << (bits - 1)
        z = mid if -mid <= lo and hi < mid else -lo
        return [((codes + z).astype(np.uint8), z, 1, bits)]
    if span > 256:
        raise ValueError(f"codes span {span} values: more than 8 bits")
    u = (codes - lo).astype(np.uint8)
    low, high, top = u & 0x0F, u >> 4, (span - 1) >> 4
    for r in (1, 2, 4, 8):
        z, rest = divmod((-lo - 8) * r, 16)
        shift = 8 - z
        if top * r + max(shift, 0) > 15:
            break
        if rest == 0 and shift >= 0:
            return [(low, 8, 1, 4), (high * np.uint8(r) + np.uint8(shift), 8, 16 // r, 4)]
    out = []
    for q, z, mult, qmax in ((low, -lo & 0x0F, 1, 15), (high, -lo >> 4, 16, top)):
        shift = 8 - z
        if shift >= 0 and qmax + shift <= 15:  # the default zero point fits: no zp input
            q, z = q + np.uint8(shift), 8
        out.append((q, z, mult, 4))
    return out


class NoExactForm(Exception):
    """A tensor with no exact MatMulNBits form: its type cannot be read, or its values are
    not integers times a block scale."""


def to_nbits(qtype: str, data: np.ndarray, k: int, max_bits: int = 4) -> QMatrix:
    """GGUF rows (N, bytes per row) -> `QMatrix`; `max_bits` 4 (fp32 activations) or 8.

    Types of `LAYOUTS` are decoded from their blocks. With a block minimum, codes are
    centred (c - mid, offset o + mid * s): the same matrix, but parts with weights around
    zero, so int8 activation rounding errs less (SmolLM2's int8 teacher-forced agreement:
    0.969 centred, 0.932 not) and the default zero point serves. Centring needs o + mid * s
    exact in fp32 (always so in both real Qwen files and SmolLM2); a matrix where it is not
    keeps uncentred codes.

    Other types gguf can read (IQ1-IQ3, TQ1_0/TQ2_0: codebooks of small integers)
    get the nearest exact wider form, Q8_0's: 8-bit codes times one scale per block of 32
    (else 16) found in gguf's own values (`reencode`). NoExactForm when neither works.
    """
    if max_bits not in (4, 8):
        raise ValueError(f"max_bits must be 4 or 8, not {max_bits}")
    n = data.shape[0]
    if qtype in LAYOUTS:
        lay = LAYOUTS[qtype]

        def dec(rows: slice) -> Decoded:
            return decode(qtype, data[rows], k)

        if lay.has_offsets:
            try:
                return _to_nbits(qtype, n, k, dec, lay, max_bits, centre=True)
            except _InexactOffset:
                pass
        return _to_nbits(qtype, n, k, dec, lay, max_bits, centre=False)
    for block in (32, 16):
        lay = Layout(block, -128, 127, False, _q8_0)

        def redo(rows: slice, block: int = block) -> Decoded:
            return reencode(qtype, data[rows], k, block)

        try:
            return _to_nbits(qtype, n, k, redo, lay, max_bits, centre=False)
        except _NotIntegral:
            continue
    raise NoExactForm(f"{qtype}: values are not 8-bit integers times a scale per 16 or 32")


class _InexactOffset(Exception):
    """A centred block minimum o + mid * s is not exact in fp32."""


class _NotIntegral(Exception):
    """A block of gguf's values is no int8 multiple of one scale."""


def reencode(qtype: str, data: np.ndarray, k: int, block: int) -> Decoded:
    """gguf's values of rows of any type it reads, as int8 codes times one fp32 scale per
    `block`: per block, scale = (smallest nonzero |value|) / j for the first j in 1..127
    that makes every value an integer of at most 127 in magnitude and code * scale equal
    to the value exactly (checked in float64). _NotIntegral if a block has none."""
    try:
        v = quants.dequantize(data, GGMLQuantizationType[qtype])
    except (NotImplementedError, KeyError) as exc:
        raise NoExactForm(f"{qtype}: gguf cannot dequantize it ({exc})") from None
    blocks = v.reshape(-1, block).astype(np.float32)
    if not np.isfinite(blocks).all():
        raise NoExactForm(f"{qtype}: values that are not finite")
    mag = np.abs(blocks)
    smallest = np.where(mag > 0, mag, np.inf).min(-1)
    smallest[~np.isfinite(smallest)] = 1.0  # an all-zero block: any scale
    codes = np.zeros(blocks.shape, np.int16)
    scales = np.zeros(len(blocks), np.float32)
    todo = np.arange(len(blocks))
    for j in range(1, 128):
        s = (smallest[todo] / np.float32(j)).astype(np.float32)
        c = np.rint(blocks[todo] / s[:, None])
        fits = (np.abs(c) <= 127).all(-1) & (
            c * s[:, None].astype(np.float64) == blocks[todo].astype(np.float64)
        ).all(-1)
        done = todo[fits]
        codes[done], scales[done] = c[fits], s[fits]
        todo = todo[~fits]
        if not len(todo):
            rows = data.shape[0]
            return Decoded(codes.reshape(rows, k), scales.reshape(rows, k // block), None)
    raise _NotIntegral


def _to_nbits(
    qtype: str,
    n: int,
    k: int,
    dec: Callable[[slice], Decoded],
    lay: Layout,
    max_bits: int,
    centre: bool,
) -> QMatrix:
    mid = (lay.lo + lay.hi + 1) // 2 if centre else 0
    # Filled chunk by chunk in place: concatenating the chunks at the end held every table
    # twice (Qwen2.5's 151936-row embedding and head: +153 MB of export peak each).
    parts: list[Part] = []
    offsets: np.ndarray | None = None
    for rows in _row_chunks(n):
        d = dec(rows)
        split = _split(d.codes - mid, lay.lo - mid, lay.hi - mid, max_bits)
        for j, (q, z, mult, bits) in enumerate(split):
            blocks = q.reshape(q.shape[0], k // lay.sub, lay.sub)
            packed = np.ascontiguousarray(blocks) if bits == 8 else pack4(blocks)
            if len(parts) == j:
                parts.append(
                    Part(
                        bits=bits,
                        block=lay.sub,
                        packed=np.empty((n, *packed.shape[1:]), np.uint8),
                        scales=np.empty((n, k // lay.sub), np.float32),
                        zero=z,
                        mult=mult,
                    )
                )
            parts[j].packed[rows] = packed
            parts[j].scales[rows] = d.scales * np.float32(mult)
        if d.offsets is not None:
            exact = d.offsets.astype(np.float64) + mid * d.scales.astype(np.float64)
            off = exact.astype(np.float32)
            if not np.array_equal(off, exact):
                raise _InexactOffset
            if offsets is None:
                offsets = np.empty((n, k // lay.sub), np.float32)
            offsets[rows] = off
    return QMatrix(qtype, n, k, tuple(parts), offsets, lay.sub)


def _row_chunks(n: int) -> Iterator[slice]:
    for a in range(0, n, ROWS_PER_CHUNK):
        yield slice(a, min(n, a + ROWS_PER_CHUNK))


# ----------------------------------------------------------------------------- exactness


def represented(qm: QMatrix, rows: slice | None = None) -> np.ndarray:
    """The `[N, K]` matrix a `QMatrix` holds, evaluated exactly in float64: every term has
    at most 24 significant bits, so sums of two or three stay exact unless their magnitudes
    differ by over 2^28 (then a block minimum of 1e-9 beside weights of 1: not seen)."""
    rows = rows or slice(0, qm.n)
    out: np.ndarray | None = None
    for p in qm.parts:
        q = Part(p.bits, p.block, p.packed[rows], p.scales[rows], p.zero).codes()
        c = (q.astype(np.float64) - p.zero).reshape(q.shape[0], -1, p.block)
        term = (c * p.scales[rows].astype(np.float64)[..., None]).reshape(q.shape[0], -1)
        out = term if out is None else out + term
    assert out is not None
    if qm.offsets is not None:
        off = np.repeat(qm.offsets[rows].astype(np.float64), qm.offset_block, axis=1)
        out = out + off
    return out


def products_exact(qm: QMatrix, rows: slice | None = None) -> bool:
    """Whether every (q - z) * s of every part is exact in fp32, as the kernel computes it."""
    rows = rows or slice(0, qm.n)
    for p in qm.parts:
        q = Part(p.bits, p.block, p.packed[rows], p.scales[rows], p.zero).codes()
        c = (q.astype(np.int16) - p.zero).reshape(q.shape[0], -1, p.block)
        s = p.scales[rows][..., None]
        if not np.array_equal(
            (c.astype(np.float32) * s).astype(np.float64), c * s.astype(np.float64)
        ):
            return False
    return True


def rounding_free(qm: QMatrix) -> bool:
    """Whether gguf's fp32 dequantization of every element equals the exact value `qm` holds.

    Only a block minimum can make them differ (gguf rounds d*q + m once in fp32); without
    one, `represented` is gguf's value by construction. Checked per row chunk at export.
    """
    if qm.offsets is None:
        return True
    for rows in _row_chunks(qm.n):
        v = represented(qm, rows)
        if not np.array_equal(v.astype(np.float32).astype(np.float64), v):
            return False
    return True
