"""kvtransfer: moving paged KV blocks between workers.

Decode side: `KVReceiver(kv_cache, config)`, `.expect(request_id, dst_block_ids, num_layers)` →
`ReceiveHandle.wait(timeout)`. Prefill side: `KVSender(kv_cache, config)`,
`.begin(request_id, peer, src_block_ids, dst_block_ids)` → `SendSession.send_layers(a, b)` …
`.finish()`, or `.send(...)` in one call. Failures surface as `TransferError`. See
docs/KVTRANSFER.md.
"""
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.errors import TransferError
from tandem.kvtransfer.metrics import TransferMetrics
from tandem.kvtransfer.receiver import KVReceiver, ReceiveHandle
from tandem.kvtransfer.sender import KVSender, SendSession

__all__ = ["KVTransferConfig", "TransferError", "TransferMetrics", "KVReceiver", "ReceiveHandle",
           "KVSender", "SendSession"]
