"""Wire format: one msgpack map per message, a small versioned header plus a body.

Arrays travel as ``{"dt": dtype, "sh": shape, "b": raw little-endian C-order bytes}`` and
come back as read-only ``np.frombuffer`` views; every failure surfaces as ``CodecError``.

Layout of a message (top-level msgpack map, no other keys allowed)::

    {"v": 1, "k": kind, "rid": request id | None, "seq": int, "pv": plan version,
     "b": {field name: value, ...}}

Field values are checked against the field's declared Python type by converters compiled
once per message class (``compile_type``), so validation is generic, not per class.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import msgpack
import numpy as np

from e2llm_edge.errors import CodecError

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
"""Default cap on one encoded message, enforced by encoder and decoder alike."""

ARRAY_DTYPES = frozenset({"float32", "float16", "int64", "int32", "uint8", "bool"})
"""The only dtypes that may cross the wire."""

MAX_ARRAY_RANK = 8
MAX_NESTING = 32
_HEADER_KEYS = frozenset({"v", "k", "rid", "seq", "pv", "b"})
_ARRAY_KEYS = frozenset({"dt", "sh", "b"})
_U64_MAX = 2**64 - 1
_I64_MIN = -(2**63)


@dataclass(frozen=True)
class Header:
    """The part of a message every receiver reads before the body."""

    kind: int
    request_id: str | None
    seq: int
    plan_version: int
    version: int = WIRE_VERSION


@dataclass(frozen=True)
class ArraySpec:
    """Declares an ndarray field: allowed dtypes and rank (``None`` means any)."""

    dtypes: frozenset[str] = ARRAY_DTYPES
    rank: int | None = None

    def __post_init__(self) -> None:
        unknown = self.dtypes - ARRAY_DTYPES
        if unknown:
            raise ValueError(f"dtypes not allowed on the wire: {sorted(unknown)}")


def array(*dtypes: str, rank: int | None = None) -> ArraySpec:
    """Shorthand for ``Annotated[np.ndarray, array("float32", rank=3)]``."""
    return ArraySpec(frozenset(dtypes) if dtypes else ARRAY_DTYPES, rank)


# --------------------------------------------------------------------------- framing


def pack(header: Header, body: Mapping[str, Any], *, max_bytes: int | None = None) -> bytes:
    """Frame an already-converted body; raise CodecError if it exceeds ``max_bytes``."""
    limit = MAX_MESSAGE_BYTES if max_bytes is None else max_bytes
    obj = {
        "v": header.version,
        "k": header.kind,
        "rid": header.request_id,
        "seq": header.seq,
        "pv": header.plan_version,
        "b": body,
    }
    try:
        data: bytes = msgpack.packb(obj, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CodecError(
            "payload", f"cannot pack: {exc}", request_id=header.request_id, kind=header.kind
        ) from None
    if len(data) > limit:
        raise CodecError(
            "payload",
            f"encoded size {len(data)} B exceeds limit {limit} B",
            request_id=header.request_id,
            kind=header.kind,
        )
    return data


def unpack(
    data: bytes | bytearray | memoryview, *, max_bytes: int | None = None
) -> tuple[Header, dict[str, Any]]:
    """Parse the framing and header; the body comes back unconverted (field -> wire value)."""
    limit = MAX_MESSAGE_BYTES if max_bytes is None else max_bytes
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError("payload", f"expected bytes, got {type(data).__name__}")
    if len(data) > limit:
        raise CodecError("payload", f"size {len(data)} B exceeds limit {limit} B")
    try:
        # timestamp=0 keeps the timestamp extension as an ExtType, which validation rejects.
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True, timestamp=0)
    except Exception as exc:  # msgpack raises a zoo of types on malformed input
        raise CodecError(
            "payload", f"not a msgpack message ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(obj, dict):
        raise CodecError("payload", f"expected a map, got {_wire_type(obj)}")
    # best effort, so that even a wrong-version message can be answered with an error
    hint = obj.get("rid") if type(obj.get("rid")) is str else None
    version = obj.get("v")
    if type(version) is not int:
        raise CodecError("header.v", f"expected int, got {_wire_type(version)}", request_id=hint)
    if version != WIRE_VERSION:
        raise CodecError(
            "header.v",
            f"version {version} not supported (expected {WIRE_VERSION})",
            request_id=hint,
        )
    kind = obj.get("k")
    if type(kind) is not int:
        raise CodecError("header.k", f"expected int, got {_wire_type(kind)}")
    rid = obj.get("rid")
    if rid is not None and type(rid) is not str:
        raise CodecError("header.rid", f"expected str or nil, got {_wire_type(rid)}", kind=kind)
    extra = set(obj) - _HEADER_KEYS
    missing = _HEADER_KEYS - set(obj)
    if extra or missing:
        raise CodecError("header", key_diff(missing, extra), request_id=rid, kind=kind)
    for key, name in (("seq", "seq"), ("pv", "pv")):
        value = obj[key]
        if type(value) is not int or not 0 <= value <= _U64_MAX:
            raise CodecError(
                f"header.{name}",
                f"expected non-negative int, got {value!r:.40}",
                request_id=rid,
                kind=kind,
            )
    body = obj["b"]
    if not isinstance(body, dict):
        raise CodecError(
            "body", f"expected a map, got {_wire_type(body)}", request_id=rid, kind=kind
        )
    return Header(kind=kind, request_id=rid, seq=obj["seq"], plan_version=obj["pv"]), body


# --------------------------------------------------------------------------- arrays


def encode_array(value: Any, field: str, spec: ArraySpec) -> dict[str, Any]:
    """ndarray -> wire map; the bytes are little-endian C order."""
    if not isinstance(value, np.ndarray):
        raise CodecError(field, f"expected ndarray, got {type(value).__name__}")
    dtype_name = value.dtype.name
    if dtype_name not in spec.dtypes:
        raise CodecError(
            field, f"dtype {dtype_name} not allowed (allowed: {', '.join(sorted(spec.dtypes))})"
        )
    if spec.rank is not None and value.ndim != spec.rank:
        raise CodecError(field, f"expected rank {spec.rank}, got shape {list(value.shape)}")
    little = value.dtype.newbyteorder("<")
    arr = np.ascontiguousarray(value, dtype=little)
    # memoryview avoids one copy; it cannot view zero-size arrays.
    raw: bytes | memoryview = arr.data.cast("B") if arr.size else b""
    return {"dt": dtype_name, "sh": list(arr.shape), "b": raw}


def decode_array(obj: Any, field: str, spec: ArraySpec) -> np.ndarray:
    """Wire map -> read-only ndarray viewing the message's bytes (no copy)."""
    if not isinstance(obj, dict):
        raise CodecError(field, f"expected an array map, got {_wire_type(obj)}")
    if set(obj) != _ARRAY_KEYS:
        raise CodecError(
            field, "array map " + key_diff(_ARRAY_KEYS - set(obj), set(obj) - _ARRAY_KEYS)
        )
    dt, shape, raw = obj["dt"], obj["sh"], obj["b"]
    if type(dt) is not str or dt not in spec.dtypes:
        raise CodecError(
            field, f"dtype {dt!r:.40} not allowed (allowed: {', '.join(sorted(spec.dtypes))})"
        )
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_ARRAY_RANK
        or not all(type(d) is int and d >= 0 for d in shape)
    ):
        raise CodecError(
            field,
            f"shape {shape!r:.60} is not a list of non-negative ints (rank <= {MAX_ARRAY_RANK})",
        )
    if spec.rank is not None and len(shape) != spec.rank:
        raise CodecError(field, f"expected rank {spec.rank}, got shape {shape}")
    if not isinstance(raw, bytes):
        raise CodecError(field, f"array bytes must be bin, got {_wire_type(raw)}")
    dtype = np.dtype(dt).newbyteorder("<")
    n = math.prod(shape)
    if n * dtype.itemsize != len(raw):
        held = f"{len(raw) / dtype.itemsize:g}" if dtype.itemsize > 1 else str(len(raw))
        raise CodecError(field, f"shape {shape} has {n} elements, bytes hold {held}")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape)
    if dtype.byteorder not in ("=", "|") and not np.little_endian:  # pragma: no cover
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


# --------------------------------------------------------------------------- field types

Encoder = Callable[[Any, str], Any]
Decoder = Callable[[Any, str], Any]


@dataclass(frozen=True)
class Converter:
    """Checks and converts one declared type to and from its wire form."""

    describe: str
    to_wire: Encoder
    from_wire: Decoder


def compile_type(tp: Any) -> Converter:
    """Build the converter for a field annotation (evaluated, not a string).

    Besides scalars, arrays, Literal, unions, lists, tuples and maps, a field may be a
    frozen dataclass (a nested struct, converted field by field, its constructor's own
    checks run on decode), an Enum (travels as its value), or a NewType of any of these.
    """
    supertype = getattr(tp, "__supertype__", None)
    if supertype is not None:  # typing.NewType: an id with a name, the same on the wire
        return compile_type(supertype)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return _plain_converter("any data")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return _enum_converter(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _struct_converter(tp)
    if tp is int:
        return Converter("int", _check_int, _check_int)
    if tp is float:
        return Converter("float", _check_float, _check_float)
    if tp is str:
        return Converter("str", _check_exact(str), _check_exact(str))
    if tp is bool:
        return Converter("bool", _check_exact(bool), _check_exact(bool))
    if tp is type(None):
        return Converter("nil", _check_exact(type(None)), _check_exact(type(None)))
    if origin is Annotated:
        base, *meta = args
        specs = [m for m in meta if isinstance(m, ArraySpec)]
        if base is not np.ndarray or len(specs) != 1:
            raise TypeError(f"unsupported annotation {tp!r}")
        spec = specs[0]
        return Converter(
            f"ndarray{sorted(spec.dtypes)} rank {spec.rank}",
            lambda v, f: encode_array(v, f, spec),
            lambda v, f: decode_array(v, f, spec),
        )
    if origin is Literal:
        return _literal_converter(args)
    if origin in (Union, types.UnionType):
        return _union_converter([compile_type(a) for a in args])
    if origin is list:
        return _list_converter(compile_type(args[0]))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _list_converter(compile_type(args[0]), as_tuple=True)
        return _fixed_tuple_converter([compile_type(a) for a in args])
    if origin is dict:
        if args and args[0] is not str:
            raise TypeError(f"dict keys must be str: {tp!r}")
        if args and args[1] is not Any:
            return _map_converter(compile_type(args[1]))
        return _plain_converter("map")
    raise TypeError(f"unsupported field type {tp!r}")


_STRUCTS: dict[type, Converter] = {}


def _struct_converter(cls: type) -> Converter:
    """A dataclass as a map of exactly its fields; decoding calls the constructor, so the
    struct's own invariants (``__post_init__``) are checked on every message received."""
    if cls in _STRUCTS:
        return _STRUCTS[cls]
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = [(f.name, compile_type(hints[f.name])) for f in dataclasses.fields(cls) if f.init]
    names = frozenset(n for n, _ in fields)

    def to_wire(value: Any, field: str) -> dict[str, Any]:
        if not isinstance(value, cls):
            raise CodecError(field, f"expected {cls.__name__}, got {_wire_type(value)}")
        return {n: conv.to_wire(getattr(value, n), f"{field}.{n}") for n, conv in fields}

    def from_wire(value: Any, field: str) -> Any:
        if not isinstance(value, dict):
            raise CodecError(field, f"expected a {cls.__name__} map, got {_wire_type(value)}")
        if set(value) != names:
            raise CodecError(field, key_diff(names - set(value), set(value) - names))
        kwargs = {n: conv.from_wire(value[n], f"{field}.{n}") for n, conv in fields}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as exc:
            raise CodecError(field, str(exc)) from None

    conv = Converter(cls.__name__, to_wire, from_wire)
    _STRUCTS[cls] = conv
    return conv


def _enum_converter(cls: type[enum.Enum]) -> Converter:
    values = {m.value: m for m in cls}
    describe = f"{cls.__name__} ({', '.join(repr(v) for v in values)})"

    def to_wire(value: Any, field: str) -> Any:
        if not isinstance(value, cls):
            raise CodecError(field, f"expected {describe}, got {value!r:.40}")
        return value.value

    def from_wire(value: Any, field: str) -> Any:
        member = values.get(value) if type(value) in (str, int) else None
        if member is None or type(value) is not type(member.value):
            raise CodecError(field, f"{value!r:.40} is not one of {describe}")
        return member

    return Converter(describe, to_wire, from_wire)


def _map_converter(item: Converter) -> Converter:
    def convert(value: Any, field: str, use_encoder: bool) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise CodecError(field, f"expected map of {item.describe}, got {_wire_type(value)}")
        out = {}
        for k, v in value.items():
            if type(k) is not str:
                raise CodecError(field, f"map keys must be str, got {_wire_type(k)}")
            out[k] = (item.to_wire if use_encoder else item.from_wire)(v, f"{field}.{k}")
        return out

    return Converter(
        f"map[str, {item.describe}]",
        lambda v, f: convert(v, f, True),
        lambda v, f: convert(v, f, False),
    )


def _check_int(value: Any, field: str) -> int:
    if type(value) is not int and not isinstance(value, np.integer):
        raise CodecError(field, f"expected int, got {_wire_type(value)}")
    value = int(value)
    if not _I64_MIN <= value <= _U64_MAX:
        raise CodecError(field, f"int {value} out of 64-bit range")
    return value


def _check_float(value: Any, field: str) -> float:
    if type(value) is bool or not isinstance(value, int | float | np.floating | np.integer):
        raise CodecError(field, f"expected float, got {_wire_type(value)}")
    if isinstance(value, int) and not _I64_MIN <= value <= _U64_MAX:
        raise CodecError(field, f"number {value} out of range")
    return float(value)


def _check_exact(tp: type) -> Encoder:
    def check(value: Any, field: str) -> Any:
        if type(value) is not tp:
            raise CodecError(field, f"expected {_type_name(tp)}, got {_wire_type(value)}")
        return value

    return check


def _literal_converter(choices: tuple[Any, ...]) -> Converter:
    def check(value: Any, field: str) -> Any:
        if not any(type(value) is type(c) and value == c for c in choices):
            raise CodecError(field, f"{value!r:.40} is not one of {list(choices)}")
        return value

    return Converter(" | ".join(repr(c) for c in choices), check, check)


def _union_converter(options: list[Converter]) -> Converter:
    describe = " | ".join(o.describe for o in options)
    some = [o for o in options if o.describe != "nil"]

    def attempt(value: Any, field: str, use_encoder: bool) -> Any:
        if value is not None and len(some) == 1:  # `X | None` with a value: X's own error
            return some[0].to_wire(value, field) if use_encoder else some[0].from_wire(value, field)
        for opt in options:
            try:
                return opt.to_wire(value, field) if use_encoder else opt.from_wire(value, field)
            except CodecError:
                continue
        raise CodecError(field, f"expected {describe}, got {_wire_type(value)}")

    return Converter(describe, lambda v, f: attempt(v, f, True), lambda v, f: attempt(v, f, False))


def _list_converter(item: Converter, as_tuple: bool = False) -> Converter:
    def to_wire(value: Any, field: str) -> list[Any]:
        if not isinstance(value, list | tuple):
            raise CodecError(field, f"expected list of {item.describe}, got {_wire_type(value)}")
        return [item.to_wire(v, f"{field}[{i}]") for i, v in enumerate(value)]

    def from_wire(value: Any, field: str) -> Any:
        if not isinstance(value, list):
            raise CodecError(field, f"expected list of {item.describe}, got {_wire_type(value)}")
        out = [item.from_wire(v, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if as_tuple else out

    return Converter(f"list[{item.describe}]", to_wire, from_wire)


def _fixed_tuple_converter(items: list[Converter]) -> Converter:
    describe = f"[{', '.join(i.describe for i in items)}]"

    def convert(value: Any, field: str, use_encoder: bool) -> Any:
        if not isinstance(value, list | tuple) or len(value) != len(items):
            raise CodecError(field, f"expected {describe}, got {value!r:.60}")
        out = tuple(
            (c.to_wire if use_encoder else c.from_wire)(v, f"{field}[{i}]")
            for i, (c, v) in enumerate(zip(items, value, strict=True))
        )
        return list(out) if use_encoder else out

    return Converter(describe, lambda v, f: convert(v, f, True), lambda v, f: convert(v, f, False))


def _plain_converter(describe: str) -> Converter:
    """Free-form data (dicts of settings, stats, plans): msgpack-native types only."""
    want_map = describe == "map"

    def check(value: Any, field: str) -> Any:
        if want_map and not isinstance(value, dict):
            raise CodecError(field, f"expected map, got {_wire_type(value)}")
        _check_plain(value, field, 0)
        return value

    return Converter(describe, check, check)


def _check_plain(value: Any, field: str, depth: int) -> None:
    if depth > MAX_NESTING:
        raise CodecError(field, f"nested deeper than {MAX_NESTING}")
    if value is None or type(value) in (bool, str, bytes, float):
        return
    if type(value) is int:
        if not _I64_MIN <= value <= _U64_MAX:
            raise CodecError(field, f"int {value} out of 64-bit range")
        return
    if isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_plain(v, f"{field}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if type(k) is not str:
                raise CodecError(field, f"map keys must be str, got {_wire_type(k)}")
            _check_plain(v, f"{field}.{k}", depth + 1)
        return
    raise CodecError(field, f"{_wire_type(value)} is not plain data (use an array field)")


def check_header_int(value: Any, field: str) -> int:
    """Header integers (seq, plan version) are non-negative and fit in 64 bits."""
    if type(value) is not int or not 0 <= value <= _U64_MAX:
        raise CodecError(field, f"expected non-negative int, got {value!r:.40}")
    return value


def key_diff(missing: set[str] | frozenset[str], extra: set[Any] | frozenset[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {sorted(missing)}")
    if extra:
        parts.append(f"unexpected {sorted(str(e)[:40] for e in extra)}")
    return "; ".join(parts)


def _type_name(tp: type) -> str:
    return "nil" if tp is type(None) else tp.__name__


def _wire_type(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, msgpack.ExtType):
        return f"ext type {value.code}"
    return type(value).__name__
