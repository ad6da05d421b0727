"""The data crossing the load generator's seams: what to send (`BenchRequest`) and what came
back, timed (`RequestResult`)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class BenchRequest:
    """One request to send. Exactly one of `prompt` / `messages` is set; the client adapts it to
    the endpoint (a prompt becomes one user message on chat; messages are rendered to text on
    completions)."""

    max_tokens: int
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    input_tokens: int = 0  # our own count (tokenizer, or words when none was given)
    kind: str = "default"  # workload tag: "random", "chat", "rag", "short", "long", ...
    conversation_id: str | None = None
    turn_index: int = 0

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("BenchRequest needs exactly one of prompt / messages")


@dataclass
class RequestResult:
    """One request as measured by the client. Times are seconds; `start_s` is relative to the
    stage start. `output_tokens` / `prompt_tokens` come from the server's `usage` only: None
    means the server sent no usage (never a guess)."""

    request_index: int
    kind: str
    conversation_id: str | None
    turn_index: int
    warmup: bool
    start_s: float
    input_tokens_estimate: int
    max_tokens: int
    ttft_s: float | None = None
    e2e_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    output_chunks: int = 0
    text: str = ""
    error_kind: str | None = None  # "http_<status>", "timeout", "connection", "malformed_stream", "stream_error"
    error_detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_kind is None

    @property
    def end_s(self) -> float:
        return self.start_s + (self.e2e_s or 0.0)

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (output_tokens - 1)."""
        if not self.ok or self.output_tokens is None or self.output_tokens < 2:
            return None
        if self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def input_tokens(self) -> int:
        """The server's prompt token count when it reported one, else our estimate."""
        return self.prompt_tokens if self.prompt_tokens is not None else self.input_tokens_estimate
