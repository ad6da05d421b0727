"""Bad requests raise clear errors and leave the engine serving everything else."""
from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams
from tandem.engine.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(llama_dir, max_model_len=256)


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=-3), "max_tokens"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=-1.0), "temperature"),
    (dict(n=0), "n must"),
    (dict(logprobs=100), "logprobs"),
    (dict(stop=[""]), "stop"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens"),
])
def test_bad_sampling_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_engine_keeps_serving(llm):
    engine: LLMEngine = llm.engine
    ok = SamplingParams(temperature=0, max_tokens=4)
    engine.add_request("good", {"prompt_token_ids": [5, 6, 7]}, ok)
    bad_cases = [
        ("", "empty"),
        ({"prompt_token_ids": []}, "empty"),
        ({"prompt_token_ids": [5, engine.vocab_size]}, "out of the vocabulary"),
        ({"prompt_token_ids": [-1]}, "out of the vocabulary"),
        ({"prompt_token_ids": [5] * 300}, "context length"),
        ({"prompt_token_ids": [5] * 250}, "exceeds the context"),
        (12.5, "prompt must be"),
    ]
    for prompt, match in bad_cases:
        params = SamplingParams(max_tokens=10)
        with pytest.raises(ValueError, match=match):
            engine.add_request(f"bad-{match}", prompt, params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("good", {"prompt_token_ids": [5]}, ok)
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    final = [o for o in outputs if o.finished]
    assert [o.request_id for o in final] == ["good"]
    assert len(final[0].outputs[0].token_ids) == 4
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_generate_validates_whole_batch_first(llm):
    with pytest.raises(ValueError, match="prompt 1"):
        llm.generate(["hello", {"prompt_token_ids": []}], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(["hello"], SamplingParams(max_tokens=2, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 2


def test_missing_model_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path))
