"""The disaggregated engine path in one process: a decode engine whose long prompts are prefilled
by a prefill engine through the `KVConnector` port (`tests/engine/fake_connector.py` joins the
two with tensor copies). Greedy tokens must equal colocated and HF; cancelled, failed and broken
transfers must free every block on both sides."""
from __future__ import annotations

import random


from tandem import LLM, SamplingParams
from tandem.engine.llm_engine import LLMEngine
from tests.engine.fake_connector import DisaggPair
from tests.engine.hf_oracle import hf_greedy

MAX_TOKENS = 6
MIN_REMOTE_TOKENS = 16


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(5, 600) for _ in range(32)]  # two full blocks: a prefix hit on both sides
    lens = [3, 20, 40, 70, 100, 9, 130, 33][:n]
    return [(shared if i % 2 else []) + [rng.randrange(5, 600) for _ in range(m)] for i, m in enumerate(lens)]


def all_free(engine: LLMEngine) -> bool:
    bm = engine.block_manager
    bm.check_invariants([])
    return bm.num_free_blocks == bm.num_blocks and not engine.scheduler.waiting_for_kv


def test_greedy_tokens_equal_colocated_and_hf(make_engine, llama_dir):
    batch = prompts(8)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    pair = DisaggPair(make_engine, MIN_REMOTE_TOKENS)
    got = pair.generate(batch, params)
    colocated = [o.outputs[0].token_ids for o in LLM(llama_dir, num_kv_blocks=128).generate(
        [{"prompt_token_ids": p} for p in batch], params)]
    assert got == colocated
    assert got == [hf_greedy(llama_dir, p, MAX_TOKENS) for p in batch]
    # The long prompts really went through the prefill engine (its prompt tokens), the short
    # ones did not, and nothing is left held on either side.
    long_prompts = [p for p in batch if len(p) >= MIN_REMOTE_TOKENS]
    assert pair.prefill.prompt_tokens_total == sum(len(p) for p in long_prompts)
    assert ("copied", 0) in pair.log
    assert all_free(pair.decode) and all_free(pair.prefill)


def test_cancel_while_waiting_for_kv_frees_both_sides(make_engine):
    pair = DisaggPair(make_engine, MIN_REMOTE_TOKENS)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    long_prompt = prompts(5)[4]
    pair.decode.add_request("r", {"prompt_token_ids": long_prompt}, params)
    pair.decode.step()  # admitted to wait for KV; blocks allocated on the decode side
    assert len(pair.decode.scheduler.waiting_for_kv) == 1
    assert pair.decode.block_manager.num_free_blocks < pair.decode.block_manager.num_blocks
    pair.step()  # the prefill engine took it and is computing (chunked: 48 tokens a step)
    assert pair.prefill.has_unfinished_requests()
    out = pair.decode.abort_request("r")
    assert out.finished and out.outputs[0].finish_reason == "abort"
    assert all_free(pair.decode)  # at once, and the load was cancelled before the free
    pair.step()  # the cancellation reaches the prefill side: aborted mid-prompt, blocks freed
    assert not pair.prefill.has_unfinished_requests()
    assert all_free(pair.prefill)


def test_failed_load_falls_back_to_a_local_prefill(make_engine, llama_dir):
    batch = prompts(6, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    pair = DisaggPair(make_engine, MIN_REMOTE_TOKENS, fail_prefills=True)
    assert pair.generate(batch, params) == [hf_greedy(llama_dir, p, MAX_TOKENS) for p in batch]
    assert pair.prefill.prompt_tokens_total == 0  # every prompt was computed on the decode side
    assert all_free(pair.decode)


def test_prefill_side_save_error_frees_blocks_and_decode_recomputes(make_engine, llama_dir):
    batch = prompts(6, seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    pair = DisaggPair(make_engine, MIN_REMOTE_TOKENS, fail_saves=True)
    assert pair.generate(batch, params) == [hf_greedy(llama_dir, p, MAX_TOKENS) for p in batch]
    assert pair.prefill.prompt_tokens_total > 0  # the prefills ran, their saves broke
    assert all_free(pair.decode) and all_free(pair.prefill)


def test_layers_are_handed_to_the_connector_during_the_forward(make_engine):
    """Each layer is copied right after it is computed, before the next layer runs."""
    pair = DisaggPair(make_engine, MIN_REMOTE_TOKENS)
    pair.generate([prompts(5)[4]], SamplingParams(temperature=0.0, max_tokens=2))
    num_layers = pair.decode.runner.kv_cache.shape[0]
    # The step that completed the prompt: computed(i), copied(i) for every layer, in order.
    assert pair.log[-2 * num_layers:] == [e for i in range(num_layers) for e in (("computed", i), ("copied", i))]
