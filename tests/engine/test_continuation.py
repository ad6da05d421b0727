"""A request continued on another engine from the tokens already streamed (`Continuation`: what
the ingress sends when a decode replica dies mid-stream) gives exactly the stream it would have
given undisturbed: the same tokens, the same text (no character repeated or lost at the seam),
the same finish, the whole request's counts. Seeded sampling draws the same random numbers,
penalties see the same output history, min_tokens counts the earlier output, and a stop string
is found across the seam. Two engines on the same weights: the undisturbed one and the one that
takes over (a fresh replica: nothing of the request cached)."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import jsonschema
import pytest

from tandem.engine.config import EngineConfig
from tandem.engine.llm_engine import LLMEngine
from tandem.protocol.sampling_params import SamplingParams, StructuredOutput
from tandem.protocol.worker import Continuation

MAX_TOKENS = 24


@dataclass
class Stream:
    """What a client saw of one request: each delta's tokens and text, how it ended, the counts."""

    tokens: list[list[int]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: object = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0

    @property
    def token_ids(self) -> list[int]:
        return [t for delta in self.tokens for t in delta]

    @property
    def text(self) -> str:
        return "".join(self.texts)


def run(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams,
        continuation: Continuation | None = None) -> Stream:
    engine.add_request(rid, {"prompt_token_ids": prompt}, params, continuation=continuation)
    stream = Stream()
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == rid
            o = out.outputs[0]
            stream.tokens.append(list(o.delta_token_ids))
            stream.texts.append(o.delta_text)
            stream.finish_reason, stream.stop_reason = o.finish_reason, o.stop_reason
            stream.num_prompt_tokens = len(out.prompt_token_ids)
            stream.num_output_tokens = len(o.token_ids)
    return stream


def engine(model: str, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(model=model, num_kv_blocks=256, **overrides))


@pytest.fixture(scope="module")
def engines(llama_dir):
    return engine(llama_dir), engine(llama_dir)


def prompt_of(seed: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, vocab) for _ in range(rng.randrange(5, 40))]


def continued(whole: Stream, second: LLMEngine, rid: str, prompt: list[int], params: SamplingParams,
              cut: int) -> Stream:
    """The stream a client sees when the replica streaming `whole` dies after its `cut`-th
    delta: those deltas, then the rest from a continuation on `second`."""
    seen = Stream(whole.tokens[:cut], whole.texts[:cut])
    before = seen.token_ids
    rest = run(second, f"{rid}-continued", prompt + before, params,
               Continuation(len(before), len(seen.text)))
    return Stream(seen.tokens + rest.tokens, seen.texts + rest.texts, rest.finish_reason, rest.stop_reason,
                  rest.num_prompt_tokens, rest.num_output_tokens)


def assert_same(whole: Stream, joined: Stream) -> None:
    assert joined.token_ids == whole.token_ids
    assert joined.text == whole.text
    assert (joined.finish_reason, joined.stop_reason) == (whole.finish_reason, whole.stop_reason)
    assert (joined.num_prompt_tokens, joined.num_output_tokens) == (whole.num_prompt_tokens, whole.num_output_tokens)


PARAMS = {
    "greedy": dict(temperature=0.0),
    "seeded": dict(temperature=1.0, seed=1234),
    "seeded-filtered": dict(temperature=0.8, top_k=50, top_p=0.9, min_p=0.01, seed=7),
    "seeded-penalties": dict(temperature=1.0, seed=99, presence_penalty=0.7, frequency_penalty=0.5,
                             repetition_penalty=1.3),
    "greedy-penalties": dict(temperature=0.0, presence_penalty=1.5, frequency_penalty=1.0, repetition_penalty=1.5),
    "min-tokens": dict(temperature=1.0, seed=3, min_tokens=MAX_TOKENS - 4),
    "logprobs": dict(temperature=1.0, seed=5, logprobs=2),
}


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_a_continuation_gives_the_undisturbed_stream(engines, name):
    first, second = engines
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=name != "min-tokens", **PARAMS[name])
    for case in range(2):
        prompt = prompt_of(100 + case, first.vocab_size)
        whole = run(first, f"{name}-{case}", prompt, params)
        assert len(whole.token_ids) > 4, whole
        for cut in (1, len(whole.tokens) // 2, len(whole.tokens) - 1):
            assert_same(whole, continued(whole, second, f"{name}-{case}-{cut}", prompt, params, cut))
    assert not first.requests and not second.requests
    for e in engines:
        e.block_manager.check_invariants([])
        assert e.block_manager.num_free_blocks == e.block_manager.num_blocks


def test_without_the_replay_a_seeded_continuation_would_differ(engines):
    """The check above has teeth: a continuation that starts a fresh generator draws differently."""
    first, second = engines
    params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=1.0, seed=1234)
    prompt = prompt_of(7, first.vocab_size)
    whole = run(first, "teeth", prompt, params)
    cut = len(whole.tokens) // 2
    before = [t for d in whole.tokens[:cut] for t in d]
    plain = run(second, "teeth-plain", prompt + before,
                SamplingParams(max_tokens=MAX_TOKENS - len(before), ignore_eos=True, temperature=1.0, seed=1234))
    assert before + plain.token_ids != whole.token_ids


def test_a_stop_string_across_the_seam_is_found_and_held_back_text_is_not_lost(engines):
    """The stop string starts in the tokens streamed before the replica died and ends in the
    continuation's; the text held back from the client (it might have been the stop string's
    start) is streamed by the continuation, once."""
    first, second = engines
    tok = first.tokenizer
    found = 0
    for case in range(12):
        prompt = prompt_of(300 + case, first.vocab_size)
        greedy = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0)
        free = run(first, f"free-{case}", prompt, greedy)
        ids = free.token_ids
        # A seam after token 8; the stop string: the text of tokens 7..9 (spanning it).
        head, tail = tok.decode(ids[:7]), tok.decode(ids[:10])
        stop = tail[len(head):].strip()
        if len(stop) < 3 or stop not in free.text or free.text.index(stop) < len(head) - 2:
            continue
        params = SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0, stop=[stop])
        whole = run(first, f"stop-{case}", prompt, params)
        assert whole.finish_reason == "stop" and whole.stop_reason == stop
        for cut in range(6, min(11, len(whole.tokens))):  # around the seam, on both sides of it
            assert_same(whole, continued(whole, second, f"stop-{case}-{cut}", prompt, params, cut))
        found += 1
        if found == 3:
            break
    assert found == 3, "too few prompts gave a usable stop string"


def test_a_grammar_constrained_continuation_gives_the_undisturbed_stream(engines):
    """A JSON-schema request continued mid-object: the taking-over engine's matcher catches up
    over the tokens already streamed (they are output, not prompt), so the rest obeys the same
    grammar from the same state and, seeded, is the same stream; the joined text parses and
    validates."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 120}},
              "required": ["name", "age"], "additionalProperties": False}
    first, second = engines
    params = SamplingParams(temperature=1.0, seed=21, max_tokens=64,
                            structured_output=StructuredOutput(json_schema=json.dumps(schema)))
    prompt = prompt_of(300, first.vocab_size)
    whole = run(first, "json", prompt, params)
    assert whole.finish_reason == "stop" and len(whole.tokens) >= 4, whole
    jsonschema.validate(json.loads(whole.text), schema)
    for cut in (1, len(whole.tokens) // 2, len(whole.tokens) - 1):
        assert_same(whole, continued(whole, second, f"json-{cut}", prompt, params, cut))
    # The seam really matters: sent as prompt only, the earlier output is not in the grammar's
    # state, which starts a new object: the joined text is no JSON.
    cut = len(whole.tokens) // 2
    before = [t for d in whole.tokens[:cut] for t in d]
    fresh = run(second, "json-fresh", prompt + before, params)
    with pytest.raises(json.JSONDecodeError):
        json.loads("".join(whole.texts[:cut]) + fresh.text)


def test_a_continuation_is_checked(engines):
    first, _ = engines
    prompt = prompt_of(1, first.vocab_size)
    params = SamplingParams(max_tokens=8)
    with pytest.raises(ValueError, match="nothing left to generate"):
        first.validate({"prompt_token_ids": prompt + [5] * 8}, params, Continuation(8))
    with pytest.raises(ValueError, match="must leave a prompt"):
        first.validate({"prompt_token_ids": [5, 6]}, params, Continuation(2))
    with pytest.raises(ValueError, match="n must be 1"):
        first.validate({"prompt_token_ids": prompt + [5]}, SamplingParams(n=2, max_tokens=8), Continuation(1))
    with pytest.raises(ValueError, match="num_output_tokens"):
        Continuation(0)
    limit = first.max_model_len
    # max_tokens counts from the original prompt: the same request fits as a continuation
    fits = SamplingParams(max_tokens=limit - len(prompt))
    first.validate({"prompt_token_ids": prompt + [5] * 10}, fits, Continuation(10))
