"""Prompt text of a requested length in tokens, and counting tokens of text.

With a tokenizer (a local Hugging Face folder), lengths are exact token counts under that
tokenizer. Without one, one word stands for one token: an approximation the report states.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tandem.bench.loadgen.request import ChatMessage

# Common short English words: most are a single token under BPE vocabularies, and random
# draws from 200+ words make distinct prompts diverge within the first few tokens (no accidental
# prefix sharing between unrelated prompts).
_WORDS: tuple[str, ...] = tuple(
    """
    the of and to in is was for on that with as by at from his her an be this have are not
    but had they which one were all their there been has who more when will would if no out
    so said what up its about into than them can only other new some could time these two may
    first then do any like my now over such our man me even most made after also did many before
    must through back years where much your way well down should because each just those people
    how too little state good very make world still own see men work long get here between both
    life being under never day same another know while last might us great old year off come
    since against go came right used take three small water light river city house night
    garden stone music paper window forest engine signal market winter summer harbor valley
    silver bridge letter planet orange theory number circle yellow button castle doctor island
    kitchen ladder monkey needle ocean pencil rocket saddle ticket violin wagon zebra anchor
    basket candle dragon feather glacier hammer jacket kettle lantern mirror nickel oyster
    pillow quarry ribbon shovel tunnel velvet walnut
    """.split()
)


class TokenCounter:
    """Counts and makes text in tokens. `exact` says whether a real tokenizer is behind it."""

    def __init__(self, tokenizer_path: str | None = None) -> None:
        self._tokenizer = None
        if tokenizer_path:
            from transformers import AutoTokenizer  # heavy import: only when asked for

            self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.tokenizer_path = tokenizer_path

    @property
    def exact(self) -> bool:
        return self._tokenizer is not None

    @property
    def method(self) -> str:
        return f"tokenizer:{self.tokenizer_path}" if self.exact else "words (approximation: 1 word = 1 token)"

    def count(self, text: str) -> int:
        if self._tokenizer is None:
            return len(text.split())
        return len(self._tokenizer.encode(text, add_special_tokens=False))

    def make_text(self, num_tokens: int, rng: np.random.Generator) -> str:
        """Random words that come to `num_tokens` tokens (exact under a tokenizer, up to the rare
        merge at the cut)."""
        if num_tokens <= 0:
            return ""
        words = [_WORDS[i] for i in rng.integers(0, len(_WORDS), size=num_tokens)]
        text = " ".join(words)
        if self._tokenizer is None:
            return text
        token_ids = self._tokenizer.encode(text, add_special_tokens=False)
        while len(token_ids) < num_tokens:  # a vocabulary with single-char tokens: pad with more words
            extra = [_WORDS[i] for i in rng.integers(0, len(_WORDS), size=num_tokens)]
            text = text + " " + " ".join(extra)
            token_ids = self._tokenizer.encode(text, add_special_tokens=False)
        return self._tokenizer.decode(token_ids[:num_tokens])

    def render_chat(self, messages: Sequence[ChatMessage]) -> str:
        """Messages as one completion prompt. The tokenizer's chat template when it has one;
        else a plain transcript built so that the prompt of turn k-1 followed by its answer is
        an exact prefix of the prompt of turn k (the answer follows "assistant:" verbatim)."""
        if self._tokenizer is not None and getattr(self._tokenizer, "chat_template", None):
            return self._tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                tokenize=False,
                add_generation_prompt=True,
            )
        parts: list[str] = []
        for message in messages:
            if message.role == "assistant":
                parts.append(f"assistant:{message.content}\n")
            else:
                parts.append(f"{message.role}: {message.content}\n")
        parts.append("assistant:")
        return "".join(parts)
