"""What the engine hands back per request, shaped like vLLM's RequestOutput."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from tandem.protocol.logprob import Logprob


@dataclass
class CompletionOutput:
    index: int
    text: str  # all text so far
    token_ids: list[int]  # all output tokens so far
    delta_text: str = ""  # new since the previous output of this request (for streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache


def merge_outputs(earlier: RequestOutput, later: RequestOutput) -> RequestOutput:
    """One output standing for two consecutive ones of a request: `later`, with each completion's
    delta covering both (what a stream reader that fell behind the engine by one step sends)."""
    deltas = {o.index: o for o in earlier.outputs}
    outputs = []
    for out in later.outputs:
        before = deltas.pop(out.index, None)
        if before is not None:
            out = replace(out, delta_text=before.delta_text + out.delta_text,
                          delta_token_ids=before.delta_token_ids + out.delta_token_ids)
        outputs.append(out)
    outputs += deltas.values()  # every emit carries every completion; kept should one be missing
    outputs.sort(key=lambda o: o.index)
    return replace(later, outputs=outputs)
