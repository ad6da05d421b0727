"""Transfer counters, read as a frozen snapshot (`TransferMetrics`) for the workers to export."""
from __future__ import annotations

import threading
from dataclasses import dataclass, fields, replace


@dataclass(frozen=True)
class TransferMetrics:
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    transfers_ok: int = 0
    transfers_failed: int = 0
    transfer_seconds: float = 0.0
    """Sum over successful transfers of begin → all layers landed (receiver) / acknowledged (sender)."""
    rejected_messages: int = 0
    pairs_created: int = 0
    pairs_broken: int = 0


class MetricsCounter:
    """Thread-safe accumulator behind `metrics()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = {f.name: f.default for f in fields(TransferMetrics)}

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                self._values[name] += delta

    def snapshot(self) -> TransferMetrics:
        with self._lock:
            return replace(TransferMetrics(), **self._values)
