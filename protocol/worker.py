"""What the ingress and a worker exchange through Serve handles: the request (token ids and
plain sampling fields, and for a continuation which of the tokens are its earlier output), the
streamed deltas, the first-token timing, and a replica's counters."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tandem.protocol.sampling_params import SamplingParams, StructuredOutput


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_running_tokens: int
    num_waiting_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    kv_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    prompt_tokens_total: int
    generation_tokens_total: int
    # The host tier of the prefix cache (engine/host_tier.py); all zero when it is off.
    host_kv_total_blocks: int = 0
    host_kv_used_blocks: int = 0
    host_kv_usage: float = 0.0  # fraction of host blocks holding (or receiving) a cached block
    host_cache_hits: int = 0  # prompt tokens copied back from the host tier instead of recomputed
    host_bytes_offloaded: int = 0  # device -> host
    host_bytes_reloaded: int = 0  # host -> device
    host_offload_seconds: float = 0.0  # the copies' own durations, summed
    host_reload_seconds: float = 0.0
    host_offloads_skipped: int = 0  # steps whose eviction candidates went uncopied (tier busy)
    num_loading_from_host: int = 0  # sequences waiting off the batch for a host-tier copy


@dataclass(frozen=True)
class Continuation:
    """A request continued here after the replica streaming it died (`router.continuation`).

    The last `num_output_tokens` of the request's `prompt_token_ids` are its own output so far,
    sampled elsewhere; the client already has the first `num_text_chars` characters of that
    output's text. The engine treats those tokens as output, not prompt: penalties see them, they
    count towards `max_tokens` and `min_tokens` (which keep their original values), a seeded
    generator starts past their draws, stop strings are checked across the seam, and the
    reported counts (prompt tokens, output tokens) are the whole request's."""

    num_output_tokens: int
    num_text_chars: int = 0

    def __post_init__(self) -> None:
        for name in ("num_output_tokens", "num_text_chars"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"continuation: {name} must be an integer >= 0, got {value!r}")
        if self.num_output_tokens < 1:
            raise ValueError("continuation: num_output_tokens must be >= 1 (nothing generated: send the request itself)")


@dataclass
class WorkerRequest:
    """What the ingress asks of a worker: token ids plus plain sampling fields (pickle-safe)."""

    request_id: str
    prompt_token_ids: list[int]
    session_id: str | None = None
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_output: StructuredOutput | None = None  # the grammar the output must follow
    continuation: Continuation | None = None  # None: a new request

    def sampling_params(self) -> SamplingParams:
        names = [f.name for f in dataclasses.fields(SamplingParams) if f.init]
        values = {name: getattr(self, name) for name in names if hasattr(self, name)}
        return SamplingParams(**values)


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the top alternatives, as plain (token_id, logprob) pairs."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class OutputDelta:
    """What is new in one of a request's n outputs since the previous delta."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None


@dataclass
class WorkerTiming:
    """How this worker reached a request's first token, for the serving path's stage timing
    (`router.stage_timing`). `received_unix` is the wall clock when `generate` began (comparable
    with the ingress's across processes); the rest are seconds after it on this process's
    monotonic clock. None: not reached (e.g. the engine refused the request)."""

    received_unix: float
    engine_added_s: float | None = None  # the engine thread took the request
    engine_first_step_s: float | None = None  # the first engine step after that began
    first_token_s: float | None = None  # that step (or a later one) produced its first output
    first_yield_s: float | None = None  # the first delta is about to leave this generator


@dataclass
class WorkerDelta:
    """One streamed update. `error` set: the request was refused (bad input) and nothing ran.
    `timing` is on the first delta of a request only."""

    request_id: str
    outputs: list[OutputDelta]
    finished: bool
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0  # over all n outputs, so far
    replica_id: str = ""
    error: str | None = None
    timing: WorkerTiming | None = None


@dataclass
class WorkerStats:
    """A replica's engine counters and gauges, for `/metrics` and tests."""

    replica_id: str
    engine: EngineStats
    timestamp: float
