"""Streaming detokenization and stop strings for one output sequence.

Text is decoded incrementally over a small window of tokens (vLLM's prefix/read offsets), so
each step costs O(new tokens); text ending in an incomplete UTF-8 character (U+FFFD) is held
back until the next token completes it, so no broken UTF-8 is ever emitted. While stop strings
are configured, the last len(longest stop) - 1 characters are held back from streaming too:
they might turn out to be the start of a stop string that must not be shown.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    prompt_token_ids: list[int]
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    text: str = ""  # decoded output text so far (trimmed at a stop string once matched)
    streamed_upto: int = 0  # characters of `text` already handed to the client
    _ids: list[int] = field(default_factory=list)
    _prefix_offset: int = 0
    _read_offset: int = 0

    def __post_init__(self) -> None:
        # Start the window a few prompt tokens back so the first output token's leading space
        # and merges decode exactly as in a full decode.
        tail = self.prompt_token_ids[-5:]
        self._ids = list(tail)
        self._prefix_offset = 0
        self._read_offset = len(tail)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token. Returns the stop string if one is now complete and
        `check_stop` (False while the output is shorter than min_tokens: as in vLLM, a stop
        string there neither stops the request nor trims its text)."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return None  # nothing complete yet
        added = new_text[len(prefix_text) :]
        self.text += added
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._check_stop(len(added)) if check_stop else None

    def resume(self, output_token_ids: list[int], num_streamed_chars: int, min_tokens: int = 0) -> None:
        """Continue an output whose first tokens were generated elsewhere (a continuation after
        its replica died): replay them, so the decode window and the stop-string check see the
        same text as where they were generated (a stop string split across the seam is found),
        and take the first `num_streamed_chars` characters as already streamed."""
        for i, token_id in enumerate(output_token_ids):
            self.add_token(token_id, check_stop=i + 1 >= min_tokens)
        self.streamed_upto = min(num_streamed_chars, len(self.text))

    def _check_stop(self, num_new_chars: int) -> str | None:
        if not self.stop or num_new_chars <= 0:
            return None
        longest = max(len(s) for s in self.stop)
        search_from = max(0, len(self.text) - num_new_chars - longest + 1)
        best: tuple[int, str] | None = None
        for s in self.stop:
            idx = self.text.find(s, search_from)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, s)
        if best is None:
            return None
        idx, s = best
        self.text = self.text[: idx + len(s)] if self.include_stop_str_in_output else self.text[:idx]
        return s

    def take_stream_delta(self, finished: bool) -> str:
        """New text safe to show now (everything, once finished)."""
        upto = len(self.text)
        if not finished and self.stop and not self.include_stop_str_in_output:
            upto = max(self.streamed_upto, len(self.text) - (max(len(s) for s in self.stop) - 1))
        delta = self.text[self.streamed_upto : upto]
        self.streamed_upto = upto
        return delta
