"""kvtransfer: moving paged KV blocks between workers.

Decode side: `KVReceiver(kv_cache, config)`, `.expect(request_id, dst_block_ids, num_layers)` →
`ReceiveHandle.wait(timeout)`. Prefill side: `KVSender(kv_cache, config)`,
`.begin(request_id, peer, src_block_ids, dst_block_ids)` → `SendSession.send_layers(a, b)` …
`.finish()`, or `.send(...)` in one call. Failures surface as `TransferError`.

Tensor parallelism: a request's heads may come in parts from several senders
(`expect(..., head_ranges=...)`, `begin(..., src_heads=(a, b), dst_head_start=s)`);
`plan_head_parts` says which rank sends which heads to which. See docs/KVTRANSFER.md.
"""
from tandem.kvtransfer.config import KVTransferConfig
from tandem.kvtransfer.errors import TransferError
from tandem.kvtransfer.metrics import TransferMetrics
from tandem.kvtransfer.receiver import KVReceiver, ReceiveHandle
from tandem.kvtransfer.sender import KVSender, SendSession
from tandem.kvtransfer.tp_plan import HeadPart, plan_head_parts

__all__ = ["KVTransferConfig", "TransferError", "TransferMetrics", "KVReceiver", "ReceiveHandle",
           "KVSender", "SendSession", "HeadPart", "plan_head_parts"]
