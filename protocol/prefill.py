"""What a decode worker and a prefill worker exchange through a Serve handle (the KV itself goes
through `kvtransfer`): the prefill request naming where the blocks go, and its result."""
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


@dataclass
class PrefillResult:
    transfer_id: str
    first_token: int | None = None
    logprobs: dict[int, Logprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefill worker's own prefix cache
    error: str | None = None  # set: no usable KV; the decode worker recomputes
