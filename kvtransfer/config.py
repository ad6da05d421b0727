"""The one configuration object of kvtransfer: addresses, timeouts, message sizing."""
from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class KVTransferConfig:
    """Built once per worker; shared by its `KVSender` and `KVReceiver`."""

    bind_host: str = "127.0.0.1"
    """Interface the receiver binds its control socket and rendezvous store to."""
    advertise_host: str | None = None
    """Host senders should dial (`KVReceiver.address`); defaults to `bind_host`."""
    control_port: int = 0
    """Receiver's control (zmq ROUTER) port; 0 picks a free one."""
    store_port: int = 0
    """Receiver's rendezvous TCPStore port; 0 picks a free one."""
    worker_id: str | None = None
    """Unique name of this worker in pair prefixes; None makes `host-pid-random`."""
    timeout_s: float = 10.0
    """Bound on one transfer: `wait`/`finish` default, and on any single send/recv."""
    connect_timeout_s: float = 10.0
    """Bound on pairing with a peer (hello round trip + process-group rendezvous)."""
    heartbeat_s: float = 0.5
    """How often a sender pings each paired receiver."""
    peer_timeout_s: float = 5.0
    """A sender silent this long is taken as dead: its pair is torn down, its requests fail."""
    min_message_bytes: int = 64 * MiB
    """Streamed layers are coalesced until a message holds this many bytes (0: one per call)."""
    max_message_bytes: int = 512 * MiB
    """Largest data message; receivers reject announcements above it."""
    max_inflight_messages: int = 2
    """Data messages posted ahead of the one being completed, per pair (pipelining)."""
    max_peers: int = 1024
    """Most senders one receiver pairs with at once."""
    max_blocks_per_request: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.bind_host:
            raise ValueError("bind_host must be a non-empty host name or address")
        for name in ("control_port", "store_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {port}")
        for name in ("timeout_s", "connect_timeout_s", "heartbeat_s", "peer_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.peer_timeout_s <= self.heartbeat_s:
            raise ValueError("peer_timeout_s must exceed heartbeat_s")
        if self.max_message_bytes <= 0 or self.min_message_bytes < 0:
            raise ValueError("max_message_bytes must be > 0 and min_message_bytes >= 0")
        if self.min_message_bytes > self.max_message_bytes:
            raise ValueError("min_message_bytes must not exceed max_message_bytes")
        if self.max_inflight_messages < 1 or self.max_peers < 1 or self.max_blocks_per_request < 1:
            raise ValueError("max_inflight_messages, max_peers, max_blocks_per_request must be >= 1")
        if self.worker_id is not None and not _is_safe_id(self.worker_id):
            raise ValueError(f"worker_id must be 1-128 chars of [A-Za-z0-9._:-], got {self.worker_id!r}")


def _is_safe_id(name: str) -> bool:
    return 0 < len(name) <= 128 and all(c.isalnum() or c in "._:-" for c in name)
