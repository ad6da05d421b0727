"""`PromptTokenizer`: the ingress's chat-prompt tokenization, cached piece by piece.

A chat client sends the whole history every turn, so the ingress would tokenize the same
messages again and again: ~3 µs a token in HF's fast tokenizer (19-28 ms for an 8k-token
history on the 2-core dev machine), on the ingress's event loop (`encode` holds the GIL). The tokenizer itself splits its
input at added tokens (`<|im_start|>`, `<|im_end|>`, ...) and tokenizes the text between them
independently, so this class does the same split (a regex over the added tokens' contents,
longest first, as the tokenizer's own leftmost-longest matcher) and keeps an LRU of
piece -> token ids: a follow-up turn tokenizes only its new messages. Misses go to the Rust
tokenizer's batch call, which releases the GIL, in a thread when they are long, so other
requests keep streaming meanwhile.

The result is the tokenizer's own, token for token: the piecewise path is used only for
tokenizers where that split is provably the tokenizer's (no normalizer; pre-tokenizers that
act within a piece; added tokens without lstrip/rstrip/single_word), and it must agree with
`tokenizer.encode` on a sample at start-up; otherwise every call is `tokenizer.encode`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
from collections import OrderedDict

logger = logging.getLogger("ray.serve")

# Pre-tokenizers that split or map within one piece only (Metaspace's prepend_scheme "first"
# looks at the piece's place in the whole input: not piecewise).
_PIECEWISE_PRE_TOKENIZERS = {"ByteLevel", "Split", "Sequence", "Whitespace", "WhitespaceSplit", "Punctuation",
                             "Digits", "BertPreTokenizer", "UnicodeScripts", "CharDelimiterSplit"}
_SELF_CHECK = [
    {"role": "system", "content": "You are terse.  Numbers: 12345 6.78e9, tabs\tand\nnew lines."},
    {"role": "user", "content": "Hello world! How are   you?<|im_end|> ünïcödé 漢字 🙂 'quotes' \"double\""},
    {"role": "assistant", "content": " leading space, trailing space "},
    {"role": "user", "content": "<|im_start|>user\nnested markers<|im_end|>\n"},
]


def piecewise_splitter(tokenizer) -> tuple[re.Pattern, dict[str, int]] | None:
    """The regex that splits text where `tokenizer` does before tokenizing the pieces on their
    own, and the added tokens' ids; None when its pipeline is not provably piecewise."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:
        return None
    if spec.get("normalizer") is not None:
        return None

    def piecewise(pre: dict | None) -> bool:
        if pre is None:
            return True
        kind = pre.get("type")
        if kind not in _PIECEWISE_PRE_TOKENIZERS:
            return False
        if kind == "ByteLevel" and pre.get("add_prefix_space"):
            return False
        return all(piecewise(p) for p in pre.get("pretokenizers", []))

    if not piecewise(spec.get("pre_tokenizer")):
        return None
    added = spec.get("added_tokens") or []
    if not added or any(t.get("lstrip") or t.get("rstrip") or t.get("single_word") for t in added):
        return None
    ids = {t["content"]: t["id"] for t in added}
    contents = sorted(ids, key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, contents)) + ")"), ids


# Text at least this long is tokenized (and chat-templated, by the ingress) in a thread: on the
# event loop it would hold every other request's stream for milliseconds.
THREAD_MIN_CHARS = 16384


class PromptTokenizer:
    """`await encode(text)` == `tokenizer.encode(text, add_special_tokens=False)`, faster for
    text that repeats piecewise (chat histories). Used from one event loop."""

    def __init__(self, tokenizer, cache_chars: int = 64 << 20,
                 thread_min_chars: int = THREAD_MIN_CHARS) -> None:
        self._tokenizer = tokenizer
        self._cache: OrderedDict[str, list[int]] = OrderedDict()
        self._cache_chars = 0
        self._max_cache_chars = cache_chars
        self._thread_min_chars = thread_min_chars
        split = piecewise_splitter(tokenizer) if cache_chars > 0 else None
        self._splitter, self._added_ids = split if split is not None else (None, {})
        if self._splitter is not None:
            backend = tokenizer.backend_tokenizer
            self._batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
            if not self._self_check():
                logger.warning("piecewise tokenization disagrees with the tokenizer; not caching")
                self._splitter = None

    @property
    def piecewise(self) -> bool:
        return self._splitter is not None

    def _self_check(self) -> bool:
        try:
            text = self._tokenizer.apply_chat_template(_SELF_CHECK, add_generation_prompt=True, tokenize=False)
        except Exception:
            text = "".join(f"{m['role']}\n{m['content']}\n" for m in _SELF_CHECK)
        expected = self._tokenizer.encode(text, add_special_tokens=False)
        pieces, known, misses = self._lookup(text)
        known.update(zip(misses, (e.ids for e in self._batch(misses, add_special_tokens=False))))
        got = self._join(pieces, known)
        return got == expected

    async def encode(self, text: str) -> list[int]:
        """Long misses are tokenized in a thread (the Rust call releases the GIL)."""
        if self._splitter is None:
            if len(text) < self._thread_min_chars:
                return self._tokenizer.encode(text, add_special_tokens=False)
            return await asyncio.to_thread(self._tokenizer.encode, text, add_special_tokens=False)
        pieces, known, misses = self._lookup(text)
        if misses:
            if sum(map(len, misses)) >= self._thread_min_chars:
                encoded = await asyncio.to_thread(self._batch, misses, add_special_tokens=False)
            else:
                encoded = self._batch(misses, add_special_tokens=False)
            fresh = {piece: encoding.ids for piece, encoding in zip(misses, encoded)}
            known.update(fresh)
            self._remember(fresh)
        return self._join(pieces, known)

    # ------------------------------------------------------------------ pieces
    def _lookup(self, text: str) -> tuple[list[str], dict[str, list[int]], list[str]]:
        """The pieces (odd positions are added tokens), the cached ids of the text pieces the
        cache holds (taken now: a concurrent request may evict them), and the others."""
        pieces = self._splitter.split(text)
        cache = self._cache
        known: dict[str, list[int]] = {}
        misses: dict[str, None] = {}
        for piece in pieces[::2]:
            if not piece or piece in known:
                continue
            ids = cache.get(piece)
            if ids is None:
                misses[piece] = None
            else:
                known[piece] = ids
                cache.move_to_end(piece)
        return pieces, known, list(misses)

    def _remember(self, fresh: dict[str, list[int]]) -> None:
        cache = self._cache
        for piece, ids in fresh.items():
            if piece not in cache:
                self._cache_chars += len(piece)
            cache[piece] = ids
        while self._cache_chars > self._max_cache_chars and cache:
            piece, _ = cache.popitem(last=False)
            self._cache_chars -= len(piece)

    def _join(self, pieces: list[str], known: dict[str, list[int]]) -> list[int]:
        ids: list[int] = []
        added = self._added_ids
        for i, piece in enumerate(pieces):
            if i % 2:
                ids.append(added[piece])
            elif piece:
                ids.extend(known[piece])
        return ids
