"""The host tier of the prefix cache (engine/host_tier.py) in a real engine on the CPU: a device
pool too small for the conversations forces evictions, evicted prefixes come back from the host
tier, and the tokens are exactly those of the engine without it (and of HF)."""
from __future__ import annotations

import random

import pytest

from tandem import LLM, SamplingParams
from tandem.engine import host_tier as host_tier_module
from tandem.engine.block_manager import BlockManager
from tandem.engine.host_tier import HostTier
from tandem.engine.sequence import Sequence
from tandem.protocol.kv_events import BlocksRemoved, BlocksStored, Tier
from tandem.protocol.prefix_hash import hash_full_blocks
from tests.engine.hf_oracle import hf_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


class HeldCopier:
    """Wraps the engine's copier; copies are queued and only run on `release()`, so a test can
    act while a copy is in flight."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.bytes_per_block = inner.bytes_per_block
        self.synchronous = False
        self.held: list[HeldCopy] = []

    def copy_out(self, device_ids, host_ids):
        return self._hold(lambda: self.inner.copy_out(device_ids, host_ids))

    def copy_in(self, host_ids, device_ids):
        return self._hold(lambda: self.inner.copy_in(host_ids, device_ids))

    def _hold(self, run) -> "HeldCopy":
        copy = HeldCopy(run)
        self.held.append(copy)
        return copy

    def release(self) -> None:
        for copy in self.held:
            copy.run()
        self.held = []


class HeldCopy:
    def __init__(self, run) -> None:
        self._run, self._done = run, None

    def run(self) -> None:
        self._done = self._run()

    def done(self) -> bool:
        return self._done is not None

    def wait(self) -> None:
        pass  # returns with the copy still held: the engine's next step finds it in flight

    def seconds(self) -> float:
        return self._done.seconds()


def _conversations(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randint(18, 30))] for _ in range(n)]


def _chat(llm: LLM, conversations: list[list[int]], turns: int) -> list[list[int]]:
    """Every conversation's turns in round-robin order; each turn's prompt is the previous
    prompt + its answer + a new user message. Returns every answer, in order."""
    rng = random.Random(1)
    histories = [list(c) for c in conversations]
    answers = []
    for _ in range(turns):
        for history in histories:
            out = llm.generate({"prompt_token_ids": history}, GREEDY)[0].outputs[0].token_ids
            answers.append(list(out))
            history += list(out) + [rng.randrange(3, 250) for _ in range(rng.randint(3, 9))]
    return answers


# A device pool of 24 blocks of 4 tokens holds about one conversation: each next conversation
# evicts the previous ones, so without the host tier every follow-up turn is a full prefill.
TINY_POOL = dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=32)


@pytest.mark.parametrize("kw", [{}, {"async_scheduling": False, "long_prefill_token_threshold": 8},
                                {"kv_cache_dtype": "fp8"}])  # FP8 blocks go out and back byte for byte
def test_greedy_tokens_identical_with_host_tier_on_and_off(llama_dir, kw):
    conversations = _conversations(4)
    off = LLM(llama_dir, **TINY_POOL, **kw)
    on = LLM(llama_dir, **TINY_POOL, host_kv_cache_gb=0.002, **kw)
    answers_off = _chat(off, conversations, turns=3)
    answers_on = _chat(on, conversations, turns=3)
    assert answers_on == answers_off
    stats = on.engine.stats()
    assert stats.host_cache_hits > 0 and stats.host_bytes_reloaded > 0 and stats.host_bytes_offloaded > 0
    assert stats.host_cache_hits > stats.prefix_cache_hits  # the device pool alone keeps little
    assert off.engine.stats().host_cache_hits == 0
    on.engine.step()  # retires the copies started by the last step
    on.engine.host_tier.check_invariants()
    on.engine.block_manager.check_invariants([])
    assert on.engine.block_manager.num_free_blocks == on.engine.block_manager.num_blocks


@pytest.mark.gpu
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_greedy_tokens_identical_with_host_tier_on_and_off_on_a_gpu(llama_dir, kv_cache_dtype):
    """The same on a GPU: pinned host memory, copies on side streams beside the steps (and
    CUDA graphs), float32 so that equal KV gives equal tokens."""
    conversations = _conversations(4)
    kw = dict(TINY_POOL, device="cuda", dtype="float32", kv_cache_dtype=kv_cache_dtype)
    answers_off = _chat(LLM(llama_dir, **kw), conversations, turns=3)
    on = LLM(llama_dir, **kw, host_kv_cache_gb=0.002)
    assert _chat(on, conversations, turns=3) == answers_off
    stats = on.engine.stats()
    assert stats.host_cache_hits > 0 and stats.host_reload_seconds > 0 and stats.host_offload_seconds > 0


def _engine_with_host_prefix(llama_dir):
    """An engine whose host tier, and not its device pool, holds `prefix`'s full blocks."""
    llm = LLM(llama_dir, **TINY_POOL, host_kv_cache_gb=0.002)
    eng = llm.engine
    eng.host_tier.lookahead_blocks = eng.block_manager.num_blocks  # copy out every cached free block
    prefix = _conversations(1, seed=3)[0]
    llm.generate({"prompt_token_ids": prefix}, GREEDY)
    llm.generate({"prompt_token_ids": [3, 4, 5]}, GREEDY)  # its step copies `prefix`'s blocks out
    eng.step()  # retires the copies
    eng.block_manager.reset_prefix_cache()  # the device pool forgets them; the host tier keeps them
    device_ids, device_hashes = eng.block_manager.match_prefix(prefix + [1])
    assert device_ids == [] and len(eng.host_tier.match(prefix + [1], device_hashes)) == len(prefix) // 4
    return llm, prefix


def test_reloaded_prefix_matches_hf(llama_dir):
    """The oracle: a prompt whose prefix came back from the host tier generates HF's tokens."""
    llm, prefix = _engine_with_host_prefix(llama_dir)
    prompt = prefix + [9, 8, 7]
    out = llm.generate({"prompt_token_ids": prompt}, GREEDY)[0]
    assert llm.engine.stats().host_cache_hits == out.num_cached_tokens == len(prefix) // 4 * 4
    assert list(out.outputs[0].token_ids) == hf_greedy(llama_dir, prompt, GREEDY.max_tokens)


def test_a_reload_waits_off_the_batch_while_others_run(llama_dir):
    llm, prefix = _engine_with_host_prefix(llama_dir)
    eng = llm.engine
    held = eng.host_tier.copier = HeldCopier(eng.host_tier.copier)
    eng.add_request("reload", {"prompt_token_ids": prefix + [1, 2]}, GREEDY)
    eng.add_request("other", {"prompt_token_ids": [3, 4, 5]}, GREEDY)
    outputs = []
    for _ in range(4):
        outputs += eng.step()
    assert [s.request_id for s in eng.scheduler.loading_from_host] == ["reload"]
    assert any(o.request_id == "other" and o.outputs[0].token_ids for o in outputs)  # it ran meanwhile
    held.release()
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
    assert len(done["reload"].outputs[0].token_ids) == GREEDY.max_tokens
    assert done["reload"].num_cached_tokens >= 12


def test_cancel_during_reload_frees_everything(llama_dir):
    llm, prefix = _engine_with_host_prefix(llama_dir)
    eng = llm.engine
    bm, host = eng.block_manager, eng.host_tier
    held = host.copier = HeldCopier(host.copier)
    eng.add_request("reload", {"prompt_token_ids": prefix + [1, 2]}, GREEDY)
    eng.step()
    (seq,) = eng.scheduler.loading_from_host
    reload_blocks = list(seq.block_ids)
    assert reload_blocks and held.held
    eng.abort_request("reload")
    assert eng.scheduler.loading_from_host == [] and not eng.has_unfinished_requests()
    # The copy still writes those blocks: none is free until it lands.
    pinned = set(host.device_pins())
    assert pinned and pinned <= set(reload_blocks)
    assert not any(bm.is_free(b) for b in pinned)
    bm.check_invariants([], host.device_pins())
    host.check_invariants()
    held.release()
    eng.step()  # retires the landed copies
    bm.check_invariants([], [])
    host.check_invariants()
    assert bm.num_free_blocks == bm.num_blocks and not host.busy and not any(host.pins)
    assert eng.stats().num_loading_from_host == 0


def test_events_name_the_tier_and_follow_each_blocks_stay(llama_dir):
    llm = LLM(llama_dir, **TINY_POOL, host_kv_cache_gb=0.002)
    first, other = _conversations(2, seed=4)
    llm.generate({"prompt_token_ids": first}, GREEDY)
    llm.generate({"prompt_token_ids": other + [6] * 48}, GREEDY)
    llm.engine.step()
    held = {Tier.GPU: set(), Tier.HOST: set()}
    for event in llm.engine.drain_cache_events():
        match event:
            case BlocksStored(hashes, _, tier):
                assert not held[tier] & set(hashes), "stored twice in one tier"
                held[tier] |= set(hashes)
            case BlocksRemoved(hashes, tier):
                assert set(hashes) <= held[tier], "removed from a tier that did not hold it"
                held[tier] -= set(hashes)
    host = llm.engine.host_tier
    assert held[Tier.HOST] == set(host._ready) and held[Tier.HOST]
    assert held[Tier.GPU] == set(llm.engine.block_manager.cached)


# ---------------------------------------------------------------------------- the tier alone
class _InstantCopier:
    bytes_per_block = 100
    synchronous = False  # pins held until `poll`, as on a GPU

    def copy_out(self, device_ids, host_ids):
        return host_tier_module._Done(0.001)

    def copy_in(self, host_ids, device_ids):
        return host_tier_module._Done(0.001)


def _cached_and_freed(bm: BlockManager, tokens: list[int]) -> Sequence:
    seq = Sequence(f"s{len(tokens)}-{tokens[0]}", tokens, SamplingParams())
    bm.admit(seq)
    bm.append_slots(seq, seq.num_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    bm.free(seq)
    return seq


def test_host_lru_evicts_the_least_recently_used():
    bm = BlockManager(8, 4)
    host = HostTier(bm, _InstantCopier(), num_blocks=2, lookahead_blocks=8)
    _cached_and_freed(bm, [1] * 9)  # 2 full blocks
    assert host.offload(reserve=0) == 2
    host.poll()
    assert host.num_ready_blocks == 2 and host.stats.bytes_offloaded == 200
    bm.drain_events()
    first_two = set(host._ready)
    _cached_and_freed(bm, [2] * 5)  # 1 more full block: the host tier must evict one of the first two
    assert host.offload(reserve=0) == 1
    host.poll()
    events = [e for e in bm.drain_events() if e.tier is Tier.HOST]
    assert [type(e) for e in events] == [BlocksRemoved, BlocksStored]
    # The chain's tail went first (a sequence frees its tail first), so its head outlives it.
    head, tail = hash_full_blocks([1] * 9, 4)
    assert events[0].block_hashes == [tail] and events[1].block_hashes[0] not in first_two
    assert head in host._ready
    assert host.stats.blocks_evicted == 1
    host.check_invariants()
    bm.check_invariants([], host.device_pins())


def test_a_busy_host_tier_drops_instead_of_waiting():
    bm = BlockManager(16, 4)
    held = HeldCopier(_InstantCopier())
    host = HostTier(bm, held, num_blocks=16, lookahead_blocks=16)
    for n in range(host_tier_module.MAX_OFFLOADS_IN_FLIGHT):  # that many batches in flight, none landed
        _cached_and_freed(bm, [10 + n] * 5)
        assert host.offload(reserve=0) == 1
    _cached_and_freed(bm, [20] * 5)
    assert host.offload(reserve=0) == 0 and host.stats.offloads_skipped_busy == 1
    held.release()
    host.poll()
    assert host.offload(reserve=0) == 1  # landed: the tier takes the next one
    held.release()
    host.poll()
    host.check_invariants()
    bm.check_invariants([], host.device_pins())
    assert host.num_ready_blocks == host_tier_module.MAX_OFFLOADS_IN_FLIGHT + 1


def test_offload_spares_the_reserve():
    bm = BlockManager(6, 4)
    host = HostTier(bm, _InstantCopier(), num_blocks=8, lookahead_blocks=6)
    _cached_and_freed(bm, [3] * 17)  # 4 full blocks, 5 blocks in all
    assert bm.num_free_blocks == 6
    assert host.offload(reserve=4) == 2  # 6 free, 4 kept free: at most 2 pinned
    assert bm.num_free_blocks == 4
    host.poll()
    assert bm.num_free_blocks == 6
    assert host.offload(reserve=4) == 2  # the next two
    host.poll()
    assert host.offload(reserve=0) == 0  # all four backed up: nothing left to copy
