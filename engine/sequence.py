"""A request's state inside the engine: its tokens, how many have KV in the cache, its blocks.

Overlap scheduling (engine/llm_engine.py) schedules step N+1 before step N's sampled tokens
reach the host: each sequence that samples in a launched step gets a placeholder token at the
end of `token_ids` (`num_pending` counts them), resolved in order by `add_token` once the token
arrives. Lengths (`num_tokens`) count placeholders, so the scheduler and the block manager see
the sequence as it will be; `output_token_ids` / `num_output_tokens` count only known tokens.
"""
from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field

from tandem.protocol.logprob import Logprob
from tandem.protocol.sampling_params import SamplingParams


PLACEHOLDER = -1  # a sampled token still on the device (never fed to the model: see ModelRunner.prepare)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = 0.0
    output_index: int = 0  # which of the request's n outputs this is
    token_ids: list[int] = field(default_factory=list)  # prompt + generated
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # of the prompt, served from the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of full, cached blocks
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    output_logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    num_preemptions: int = 0
    max_num_tokens: int = sys.maxsize  # prompt + max_tokens: never scheduled past this length
    num_pending: int = 0  # trailing placeholders in token_ids (sampled on the device, not yet read)
    pending_row: int = -1  # row of the newest placeholder in its step's sampled-token tensor

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_known_tokens(self) -> int:
        return len(self.token_ids) - self.num_pending

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens : self.num_known_tokens]

    @property
    def num_output_tokens(self) -> int:
        return self.num_known_tokens - self.num_prompt_tokens

    def add_placeholder(self, row: int) -> None:
        """A token for this sequence was sampled on the device, at `row` of its step's tensor."""
        self.token_ids.append(PLACEHOLDER)
        self.num_pending += 1
        self.pending_row = row

    def add_token(self, token: int) -> None:
        """A sampled token is known: it fills the oldest placeholder, or is appended."""
        if self.num_pending:
            self.token_ids[len(self.token_ids) - self.num_pending] = token
            self.num_pending -= 1
        else:
            self.token_ids.append(token)

    def drop_pending(self) -> None:
        """Forget placeholders whose tokens will never be read (the sequence finished first)."""
        if self.num_pending:
            del self.token_ids[-self.num_pending :]
            self.num_pending = 0

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def seq_key(self) -> str:
        return f"{self.request_id}#{self.output_index}"
