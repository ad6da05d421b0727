"""The one error a transfer's caller has to handle: on it, fall back (recompute locally)."""


class TransferError(RuntimeError):
    """A KV transfer failed: timeout, peer died, aborted, or rejected by the peer."""

    def __init__(self, request_id: str | None, reason: str) -> None:
        self.request_id = request_id
        self.reason = reason
        where = f"request {request_id!r}: " if request_id is not None else ""
        super().__init__(f"KV transfer failed: {where}{reason}")
