"""The control channel's wire format: msgpack maps with a "type" key, never pickle.

Every incoming frame is parsed by `decode`, which checks types and ranges field by field and
raises `MessageError` on anything unexpected; the caller answers that with an `Error` reply.

Sender → receiver: `Hello`, `Begin`, `Chunk`, `Ping`, `Cancel`.
Receiver → sender: `Welcome`, `Done`, `Error`.
"""
from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Union

import msgpack
import torch

PROTOCOL_VERSION = 1
MAX_ID_LEN = 256
MAX_REASON_LEN = 2048
_INT_MAX = (1 << 62)

WIRE_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int8", "uint8",
                 "float8_e4m3fn", "float8_e5m2")
    if hasattr(torch, name)
}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise ValueError(f"dtype {dtype} cannot be transferred; supported: {sorted(WIRE_DTYPES)}")
    return name


class MessageError(ValueError):
    """An incoming control message is malformed."""


@dataclass(frozen=True)
class Hello:
    sender_id: str
    version: int = PROTOCOL_VERSION


@dataclass(frozen=True)
class Welcome:
    receiver_id: str
    store_port: int
    epoch: int


@dataclass(frozen=True)
class Begin:
    """Opens a transfer: which registered request, into which receiver blocks and heads, in what
    layout. With tensor parallelism one request's heads come from several senders, each opening
    its own transfer of one part (a contiguous head range) of it."""
    request_id: str
    epoch: int
    dst_block_ids: list[int]
    num_layers: int
    dtype: str
    block_shape: list[int]  # what is sent: [block_size, heads in this part, head_dim]
    # An FP8 cache's dequantization scales, k0, v0, k1, v1, ... (one pair per layer); empty for a
    # 16/32-bit cache. Blocks written with other scales would decode to other values.
    kv_scales: list[float] = field(default_factory=list)
    # The receiver-local head where this part starts (0: the first; the part is
    # [head_start, head_start + block_shape[1]) of the receiver's cache).
    head_start: int = 0


@dataclass(frozen=True)
class Chunk:
    """Announces one data message: the next send on the pair carries these bytes, tag = seq."""
    request_id: str
    epoch: int
    seq: int
    layer_start: int
    layer_end: int
    nbytes: int
    dtype: str
    shape: list[int]  # [layers, 2, num_blocks, block_size, heads in the part, head_dim]


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class Cancel:
    request_id: str
    reason: str


@dataclass(frozen=True)
class Done:
    request_id: str


@dataclass(frozen=True)
class Error:
    request_id: str | None
    reason: str


Message = Union[Hello, Welcome, Begin, Chunk, Ping, Cancel, Done, Error]
_TYPES: dict[str, type] = {cls.__name__.lower(): cls for cls in (Hello, Welcome, Begin, Chunk, Ping, Cancel, Done, Error)}


def encode(msg: Message) -> bytes:
    kind = type(msg).__name__.lower()
    body: dict[str, Any] = {"type": kind}
    for f in fields(msg):
        value = getattr(msg, f.name)
        if (kind, f.name) in _OPTIONAL and value == _default(f):
            continue  # left out at its default, so a peer that predates the field still reads it
        body[f.name] = value
    return msgpack.packb(body, use_bin_type=True)


def _default(f):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def decode(frame: bytes) -> Message:
    try:
        body = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MessageError(f"not a msgpack message: {type(exc).__name__}") from None
    if not isinstance(body, dict):
        raise MessageError(f"message must be a map, got {type(body).__name__}")
    kind = body.get("type")
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {kind!r}")
    names = {f.name for f in fields(cls)}
    extra = set(body) - names - {"type"}
    if extra:
        raise MessageError(f"{kind}: unexpected fields {sorted(extra)}")
    values = {}
    for name in names:
        if name not in body and (kind, name) in _OPTIONAL:
            continue  # the dataclass default
        if name not in body:
            raise MessageError(f"{kind}: missing field {name!r}")
        values[name] = _check(kind, name, body[name])
    return cls(**values)


def _check(kind: str, name: str, value: Any) -> Any:
    if value is None and (kind, name) in _NULLABLE:
        return None
    check = _FIELD_CHECKS[name]
    try:
        return check(value)
    except MessageError as exc:
        raise MessageError(f"{kind}.{name}: {exc}") from None


def _int(lo: int, hi: int = _INT_MAX):
    def check(v: Any) -> int:
        if type(v) is not int:
            raise MessageError(f"expected int, got {type(v).__name__}")
        if not lo <= v <= hi:
            raise MessageError(f"{v} out of range [{lo}, {hi}]")
        return v
    return check


def _str(max_len: int):
    def check(v: Any) -> str:
        if not isinstance(v, str):
            raise MessageError(f"expected str, got {type(v).__name__}")
        if not 0 < len(v) <= max_len:
            raise MessageError(f"length {len(v)} not in [1, {max_len}]")
        return v
    return check


def _int_list(min_len: int, max_len: int, lo: int, hi: int = _INT_MAX):
    item = _int(lo, hi)
    def check(v: Any) -> list[int]:
        if not isinstance(v, list):
            raise MessageError(f"expected list, got {type(v).__name__}")
        if not min_len <= len(v) <= max_len:
            raise MessageError(f"length {len(v)} not in [{min_len}, {max_len}]")
        return [item(x) for x in v]
    return check


def _scales(v: Any) -> list[float]:
    if not isinstance(v, list):
        raise MessageError(f"expected list, got {type(v).__name__}")
    if len(v) > 2 * (1 << 16):
        raise MessageError(f"length {len(v)} not in [0, {2 * (1 << 16)}]")
    for x in v:
        if type(x) is not float or not math.isfinite(x) or x <= 0:
            raise MessageError(f"expected finite positive floats, got {x!r}")
    return v


def _dtype(v: Any) -> str:
    if not isinstance(v, str) or v not in WIRE_DTYPES:
        raise MessageError(f"unsupported dtype {v!r}")
    return v


# Fields added after version 1: a peer that predates them omits them (and gets the default).
_OPTIONAL = {("begin", "kv_scales"), ("begin", "head_start")}

# An Error reply may name no request (e.g. it answers a frame that could not be parsed).
_NULLABLE = {("error", "request_id")}

_FIELD_CHECKS = {
    "sender_id": _str(128),
    "receiver_id": _str(128),
    "version": _int(1, 1 << 16),
    "store_port": _int(1, 65535),
    "epoch": _int(0),
    "request_id": _str(MAX_ID_LEN),
    "dst_block_ids": _int_list(1, 1 << 24, 0),
    "num_layers": _int(1, 1 << 16),
    "dtype": _dtype,
    "block_shape": _int_list(3, 3, 1, 1 << 20),
    "kv_scales": _scales,
    "head_start": _int(0, 1 << 20),
    "seq": _int(0),
    "layer_start": _int(0, 1 << 16),
    "layer_end": _int(1, 1 << 16),
    "nbytes": _int(1),
    "shape": _int_list(6, 6, 1, 1 << 30),
    "reason": _str(MAX_REASON_LEN),
}

