"""What a decode worker and a prefill worker exchange through a Serve handle (the KV itself goes
through `kvtransfer`): the prefill request naming where the blocks go, the prefill worker's
keep-alives while it works on it, and its result."""
from __future__ import annotations

from dataclasses import dataclass

from tandem.protocol.logprob import Logprob
from tandem.protocol.sampling_params import SamplingParams


@dataclass
class PrefillRequest:
    """Decode → prefill: compute this prompt, send blocks [skip_blocks:] of it to
    `dst_block_ids` at `receiver_address`, return the first token. `prompt_token_ids` and
    `session_id` are what the prefill pool's request router reads."""

    transfer_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    receiver_address: str
    dst_block_ids: list[int]
    skip_blocks: int
    session_id: str | None = None
    # A tensor-parallel decode replica: every rank's receiver (rank order, `receiver_address`
    # first) and the global KV-head range [lo, hi) its cache holds; None for degree 1.
    receiver_addresses: list[str] | None = None
    dst_kv_heads: list[tuple[int, int]] | None = None
    # Seconds between the prefill worker's `PrefillAlive` messages while it queues, computes or
    # sends this request (`PrefillWorker.prefill_stream`); None: only the result.
    keepalive_s: float | None = None


@dataclass
class PrefillAlive:
    """Prefill → decode, every `keepalive_s` until the result: the replica still works on this
    transfer. Its silence is how the decode worker tells a replica that hangs before it sends
    any KV (nothing there yet for the transfer's own heartbeat to watch) from one still busy."""

    transfer_id: str


@dataclass
class PrefillResult:
    transfer_id: str
    first_token: int | None = None
    logprobs: dict[int, Logprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefill worker's own prefix cache
    error: str | None = None  # set: no usable KV; the decode worker recomputes
