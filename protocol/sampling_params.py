"""What a request asks of generation: vLLM's SamplingParams, validated at construction, and the
structured-output constraint it may carry."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the text a request generates, enforced token by token by a grammar in the
    engine (`engine/structured.py`). Exactly one field is set. Plain text, so it crosses processes
    as it is (to a prefill worker inside `PrefillRequest`, whose first sampled token obeys it too)
    and hashes (the engine caches compiled grammars by it)."""

    json_schema: str | None = None  # a JSON Schema, as JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the whole output matches this regular expression
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # an EBNF grammar (xgrammar's GBNF dialect, start rule `root`)
    structural_tag: str | None = None  # an xgrammar structural tag, as JSON text (tool calls)

    def __post_init__(self) -> None:
        if isinstance(self.choice, list):
            object.__setattr__(self, "choice", tuple(self.choice))
        chosen = [f.name for f in fields(self) if getattr(self, f.name) not in (None, False)]
        if len(chosen) != 1:
            raise ValueError("structured output: exactly one of json_schema, json_object, regex, choice, grammar, "
                             f"structural_tag must be set, got {chosen or 'none'}")
        for name in ("json_schema", "regex", "grammar", "structural_tag"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured output: {name} must be a non-empty string")
        if not isinstance(self.json_object, bool):
            raise ValueError("structured output: json_object must be a bool")
        if self.choice is not None and (not self.choice or any(not isinstance(c, str) or not c for c in self.choice)):
            raise ValueError("structured output: choice must be a non-empty list of non-empty strings")

    @property
    def kind(self) -> str:
        """The name of the field that is set."""
        return next(f.name for f in fields(self) if getattr(self, f.name) not in (None, False))


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 / 0: disabled
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    max_tokens: int | None = 16  # None: up to the model's context length
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top logprobs to return besides the chosen token's
    prompt_logprobs: int | None = None  # accepted for API compatibility; not computed
    skip_special_tokens: bool = True
    detokenize: bool = True  # False: token ids only (text stays empty; stop strings need text)
    structured_output: StructuredOutput | None = None  # a grammar the output must follow
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"invalid sampling params: {msg}")

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be an integer >= 1, got {self.n!r}")
        if not (0.0 <= self.temperature):
            bad(f"temperature must be >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad(f"top_k must be -1 (disabled), 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if not (-2.0 <= self.frequency_penalty <= 2.0):
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not (self.repetition_penalty > 0.0):
            bad(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            bad(f"logprobs must be an integer in [0, 20], got {self.logprobs!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            bad(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop_list):
            bad("stop strings must be non-empty strings")
        if self.stop_list and not self.detokenize:
            bad("stop strings need detokenize=True")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integers")
        if self.structured_output is not None:
            if not isinstance(self.structured_output, StructuredOutput):
                bad(f"structured_output must be a StructuredOutput, got {type(self.structured_output).__name__}")
            # A finished grammar allows only its stop (EOS) token: banning EOS then (min_tokens,
            # ignore_eos) would leave no token to sample.
            if self.min_tokens:
                bad("min_tokens cannot be combined with structured output")
            if self.ignore_eos:
                bad("ignore_eos cannot be combined with structured output")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
