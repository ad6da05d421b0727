"""Waiting-queue order (EngineConfig.scheduling_policy): "fcfs" admits in arrival order, "lof"
admits the longest requested output first (ties in arrival order), and a preempted sequence goes
back to the front under both. Whatever the order, every request gets its own tokens."""
from __future__ import annotations

import pytest

from tandem import LLM, SamplingParams
from tandem.engine.block_manager import BlockManager
from tandem.engine.config import EngineConfig
from tandem.engine.scheduler import Scheduler
from tandem.engine.sequence import Sequence


def _seq(name: str, prompt_len: int, max_tokens: int) -> Sequence:
    ids = list(range(1, prompt_len + 1))
    return Sequence(name, ids, SamplingParams(max_tokens=max_tokens), max_num_tokens=prompt_len + max_tokens)


def _admission_order(policy: str, specs: list[tuple[str, int, int]]) -> list[str]:
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=1, max_num_batched_tokens=64, policy=policy)
    for spec in specs:
        sched.add(_seq(*spec))
    order = []
    while sched.waiting:  # one sequence per step (max_num_seqs=1); finish it to admit the next
        out = sched.schedule()
        (scheduled,) = out.scheduled
        order.append(scheduled.seq.request_id)
        sched.finish(scheduled.seq, "length")
    return order


SPECS = [("a", 5, 3), ("b", 9, 40), ("c", 2, 7), ("d", 4, 40), ("e", 3, 1)]


def test_fcfs_admits_in_arrival_order():
    assert _admission_order("fcfs", SPECS) == ["a", "b", "c", "d", "e"]


def test_lof_admits_longest_output_first_ties_in_arrival_order():
    assert _admission_order("lof", SPECS) == ["b", "d", "c", "a", "e"]


def test_lof_keeps_preempted_sequences_ahead():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=64, policy="lof")
    victim = _seq("victim", 4, 2)
    sched.add(victim)
    sched.schedule()
    sched._preempt(victim)  # what the scheduler does when blocks run out
    sched.add(_seq("long", 4, 50))
    assert [s.request_id for s in sched.waiting] == ["victim", "long"]


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineConfig(model="x", scheduling_policy="sjf")
    with pytest.raises(ValueError, match="policy"):
        Scheduler(BlockManager(4, 4), 1, 8, policy="sjf")


def test_lof_changes_order_not_tokens(llama_dir):
    """Under a tight step budget the two policies batch differently; each request's greedy
    tokens must still be its own, and the long request must start first under "lof"."""
    prompts = [{"prompt_token_ids": [5 + i, 17, 40 + i, 9, 3 + i]} for i in range(6)]
    lengths = [2, 3, 4, 30, 5, 6]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    results = {}
    for policy in ("fcfs", "lof"):
        llm = LLM(llama_dir, scheduling_policy=policy, max_num_seqs=2, max_num_batched_tokens=8)
        engine = llm.engine
        for i, (p, sp) in enumerate(zip(prompts, params)):
            engine.add_request(f"r{i}", p, sp)
        engine.step()  # the first step admits what fits in 8 tokens: one 5-token prompt + 3 of the next
        started = [s.request_id for s in engine.scheduler.running]
        assert started == (["r3", "r5"] if policy == "lof" else ["r0", "r1"])
        tokens: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    tokens[out.request_id] = out.outputs[0].token_ids
        results[policy] = [tokens[f"r{i}"] for i in range(len(prompts))]
    assert [len(t) for t in results["lof"]] == lengths
    assert results["lof"] == results["fcfs"]


def test_long_prefill_cap_leaves_budget_to_a_short_prompt():
    """long_prefill_token_threshold: a long prompt mid-prefill no longer takes the whole step
    budget, so a short prompt that arrives behind it starts at once (without the cap it waits
    until the long prompt's last chunk)."""
    for cap, expected in ((0, [("long", 64)]), (48, [("long", 48), ("short", 10)])):
        sched = Scheduler(BlockManager(128, 4), max_num_seqs=4, max_num_batched_tokens=64,
                          long_prefill_token_threshold=cap)
        sched.add(_seq("long", 300, 4))
        sched.schedule()  # the long prompt's first chunk: it is now running, mid-prefill
        sched.running[0].num_computed_tokens += min(64, cap or 64)
        sched.add(_seq("short", 10, 4))
        out = sched.schedule()
        assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == expected, cap


def test_long_prefill_cap_is_validated():
    with pytest.raises(ValueError, match="long_prefill_token_threshold"):
        EngineConfig(model="x", long_prefill_token_threshold=-1)


def test_long_prefill_cap_changes_chunks_not_tokens(llama_dir):
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (40, 7, 23)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for cap in (0, 5):
        llm = LLM(llama_dir, max_num_batched_tokens=16, long_prefill_token_threshold=cap)
        outs[cap] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outs[5] == outs[0] and all(len(t) == 6 for t in outs[0])
