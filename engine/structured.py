"""Structured output in the engine: grammars compiled from a request's `StructuredOutput`, one
matcher per constrained sequence, and each step's token mask over the constrained rows.

The grammar library is xgrammar (docs/STRUCTURED.md says why). `GrammarCompiler.compile` turns a
spec into a `CompiledGrammar` for this engine's tokenizer (the per-token masks of each grammar
position precomputed), cached by spec; an `xgrammar.GrammarMatcher` per sequence tracks where its
output stands in the grammar and fills the packed bitmask of the tokens allowed next
(`kernels/token_bitmask.py` applies it to the logits).

Threads: `GrammarCompiler.compile` runs on callers' threads (`LLMEngine.validate`, which the
async engine runs off its event loop and off the engine thread: a new schema costs milliseconds,
a large one much more); `StructuredOutputs` is the engine thread's alone.

The matcher invariant: before a sequence's mask is filled, its matcher has accepted exactly the
sequence's known output tokens. It is kept lazily (`StructuredOutputs.token_mask` first feeds the
matcher the output tokens it has not seen), so every way a token reaches a sequence keeps it: a
token sampled here, the first token a prefill worker sampled (under the same grammar) and sent
with the KV, an earlier output re-sent with a continued request. Preemption keeps a sequence's
tokens (only their KV is recomputed), so its matcher stays valid as it is.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from tandem.engine.sequence import Sequence
from tandem.protocol.sampling_params import StructuredOutput

logger = logging.getLogger(__name__)

# Two holes in xgrammar's (0.2.9) character classes, patched in each grammar's EBNF text before
# compiling (`grammar_fixed`; tests/engine/test_structured_output.py checks both, and that a patch
# does nothing once xgrammar no longer needs it):
# - JSON strings with minLength/maxLength take their characters from [^"\\\r\n], which admits
#   raw control characters (U+0000-U+001F), invalid in JSON (RFC 8259 §7; Python's json.loads
#   refuses them); its other strings use [^\0-\x1f"\\]. Upstream: xgrammar issue 800 (open;
#   fixes proposed in its PRs 822 and 880).
# - A negated class ([^...]) admits the surrogate code points U+D800-U+DFFF, whose 3-byte
#   encodings (ED A0-BF xx) are not UTF-8 (RFC 3629 §3): a byte-level model could write them, and
#   the text then decodes to U+FFFD triples (a maxLength 8 string came back 12 characters long).
_LENGTH_BOUNDED_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\0-\x1f\"\\]'
_NO_SURROGATES = r"\uD800-\uDFFF"
# JSON Schema keywords xgrammar (0.2.9) accepts but does not enforce (checked by comparing the
# grammars it builds with and without each): an output could break them, so they are refused.
UNENFORCED_KEYWORDS = ("uniqueItems", "contains", "minContains", "maxContains", "dependentRequired",
                       "dependentSchemas", "dependencies")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SUBSCHEMA = ("items", "additionalItems", "additionalProperties", "unevaluatedItems", "unevaluatedProperties",
              "propertyNames", "not", "if", "then", "else")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
# xgrammar's C++ errors begin with "[hh:mm:ss] /path/file.cc:123: " and sometimes a failed check.
_ERROR_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: (Check failed: \(.*?\) is false: )?")


@dataclass
class GrammarCacheStats:
    hits: int = 0
    misses: int = 0
    compile_seconds: float = 0.0  # spent compiling the misses


class GrammarCompiler:
    """Compiles `StructuredOutput` specs into xgrammar grammars for one tokenizer; thread-safe.
    Compiled grammars are kept in an LRU of `max_entries`, keyed by the spec (frozen text)."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: set[int], max_entries: int = 512,
                 max_threads: int = 8) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._max_entries = max_entries
        self._max_threads = max_threads
        self._lock = threading.Lock()
        self._compiler = None  # made at the first compile: the tokenizer's info takes a while
        self._cache: OrderedDict[StructuredOutput, object] = OrderedDict()
        self.stats = GrammarCacheStats()

    def compile(self, spec: StructuredOutput):
        """The compiled grammar for `spec`; ValueError with the reason when it is invalid or
        uses something the grammar library does not support."""
        with self._lock:
            cached = self._cache.get(spec)
            if cached is not None:
                self._cache.move_to_end(spec)
                self.stats.hits += 1
                return cached
            compiler = self._compiler_locked()
        started = time.perf_counter()
        try:
            compiled = compiler.compile_grammar(build_grammar(spec))
        except ValueError:
            raise
        except Exception as error:  # xgrammar reports bad input as RuntimeError
            raise ValueError(f"invalid {_describe(spec)}: {clean_error(error)}") from None
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats.misses += 1
            self.stats.compile_seconds += elapsed
            self._cache[spec] = compiled
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return compiled

    def _compiler_locked(self):
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_token_ids)
            # Our LRU above is the cache of record; xgrammar's own one dedups concurrent compiles.
            self._compiler = xgr.GrammarCompiler(info, max_threads=self._max_threads, cache_limit_bytes=256 << 20)
        return self._compiler


def build_grammar(spec: StructuredOutput):
    """The xgrammar `Grammar` for a spec (not yet compiled for a tokenizer). JSON is compact:
    no free whitespace, ", " and ": " as separators, so a schema with bounded values has bounded
    output (docs/STRUCTURED.md)."""
    import xgrammar as xgr

    try:
        if spec.json_schema is not None:
            try:
                schema = json.loads(spec.json_schema)
            except ValueError as error:
                raise ValueError(f"invalid JSON schema: not valid JSON ({error})") from None
            _refuse_unenforced([schema])
            return grammar_fixed(xgr.Grammar.from_json_schema(spec.json_schema, any_whitespace=False,
                                                              strict_mode=True))
        if spec.json_object:
            return grammar_fixed(xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False))
        if spec.regex is not None:
            return grammar_fixed(xgr.Grammar.from_regex(spec.regex))
        if spec.choice is not None:
            # JSON string literals are EBNF string literals (escapes included).
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
        if spec.grammar is not None:
            return grammar_fixed(xgr.Grammar.from_ebnf(spec.grammar))
        try:
            tag = json.loads(spec.structural_tag)
        except ValueError as error:
            raise ValueError(f"invalid structural tag: not valid JSON ({error})") from None
        _refuse_unenforced(list(_tag_schemas(tag)))
        return grammar_fixed(xgr.Grammar.from_structural_tag(spec.structural_tag))
    except ValueError as error:
        if str(error).startswith("invalid "):
            raise
        raise ValueError(f"invalid {_describe(spec)}: {clean_error(error)}") from None
    except Exception as error:
        raise ValueError(f"invalid {_describe(spec)}: {clean_error(error)}") from None


def unenforced_keyword(schema) -> str | None:
    """The first keyword of `UNENFORCED_KEYWORDS` a JSON schema uses (walking subschemas only,
    so a property named "contains" is fine), or None. `uniqueItems: false` constrains nothing."""
    if isinstance(schema, list):  # old-style tuple `items`
        return next((k for k in map(unenforced_keyword, schema) if k), None)
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in UNENFORCED_KEYWORDS and not (key == "uniqueItems" and value is False):
            return key
        found = None
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            found = next((k for k in map(unenforced_keyword, value.values()) if k), None)
        elif key in _SUBSCHEMA or key in _SUBSCHEMA_LISTS:
            found = unenforced_keyword(value)
        if found:
            return found
    return None


def _tag_schemas(node):
    """The JSON schemas inside a structural tag (its `json_schema` formats)."""
    if isinstance(node, dict):
        if node.get("type") == "json_schema" and "json_schema" in node:
            yield node["json_schema"]
        for value in node.values():
            yield from _tag_schemas(value)
    elif isinstance(node, list):
        for value in node:
            yield from _tag_schemas(value)


def _refuse_unenforced(schemas) -> None:
    try:
        keyword = next((k for k in map(unenforced_keyword, schemas) if k), None)
    except RecursionError:
        raise ValueError("invalid JSON schema: nested too deeply") from None
    if keyword is not None:
        raise ValueError(f"invalid JSON schema: the keyword {keyword!r} is not supported for structured output")


def grammar_fixed(grammar):
    """`grammar` with the two character-class holes above closed: length-bounded JSON string
    characters as JSON allows them, and no surrogates in negated classes. The same object when
    there is nothing to close."""
    import xgrammar as xgr

    text = str(grammar)
    fixed = negated_classes_without_surrogates(text.replace(_LENGTH_BOUNDED_CHAR, _JSON_STRING_CHAR))
    return grammar if fixed == text else xgr.Grammar.from_ebnf(fixed)


def negated_classes_without_surrogates(ebnf: str) -> str:
    """Every negated character class of an EBNF text (outside string literals, such as a
    `Regex("...")` pattern) also excludes U+D800-U+DFFF, unless it already does."""
    out: list[str] = []
    i, n = 0, len(ebnf)
    in_string = in_class = False
    while i < n:
        ch = ebnf[i]
        if ch == "\\":  # an escape: keep it and the character it escapes
            out.append(ebnf[i : i + 2])
            i += 2
            continue
        if in_string:
            in_string = ch != '"'
        elif in_class:
            in_class = ch != "]"
        elif ch == '"':
            in_string = True
        elif ch == "[":
            in_class = True
            if ebnf.startswith("[^", i) and not ebnf.startswith("[^" + _NO_SURROGATES, i):
                out.append("[^" + _NO_SURROGATES)
                i += 2
                continue
        out.append(ch)
        i += 1
    return "".join(out)


def clean_error(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _ERROR_PREFIX.sub("", message)


def _describe(spec: StructuredOutput) -> str:
    return {"json_schema": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
            "choice": "choice", "grammar": "grammar", "structural_tag": "structural tag"}[spec.kind]


# ------------------------------------------------------------------------------- matchers
@dataclass
class TokenMask:
    """One step's mask: `bitmask` row i (packed, xgrammar's layout) applies to logits row
    `rows[i]`; both on the logits' device."""
    bitmask: torch.Tensor  # [k, words] int32
    rows: torch.Tensor  # [k] int64


@dataclass
class _Constrained:
    matcher: object  # xgrammar.GrammarMatcher
    num_accepted: int = 0  # output tokens the matcher has accepted


@dataclass
class MaskResult:
    mask: TokenMask | None
    rejected: list[Sequence] = field(default_factory=list)  # an output token its grammar refused


class StructuredOutputs:
    """The engine's constrained sequences (one matcher each, by `seq_key`) and each step's mask.
    Engine thread only."""

    def __init__(self, device: torch.device, vocab_size: int) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.words = -(-vocab_size // 32)
        self._states: dict[str, _Constrained] = {}
        self._host_bitmask: torch.Tensor | None = None  # [capacity, words] int32 (pinned on CUDA)
        self._host_rows: torch.Tensor | None = None  # [capacity] int64
        self._batch_matcher = None

    def __len__(self) -> int:
        return len(self._states)

    def add(self, seq: Sequence, grammar) -> None:
        import xgrammar as xgr

        self._states[seq.seq_key] = _Constrained(xgr.GrammarMatcher(grammar))

    def forget(self, seq: Sequence) -> None:
        self._states.pop(seq.seq_key, None)

    def constrains(self, seq: Sequence) -> bool:
        return seq.seq_key in self._states

    def any_constrained(self, seqs: list[Sequence]) -> bool:
        states = self._states
        return bool(states) and any(seq.seq_key in states for seq in seqs)

    def token_mask(self, seqs: list[Sequence]) -> MaskResult:
        """The mask for a step whose row i samples `seqs[i]`: one bitmask row per constrained,
        unfinished sequence, copied to the device without waiting. Call only once every
        sequence's previous token is known (no placeholders): the masks depend on it.

        The host buffers are reused every step. That is safe: a step's copy is queued before its
        sampling, and the next step fills them only after reading this step's sampled tokens,
        which waits for that sampling (`_LaunchedStep.token_list`)."""
        rows: list[int] = []
        matchers: list = []
        rejected: list[Sequence] = []
        for row, seq in enumerate(seqs):
            state = self._states.get(seq.seq_key)
            if state is None or seq.is_finished:
                continue
            if not self._catch_up(seq, state):
                rejected.append(seq)
                continue
            rows.append(row)
            matchers.append(state.matcher)
        if not rows:
            return MaskResult(None, rejected)
        bitmask, host_rows = self._buffers(len(rows))
        if len(matchers) == 1:
            matchers[0].fill_next_token_bitmask(bitmask, 0)
        else:
            self._batch().batch_fill_next_token_bitmask(matchers, bitmask)
        host_rows.copy_(torch.tensor(rows, dtype=torch.int64))
        mask = TokenMask(bitmask.to(self.device, non_blocking=True), host_rows.to(self.device, non_blocking=True))
        return MaskResult(mask, rejected)

    def _catch_up(self, seq: Sequence, state: _Constrained) -> bool:
        """Feed the matcher the known output tokens it has not accepted yet; False when one is
        refused (the sequence can no longer follow its grammar)."""
        assert seq.num_pending == 0, "masks need the sequence's previous tokens"
        start = seq.num_prompt_tokens + state.num_accepted
        for token in seq.token_ids[start : seq.num_known_tokens]:
            if not state.matcher.accept_token(token):
                logger.error("request %s: its grammar refused output token %d", seq.request_id, token)
                return False
            state.num_accepted += 1
        return True

    def _buffers(self, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._host_bitmask is None or self._host_bitmask.shape[0] < num_rows:
            capacity = max(num_rows, 2 * (self._host_bitmask.shape[0] if self._host_bitmask is not None else 8))
            pin = self.device.type == "cuda"
            self._host_bitmask = torch.empty(capacity, self.words, dtype=torch.int32, pin_memory=pin)
            self._host_rows = torch.empty(capacity, dtype=torch.int64, pin_memory=pin)
        return self._host_bitmask[:num_rows], self._host_rows[:num_rows]

    def _batch(self):
        if self._batch_matcher is None:
            import xgrammar as xgr

            self._batch_matcher = xgr.BatchGrammarMatcher()
        return self._batch_matcher
