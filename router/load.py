"""Replica load: the router's running estimate of it.

Workers report `ReplicaLoad` (`protocol.load`) now and then (every few engine steps). Between
reports the router adds the prompt tokens of every request it routed (the in-flight ledger), and takes them off
when Serve says the request finished or a newer report arrives that already counts them, so a
burst of requests sees its own effect before the next report.
"""
from __future__ import annotations

from dataclasses import dataclass

from tandem.protocol.load import ReplicaLoad


@dataclass(slots=True)
class _InFlight:
    replica_id: str
    num_tokens: int
    routed_at: float


class LoadTracker:
    """Latest report per replica plus the tokens routed since; times are the caller's clock.

    `outstanding` is kept up to date on every change (report, route, finish), so the router
    reads a replica's load with one dict lookup per candidate."""

    def __init__(self, in_flight_ttl_s: float = 30.0) -> None:
        # An entry whose finish we never hear about (lost callback) stops counting after this.
        self._in_flight_ttl_s = in_flight_ttl_s
        self._reports: dict[str, ReplicaLoad] = {}
        self._in_flight: dict[str, _InFlight] = {}  # request_id -> entry, in routing order
        # replica_id -> its request ids in routing order (a dict used as an ordered set)
        self._in_flight_of: dict[str, dict[str, None]] = {}
        self.outstanding: dict[str, int] = {}  # replica_id -> reported + in-flight tokens
        self.kv_usage_of: dict[str, float] = {}  # replica_id -> reported KV use

    def update(self, load: ReplicaLoad, now: float) -> None:
        """Store a report; in-flight entries routed to that replica before `now` are in it."""
        replica_id = load.replica_id
        self._reports[replica_id] = load
        self.kv_usage_of[replica_id] = load.kv_usage
        in_flight_tokens = 0
        mine = self._in_flight_of.get(replica_id)
        if mine:
            for request_id in list(mine):
                entry = self._in_flight[request_id]
                if entry.routed_at <= now:
                    del self._in_flight[request_id]
                    del mine[request_id]
                else:
                    in_flight_tokens += entry.num_tokens
        self.outstanding[replica_id] = load.outstanding_tokens + in_flight_tokens

    def on_routed(self, request_id: str, replica_id: str, num_tokens: int, now: float) -> None:
        self._drop(request_id)  # a retried request moves, it does not count twice
        self._in_flight[request_id] = _InFlight(replica_id, num_tokens, now)
        self._in_flight_of.setdefault(replica_id, {})[request_id] = None
        self.outstanding[replica_id] = self.outstanding.get(replica_id, 0) + num_tokens

    def on_finished(self, request_id: str) -> None:
        self._drop(request_id)

    def expire(self, now: float) -> None:
        in_flight, cutoff = self._in_flight, now - self._in_flight_ttl_s
        while in_flight:
            request_id = next(iter(in_flight))
            if in_flight[request_id].routed_at >= cutoff:
                break
            self._drop(request_id)

    def remove_replica(self, replica_id: str) -> None:
        self._reports.pop(replica_id, None)
        for request_id in list(self._in_flight_of.get(replica_id, ())):
            self._drop(request_id)
        self._in_flight_of.pop(replica_id, None)
        self.outstanding.pop(replica_id, None)
        self.kv_usage_of.pop(replica_id, None)

    def outstanding_tokens(self, replica_id: str) -> int:
        return self.outstanding.get(replica_id, 0)

    def kv_usage(self, replica_id: str) -> float:
        return self.kv_usage_of.get(replica_id, 0.0)

    def report(self, replica_id: str) -> ReplicaLoad | None:
        return self._reports.get(replica_id)

    def _drop(self, request_id: str) -> None:
        entry = self._in_flight.pop(request_id, None)
        if entry is None:
            return
        replica_id = entry.replica_id
        mine = self._in_flight_of.get(replica_id)
        if mine is not None:
            mine.pop(request_id, None)
        report = self._reports.get(replica_id)
        floor = report.outstanding_tokens if report is not None else 0
        self.outstanding[replica_id] = max(floor, self.outstanding.get(replica_id, 0) - entry.num_tokens)
