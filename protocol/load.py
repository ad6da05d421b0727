"""A worker's load report and its wire form (msgpack over a plain list: never pickle across
processes; `decode_load` validates every field, since the bytes come from another process)."""
from __future__ import annotations

from dataclasses import dataclass

import msgpack


@dataclass(frozen=True, slots=True)
class ReplicaLoad:
    """One worker's load at `timestamp` (seconds since the epoch, the worker's clock).

    `num_running_tokens`: context tokens (prompt + generated so far) of running sequences.
    `num_waiting_tokens`: prompt tokens of waiting sequences not yet computed.
    """

    replica_id: str
    num_running: int
    num_waiting: int
    num_running_tokens: int
    num_waiting_tokens: int
    free_kv_blocks: int
    total_kv_blocks: int
    timestamp: float

    @property
    def outstanding_tokens(self) -> int:
        return self.num_running_tokens + self.num_waiting_tokens

    @property
    def kv_usage(self) -> float:
        if self.total_kv_blocks <= 0:
            return 0.0
        return min(1.0, max(0.0, 1.0 - self.free_kv_blocks / self.total_kv_blocks))


_INT_FIELDS = ("num_running", "num_waiting", "num_running_tokens", "num_waiting_tokens", "free_kv_blocks", "total_kv_blocks")


def encode_load(load: ReplicaLoad) -> bytes:
    return msgpack.packb(
        [load.replica_id, *(getattr(load, name) for name in _INT_FIELDS), float(load.timestamp)],
        use_bin_type=True,
    )


def decode_load(payload: bytes) -> ReplicaLoad:
    wire = msgpack.unpackb(payload, raw=False)
    if not isinstance(wire, list) or len(wire) != 2 + len(_INT_FIELDS):
        raise ValueError("ReplicaLoad must be a list of 8 fields")
    replica_id, *counts, timestamp = wire
    if not isinstance(replica_id, str) or not replica_id:
        raise ValueError("replica_id must be a non-empty string")
    for name, value in zip(_INT_FIELDS, counts):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if not isinstance(timestamp, (int, float)) or isinstance(timestamp, bool):
        raise ValueError("timestamp must be a number")
    return ReplicaLoad(replica_id, *counts, float(timestamp))
