"""Replica load: what a worker reports, and the router's running estimate of it.

Workers report `ReplicaLoad` now and then (every few engine steps). Between reports the router
adds the prompt tokens of every request it routed (the in-flight ledger), and takes them off
when Serve says the request finished or a newer report arrives that already counts them, so a
burst of requests sees its own effect before the next report.
"""
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


@dataclass(slots=True)
class _InFlight:
    replica_id: str
    num_tokens: int
    routed_at: float


class LoadTracker:
    """Latest report per replica plus the tokens routed since; times are the caller's clock."""

    def __init__(self, in_flight_ttl_s: float = 30.0) -> None:
        # An entry whose finish we never hear about (lost callback) stops counting after this.
        self._in_flight_ttl_s = in_flight_ttl_s
        self._reports: dict[str, ReplicaLoad] = {}
        self._in_flight: dict[str, _InFlight] = {}  # request_id -> entry, in routing order
        self._in_flight_tokens: dict[str, int] = {}  # replica_id -> sum of its entries

    def update(self, load: ReplicaLoad, now: float) -> None:
        """Store a report; in-flight entries routed to that replica before `now` are in it."""
        self._reports[load.replica_id] = load
        counted = [rid for rid, e in self._in_flight.items() if e.replica_id == load.replica_id and e.routed_at <= now]
        for request_id in counted:
            self._drop(request_id)

    def on_routed(self, request_id: str, replica_id: str, num_tokens: int, now: float) -> None:
        self._drop(request_id)  # a retried request moves, it does not count twice
        self._in_flight[request_id] = _InFlight(replica_id, num_tokens, now)
        self._in_flight_tokens[replica_id] = self._in_flight_tokens.get(replica_id, 0) + num_tokens

    def on_finished(self, request_id: str) -> None:
        self._drop(request_id)

    def expire(self, now: float) -> None:
        while self._in_flight:
            request_id, entry = next(iter(self._in_flight.items()))
            if now - entry.routed_at <= self._in_flight_ttl_s:
                break
            self._drop(request_id)

    def remove_replica(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)
        for request_id in [rid for rid, e in self._in_flight.items() if e.replica_id == replica_id]:
            self._drop(request_id)
        self._in_flight_tokens.pop(replica_id, None)

    def outstanding_tokens(self, replica_id: str) -> int:
        report = self._reports.get(replica_id)
        reported = report.outstanding_tokens if report is not None else 0
        return reported + self._in_flight_tokens.get(replica_id, 0)

    def kv_usage(self, replica_id: str) -> float:
        report = self._reports.get(replica_id)
        return report.kv_usage if report is not None else 0.0

    def report(self, replica_id: str) -> ReplicaLoad | None:
        return self._reports.get(replica_id)

    def _drop(self, request_id: str) -> None:
        entry = self._in_flight.pop(request_id, None)
        if entry is None:
            return
        remaining = self._in_flight_tokens.get(entry.replica_id, 0) - entry.num_tokens
        if remaining > 0:
            self._in_flight_tokens[entry.replica_id] = remaining
        else:
            self._in_flight_tokens.pop(entry.replica_id, None)
