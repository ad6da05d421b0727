"""Grammar-constrained decoding in the engine (engine/structured.py): random weights make every
sample a real test of the mask. Sampled outputs follow their schema, regex, choice or grammar;
a constrained request leaves its unconstrained neighbours' tokens exactly as they are without it;
overlap scheduling, chunked prefill, prefix hits, preemption and n > 1 give the same tokens as the
plain path; the first token sampled on a prefill worker obeys the grammar; a token the grammar
refuses ends the request; bad specs are ValueErrors before anything runs."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from tandem import LLM, SamplingParams, StructuredOutput
from tandem.engine.config import EngineConfig
from tandem.engine.kv_connector import LoadResult
from tandem.engine.llm_engine import LLMEngine
from tandem.engine.structured import build_grammar
from tests.engine.fake_connector import DisaggPair

# Every value bounded, compact JSON: a complete object within MAX_TOKENS (docs/STRUCTURED.md).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "active"],
    "additionalProperties": False,
}
JSON_SPEC = StructuredOutput(json_schema=json.dumps(SCHEMA))
MAX_TOKENS = 96  # the longest object this schema allows is ~80 tokens (8 name chars of up to 4 byte tokens)
PROMPTS = ["Describe a user as JSON:", "The quick brown fox", "Hello world! How are you today?"]


@pytest.fixture(scope="module")
def llm(llama_dir) -> LLM:
    return LLM(llama_dir, num_kv_blocks=128, max_model_len=512)


def constrained(seed: int | None, spec: StructuredOutput = JSON_SPEC, **kw) -> SamplingParams:
    return SamplingParams(temperature=kw.pop("temperature", 1.0), seed=seed, max_tokens=MAX_TOKENS,
                          structured_output=spec, **kw)


def assert_valid(text: str) -> None:
    jsonschema.validate(json.loads(text), SCHEMA)


def test_sampled_outputs_follow_the_schema(llm):
    outs = llm.generate([PROMPTS[i % 3] for i in range(24)], [constrained(seed) for seed in range(24)])
    texts = [o.outputs[0].text for o in outs]
    for out, text in zip(outs, texts):
        assert out.outputs[0].finish_reason == "stop", text
        assert_valid(text)
    assert len(set(texts)) > 12  # really sampled, not one fixed answer
    assert llm.engine.grammars.stats.misses <= 1  # compiled once, then from the cache


def test_greedy_and_n_outputs_follow_the_schema(llm):
    greedy = llm.generate(PROMPTS, constrained(None, temperature=0.0))
    for out in greedy:
        assert_valid(out.outputs[0].text)
    (many,) = llm.generate(PROMPTS[0], constrained(7, n=4))
    assert len({o.text for o in many.outputs}) > 1
    for output in many.outputs:
        assert_valid(output.text)


@pytest.mark.parametrize("spec, check", [
    (StructuredOutput(regex=r"[0-9]{3}-[a-z]{2,4}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t)),
    (StructuredOutput(choice=("yes", "no", 'say "maybe"\n')), lambda t: t in ("yes", "no", 'say "maybe"\n')),
    (StructuredOutput(grammar='root ::= "(" [a-c]+ ")" | "none"'), lambda t: re.fullmatch(r"\([a-c]+\)|none", t)),
    (StructuredOutput(json_object=True), lambda t: t.startswith("{")),
])
def test_regex_choice_grammar_and_json_object(llm, spec, check):
    outs = llm.generate(PROMPTS * 3, [SamplingParams(temperature=1.0, seed=s, max_tokens=24, structured_output=spec)
                                      for s in range(9)])
    for out in outs:
        text = out.outputs[0].text
        assert check(text), repr(text)
        if spec.json_object and out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


@pytest.mark.parametrize("overlap", [True, False])
def test_unconstrained_neighbours_are_not_affected(llama_dir, overlap):
    """The same unconstrained requests, alone and batched with constrained ones: identical tokens
    (seeded and greedy), and the constrained ones equal their own run alone."""
    llm = LLM(llama_dir, num_kv_blocks=128, max_model_len=512, async_scheduling=overlap)
    free = [SamplingParams(temperature=1.0, seed=11, max_tokens=40, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)]
    alone = _tokens(llm, PROMPTS[:2], free)
    bound = [constrained(5), constrained(None, temperature=0.0)]
    bound_alone = _tokens(llm, PROMPTS[1:], bound)
    mixed = _tokens(llm, PROMPTS[:2] + PROMPTS[1:], free + bound)
    assert mixed[:2] == alone
    assert mixed[2:] == bound_alone
    # And the constrained rows really were constrained: unconstrained, the same seed differs.
    assert bound_alone[0] != _tokens(llm, [PROMPTS[1]], [SamplingParams(temperature=1.0, seed=5, max_tokens=96)])[0]


@pytest.mark.parametrize("kw", [
    {"max_num_batched_tokens": 8},  # chunked prefill mixed with constrained decodes
    {"num_kv_blocks": 12, "max_num_batched_tokens": 64},  # preemption under cache pressure
])
def test_overlap_chunking_prefix_hits_and_preemption_keep_the_tokens(llama_dir, kw):
    shared = "A shared system prompt that fills more than one block of the cache: " * 2
    prompts = [shared + p for p in PROMPTS] * 2
    params = [constrained(seed) for seed in range(len(prompts))]
    reference = _tokens(LLM(llama_dir, num_kv_blocks=256, max_model_len=512, async_scheduling=False),
                        prompts, params)
    for overlap in (True, False):
        llm = LLM(llama_dir, max_model_len=512, async_scheduling=overlap, **kw)
        assert _tokens(llm, prompts, params) == reference
        assert llm.engine.block_manager.prefix_hits > 0
        if kw.get("num_kv_blocks", 999) < 20:
            assert llm.engine.scheduler.num_preemptions > 0
        assert len(llm.engine.structured) == 0  # every matcher dropped with its sequence
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    for tokens in reference:
        assert_valid(tokenizer.decode(tokens[:-1]))  # without the EOS


LONG = list(range(40, 120))  # long enough for the prefill engine (min 16 uncached tokens)


def test_disaggregated_first_token_obeys_the_grammar(make_engine, llama_dir):
    spec = StructuredOutput(regex=r"[0-9]{6}")
    pair = DisaggPair(make_engine, min_tokens=16)
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=12, structured_output=spec) for s in range(4)]
    for i, p in enumerate(params):
        pair.decode.add_request(str(i), {"prompt_token_ids": LONG[i:]}, p)
    done = {}
    for _ in range(500):
        for out in pair.step():
            if out.finished:
                done[out.request_id] = out.outputs[0]
        if len(done) == 4:
            break
    assert pair.prefill.prompt_tokens_total > 0  # the prompts were prefilled remotely
    for output in done.values():
        assert re.fullmatch(r"[0-9]{6}", output.text), output.text
    # The prefill side sampled the first token, under the grammar: colocated (same seeds, same
    # first draw) samples the same one. (Later tokens differ: the decode side's seeded generator
    # starts afresh, a property of seeded sampling across disaggregation, grammar or not.)
    colocated = LLM(llama_dir, num_kv_blocks=128).generate([{"prompt_token_ids": LONG[i:]} for i in range(4)], params)
    assert [o.outputs[0].token_ids[0] for o in colocated] == [done[str(i)].token_ids[0] for i in range(4)]


def test_a_token_the_grammar_refuses_aborts_the_request(make_engine):
    """A first token from elsewhere that breaks the grammar (e.g. a peer that did not constrain)
    ends the request with finish_reason "abort" instead of sampling from an impossible state."""
    pair = DisaggPair(make_engine, min_tokens=16)
    tokenizer = pair.decode.tokenizer
    letter = tokenizer.encode("x", add_special_tokens=False)[0]
    resolve = pair.decode_conn.resolve
    pair.decode_conn.resolve = lambda job, result: resolve(job, LoadResult(result.ok, letter, result.logprobs))
    pair.decode.add_request("r", {"prompt_token_ids": LONG},
                            SamplingParams(max_tokens=8, structured_output=StructuredOutput(regex="[0-9]+")))
    out = None
    for _ in range(200):
        outs = [o for o in pair.step() if o.finished]
        if outs:
            out = outs[0]
            break
    assert out is not None and out.outputs[0].finish_reason == "abort"
    pair.drain()
    assert len(pair.decode.structured) == 0


@pytest.mark.parametrize("spec, message", [
    (StructuredOutput(json_schema="{not json"), "invalid JSON schema: not valid JSON"),
    (StructuredOutput(json_schema='{"type": "wat"}'), 'invalid JSON schema: Unsupported type "wat"'),
    (StructuredOutput(regex="(unclosed"), "invalid regex"),
    (StructuredOutput(grammar="root ::= "), "invalid grammar"),
    (StructuredOutput(structural_tag='{"type": "structural_tag", "format": {"type": "nope"}}'),
     "invalid structural tag"),
    # xgrammar accepts these keywords without enforcing them: refused rather than ignored.
    (StructuredOutput(json_schema='{"type": "array", "items": {"type": "integer"}, "uniqueItems": true}'),
     "the keyword 'uniqueItems' is not supported"),
    (StructuredOutput(json_schema='{"type": "object", "properties": {"a": {"type": "array", "contains": {}}}}'),
     "the keyword 'contains' is not supported"),
])
def test_bad_specs_are_value_errors(llm, spec, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        llm.generate("hi", SamplingParams(structured_output=spec))
    assert not llm.engine.has_unfinished_requests()


def test_keyword_names_as_property_names_are_fine(llm):
    schema = {"type": "object", "properties": {"contains": {"type": "boolean"}, "uniqueItems": {"enum": [1]}},
              "required": ["contains", "uniqueItems"], "additionalProperties": False}
    (out,) = llm.generate("hi", constrained(1, StructuredOutput(json_schema=json.dumps(schema))))
    assert json.loads(out.outputs[0].text).keys() == {"contains", "uniqueItems"}


def test_specs_and_params_validate_themselves():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a", json_object=True)
    with pytest.raises(ValueError, match="choice"):
        StructuredOutput(choice=())
    assert StructuredOutput(choice=["a", "b"]).choice == ("a", "b")  # hashable: the cache key
    for extra in ({"min_tokens": 2}, {"ignore_eos": True}):
        with pytest.raises(ValueError, match="structured output"):
            SamplingParams(structured_output=JSON_SPEC, **extra)


@pytest.mark.parametrize("string_schema", [{"type": "string", "maxLength": 4}, {"type": "string"}])
def test_json_strings_admit_only_valid_json_text(string_schema):
    """Two holes in xgrammar's grammars, closed by ours: a string with maxLength admits raw
    control characters (invalid JSON; xgrammar issue 800), and any string admits the UTF-8-style
    encoding of a surrogate (not UTF-8). Valid text still passes, and where xgrammar no longer
    has a hole our patch changes nothing."""
    xgr = pytest.importorskip("xgrammar")
    from tandem.engine.structured import _LENGTH_BOUNDED_CHAR, _NO_SURROGATES

    schema = json.dumps({"type": "object", "properties": {"s": string_schema}, "required": ["s"]})
    raw = xgr.Grammar.from_json_schema(schema, any_whitespace=False)
    fixed = build_grammar(StructuredOutput(json_schema=schema))
    assert _LENGTH_BOUNDED_CHAR not in str(fixed)
    if _LENGTH_BOUNDED_CHAR not in str(raw) and "[^" + _NO_SURROGATES in str(raw):  # fixed upstream
        assert str(fixed) == str(raw)
    vocab = [bytes([c]) for c in range(32, 127)] + [b"\x01", "é".encode(), "\ud7ff".encode(), b"\xed\xa0\x80"]
    tokenizer_info = xgr.TokenizerInfo(vocab)
    compiled = xgr.GrammarCompiler(tokenizer_info).compile_grammar(fixed)
    cases = [(b'{"s": "a~"}', True), ('{"s": "é\ud7ff"}'.encode(), True), (b'{"s": "a\x01"}', False),
             (b'{"s": "\xed\xa0\x80"}', False)]
    for text, ok in cases:
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        assert matcher.accept_string(text) == ok, text


def test_surrogate_patch_reaches_only_character_classes():
    from tandem.engine.structured import negated_classes_without_surrogates as patch

    ebnf = r'root ::= "[^a]" [^b] [a-z] x\n ::= Regex("[^c]", json_string=true) [^\"\]]'
    assert patch(ebnf) == r'root ::= "[^a]" [^\uD800-\uDFFFb] [a-z] x\n ::= Regex("[^c]", json_string=true) ' \
                          r'[^\uD800-\uDFFF\"\]]'
    assert patch(patch(ebnf)) == patch(ebnf)


def test_async_engine_compiles_off_the_event_loop(llama_dir):
    import asyncio
    import threading

    from tandem.engine.async_engine import AsyncLLM

    engine = AsyncLLM(LLMEngine(EngineConfig(model=llama_dir, device="cpu", num_kv_blocks=64)))
    compiled_on: list[str] = []
    real = engine.engine.grammars.compile

    def compile(spec):
        compiled_on.append(threading.current_thread().name)
        return real(spec)

    engine.engine.grammars.compile = compile

    async def run() -> str:
        text = ""
        async for out in engine.generate("hi", constrained(3)):
            text = out.outputs[0].text
        return text

    try:
        text = asyncio.run(run())
    finally:
        engine.shutdown()
    assert_valid(text)
    assert compiled_on and compiled_on[0] not in ("MainThread", "tandem-engine")


@pytest.mark.gpu
def test_overlap_and_graphs_keep_constrained_tokens_on_cuda(llama_dir):
    """On a GPU (CUDA graphs, the Triton mask kernel, pinned mask copies): overlap scheduling
    gives the step-by-step engine's tokens, and every output follows the schema."""
    prompts = [PROMPTS[i % 3] for i in range(12)]
    params = [constrained(seed) for seed in range(12)]
    runs = [_tokens(LLM(llama_dir, device="cuda", dtype="float32", num_kv_blocks=256, max_model_len=512,
                        async_scheduling=overlap), prompts, params) for overlap in (True, False)]
    assert runs[0] == runs[1]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    for tokens in runs[0]:
        assert_valid(tokenizer.decode(tokens[:-1]))
