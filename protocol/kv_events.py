"""KV events: what a worker tells the router about its prefix cache, and their wire form.

The one vocabulary of prefix-cache events: the block manager records them, an expert-parallel
group merges its ranks' events in it, the worker publishes them and the router's prefix index
applies them. Blocks are named by the hash chain in `protocol/prefix_hash.py`. In order:
`BlocksStored` when full blocks enter a prefix cache, `BlocksRemoved` when they are evicted, and
`AllBlocksCleared` when the cache is reset (engine restart). An event says nothing of whose cache
it is: a worker's events travel in a `KVEventBatch` naming the replica and carrying a per-replica
sequence number, so the consumer can see a gap or a restart and drop that replica's view (losing
the view costs hit rate, never correctness).

Tiers. A worker's prefix cache has up to two tiers (`Tier`): the device pool the model reads
(`GPU`, also on CPU devices: the pool the forward pass uses) and the host-memory pool that
evicted blocks spill to (`HOST`, `engine/host_tier.py`). `BlocksStored` / `BlocksRemoved` name
their tier; a block may be in both at once, and each tier's events are consistent on their own
(a block enters and leaves each tier once per stay). `AllBlocksCleared` empties every tier.

The wire form is msgpack over plain lists: never pickle across processes. `decode_batch`
validates every field, since the bytes come from another process. A GPU event's wire form is
what it was before tiers existed (the tier is written only when it is `HOST`), so old and new
peers read each other's GPU events.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import msgpack

_U64_MAX = (1 << 64) - 1

_STORED = "stored"
_REMOVED = "removed"
_CLEARED = "cleared"


class Tier(str, enum.Enum):
    """Which pool of a worker's prefix cache an event is about."""

    GPU = "gpu"  # the device pool the forward pass reads (a GPU hit costs nothing)
    HOST = "host"  # host memory: a hit is copied back to the device pool before use


@dataclass(frozen=True, slots=True)
class BlocksStored:
    """Full blocks entered one tier of the prefix cache, in chain order.

    `parent_hash` is the hash of the block before `block_hashes[0]`, or None when
    `block_hashes[0]` is a sequence's first block (the parent may be held in another tier).
    """

    block_hashes: list[int]
    parent_hash: int | None
    tier: Tier = Tier.GPU


@dataclass(frozen=True, slots=True)
class BlocksRemoved:
    """Blocks left one tier of the prefix cache (any order)."""

    block_hashes: list[int]
    tier: Tier = Tier.GPU


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every tier of the prefix cache is empty (restart, reset)."""


KVEvent = BlocksStored | BlocksRemoved | AllBlocksCleared
_TIER_VALUES = frozenset(t.value for t in Tier)


@dataclass(frozen=True, slots=True)
class KVEventBatch:
    """Events from one replica; `seq` increases by one per batch from that replica."""

    replica_id: str
    seq: int
    events: list[KVEvent] = field(default_factory=list)
    timestamp: float = 0.0


def event_to_wire(event: KVEvent) -> list:
    match event:
        case BlocksStored(block_hashes, parent_hash, tier):
            wire = [_STORED, list(block_hashes), parent_hash]
        case BlocksRemoved(block_hashes, tier):
            wire = [_REMOVED, list(block_hashes)]
        case AllBlocksCleared():
            return [_CLEARED]
        case _:
            raise TypeError(f"not a KV event: {type(event).__name__}")
    if tier is not Tier.GPU:
        wire.append(Tier(tier).value)
    return wire


def event_from_wire(wire: list) -> KVEvent:
    if not isinstance(wire, list) or not wire:
        raise ValueError("KV event must be a non-empty list")
    kind = wire[0]
    if kind == _STORED and len(wire) in (3, 4):
        parent_hash = wire[2]
        if parent_hash is not None:
            parent_hash = _check_hash(parent_hash)
        return BlocksStored(_check_hashes(wire[1]), parent_hash, _check_tier(wire[3:]))
    if kind == _REMOVED and len(wire) in (2, 3):
        return BlocksRemoved(_check_hashes(wire[1]), _check_tier(wire[2:]))
    if kind == _CLEARED and len(wire) == 1:
        return AllBlocksCleared()
    raise ValueError(f"malformed KV event: {kind!r} with {len(wire)} fields")


def encode_batch(batch: KVEventBatch) -> bytes:
    wire = [batch.replica_id, batch.seq, float(batch.timestamp), [event_to_wire(e) for e in batch.events]]
    return msgpack.packb(wire, use_bin_type=True)


def decode_batch(payload: bytes) -> KVEventBatch:
    wire = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    if not isinstance(wire, list) or len(wire) != 4:
        raise ValueError("KV event batch must be [replica_id, seq, timestamp, events]")
    replica_id, seq, timestamp, events = wire
    if not isinstance(replica_id, str) or not replica_id:
        raise ValueError("replica_id must be a non-empty string")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
        raise ValueError("seq must be a non-negative int")
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
        raise ValueError("timestamp must be a number")
    if not isinstance(events, list):
        raise ValueError("events must be a list")
    return KVEventBatch(replica_id, seq, [event_from_wire(e) for e in events], float(timestamp))


def _check_hash(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64_MAX:
        raise ValueError(f"block hash must be an unsigned 64-bit int, got {value!r}")
    return value


def _check_tier(rest: list) -> Tier:
    """The optional last field of a stored/removed event: absent means GPU."""
    if not rest:
        return Tier.GPU
    if isinstance(rest[0], str) and rest[0] in _TIER_VALUES:
        return Tier(rest[0])
    raise ValueError(f"tier must be one of {sorted(_TIER_VALUES)} (or absent: gpu), got {rest[0]!r}")


def _check_hashes(values: object) -> list[int]:
    if not isinstance(values, list):
        raise ValueError("block_hashes must be a list")
    return [_check_hash(v) for v in values]
