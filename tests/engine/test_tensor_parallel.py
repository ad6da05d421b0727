"""Tensor parallelism on the CPU over gloo, through the offline API (`LLM(...,
tensor_parallel_size=N)`, which starts and stops its rank processes itself): greedy tokens
identical to HF transformers (fp32) for TP=2 and TP=4 on llama, on qwen3 with fewer KV heads
than ranks (KV heads replicated), on MoE models with TP attention; under chunked prefill, mixed
steps, overlap scheduling and preemption; the shard arithmetic; clear errors; no rank process
outlives its LLM (shutdown, garbage collection, or rank 0 killed)."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.engine.hf_oracle import hf_greedy
from tandem import LLM, SamplingParams
from tandem.engine.tensor_parallel import check_tensor_parallel, head_shard, vocab_shard
from tandem.engine.tp_ranks import check_devices

PROMPT_LENS = [1, 3, 16, 17, 40, 70, 129]
MAX_TOKENS = [6, 12, 3, 9, 16, 5, 8]


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(5, vocab) for _ in range(n)] for n in PROMPT_LENS]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(map(_alive, pids)):
        time.sleep(0.1)
    return [pid for pid in pids if _alive(pid)]


# ------------------------------------------------------------------------- shard arithmetic
def test_heads_split_and_kv_heads_replicate_beyond_their_count():
    # 8 query heads over 4 KV heads (GQA group of 2)
    for world in (1, 2, 4, 8):
        shards = [head_shard(8, 4, r, world) for r in range(world)]
        assert [h for s in shards for h in s.q_heads] == list(range(8))
        for s in shards:  # every query head's KV head (h // 2) is on its rank
            assert all(h // 2 in s.kv_heads for h in s.q_heads)
        if world <= 4:
            assert [h for s in shards for h in s.kv_heads] == list(range(4))
    assert [list(head_shard(8, 2, r, 8).kv_heads) for r in range(8)] == [[0]] * 4 + [[1]] * 4


def test_vocab_slices_cover_the_vocabulary_once():
    for vocab, world in [(1024, 2), (1000, 3), (7, 4)]:
        slices = [vocab_shard(vocab, r, world) for r in range(world)]
        assert [t for rows, _ in slices for t in rows] == list(range(vocab))
        assert all(len(rows) <= per for rows, per in slices)


@pytest.mark.parametrize("heads,kv,inter,world,message", [
    (4, 2, 128, 3, "num_attention_heads"),
    (8, 2, 128, 4, None),
    (8, 4, 128, 8, None),
    (8, 3, 128, 2, "num_key_value_heads"),
    (12, 4, 128, 6, "not a multiple"),
    (4, 2, 130, 4, "intermediate_size"),
])
def test_shapes_that_do_not_split_are_refused(heads, kv, inter, world, message):
    from types import SimpleNamespace

    config = SimpleNamespace(num_attention_heads=heads, num_key_value_heads=kv, intermediate_size=inter)
    if message is None:
        check_tensor_parallel(config, world)
    else:
        with pytest.raises(ValueError, match=message):
            check_tensor_parallel(config, world)


# ------------------------------------------------------------------------- end to end
CASES = [
    ("llama", 2, {}),
    ("llama", 4, {"max_num_batched_tokens": 32}),  # chunked prefill, mixed steps
    ("qwen3", 4, {}),  # 2 KV heads over 4 ranks: each replicated twice
    ("qwen3_moe", 2, {"num_kv_blocks": 11}),  # preemption
    ("mixtral", 4, {}),
]


@pytest.mark.parametrize("arch,tp,overrides", CASES, ids=[f"{a}-tp{t}" for a, t, _ in CASES])
def test_greedy_matches_hf(model_dirs, arch, tp, overrides):
    model_dir = model_dirs[arch]
    with LLM(model_dir, device="cpu", dtype="float32", tensor_parallel_size=tp, **overrides) as llm:
        model = llm.engine.runner.model
        attn = model.layers[0].self_attn
        assert (attn.num_heads, len(llm.rank_pids)) == (model.config.num_attention_heads // tp, tp - 1)
        assert llm.engine.runner.kv_cache.shape[4] == max(1, model.config.num_key_value_heads // tp)
        prompts = _prompts(llm.engine.vocab_size)
        params = [SamplingParams(temperature=0.0, max_tokens=m) for m in MAX_TOKENS]
        for _ in range(2):  # the second round starts from paused ranks (and hits the prefix cache)
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
            for i, (p, m, out) in enumerate(zip(prompts, MAX_TOKENS, outs)):
                assert out.outputs[0].token_ids == hf_greedy(model_dir, p, m), f"prompt {i} (len {len(p)})"
        stats = llm.engine.stats()
        if "num_kv_blocks" in overrides:
            assert stats.num_preemptions > 0
        assert stats.num_free_blocks == stats.num_total_blocks
        pids = llm.rank_pids
    assert _wait_gone(pids, timeout=5) == [], "rank processes outlived LLM.shutdown()"


# ------------------------------------------------------------------------- errors
def test_clear_errors(llama_dir):
    with pytest.raises(ValueError, match="num_attention_heads .4. is not divisible by tensor_parallel_size .3."):
        LLM(llama_dir, device="cpu", tensor_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        LLM(llama_dir, device="cpu", tensor_parallel_size=0)
    with pytest.raises(ValueError, match="host KV tier"):
        LLM(llama_dir, device="cpu", tensor_parallel_size=2, host_kv_cache_gb=0.01)
    with pytest.raises(ValueError, match="neither runner_factory nor weights"):
        LLM(llama_dir, device="cpu", tensor_parallel_size=2, weights=[])
    with pytest.raises(ValueError, match="needs GPUs 0..1, but 0 are visible"):
        check_devices("cuda", 2) if not _has_cuda() else check_devices("cuda", 1 + _cuda_count())


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count()


# ------------------------------------------------------------------------- lifetimes
def test_ranks_end_when_the_llm_is_collected(llama_dir):
    import gc

    llm = LLM(llama_dir, device="cpu", dtype="float32", tensor_parallel_size=2)
    llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(temperature=0.0, max_tokens=2))
    pids = llm.rank_pids
    del llm
    gc.collect()
    assert _wait_gone(pids, timeout=15) == []


def test_ranks_exit_when_rank_0_is_killed(llama_dir, tmp_path):
    """SIGKILL leaves no atexit handler to run: the ranks must notice on their own."""
    script = tmp_path / "rank0.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from tandem import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM({llama_dir!r}, device="cpu", dtype="float32", tensor_parallel_size=2)
            llm.generate({{"prompt_token_ids": [5, 6, 7]}}, SamplingParams(temperature=0.0, max_tokens=2))
            print(*llm.rank_pids, flush=True)
            time.sleep(600)
    """))
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        pids = [int(p) for p in line.split()]
        assert pids and all(map(_alive, pids)), f"rank 0 printed {line!r}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert _wait_gone(pids, timeout=30) == [], "orphaned rank processes after rank 0 was killed"


# ------------------------------------------------------------------------- lockstep channel
def test_paused_followers_outwait_the_collective_timeout():
    """Between bursts the follower waits on the store (its polls time out and it waits again),
    not in a collective: an idle gap over twice the group's timeout breaks nothing."""
    import threading
    from datetime import timedelta

    import torch
    from torch.distributed import TCPStore

    from tandem.engine.model_runner import StepLayout
    from tandem.engine.tensor_parallel import TensorParallelGroup
    from tandem.engine.tp_runner import LockstepChannel, StepOp

    store = TCPStore("127.0.0.1", 0, 2, True, timeout=timedelta(seconds=10), wait_for_workers=False)
    groups: dict[int, TensorParallelGroup] = {}

    def join(rank: int) -> None:
        # A client of its own per rank: one client's blocking wait would hold the other rank's set.
        client = TCPStore("127.0.0.1", store.port, 2, False, timeout=timedelta(seconds=10))
        groups[rank] = TensorParallelGroup(client, rank, 2, "cpu", "tp/channel-test", timeout_s=3.0)

    threads = [threading.Thread(target=join, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    leader, follower = LockstepChannel(groups[0]), LockstepChannel(groups[1])
    follower.WAKE_POLL = timedelta(milliseconds=200)
    received: list = []

    def follow() -> None:
        while True:
            op, layout, buffer, message = follower.receive()
            received.append((op, layout, None if buffer is None else buffer.tolist(), message))
            if op == StepOp.STOP:
                return

    thread = threading.Thread(target=follow)
    thread.start()
    layout = StepLayout(1, 1, True, (1, 1, 1, 1, 2, 1, 0, 0, 1))
    buffer = torch.arange(8, dtype=torch.int64)
    leader.send_step(layout, buffer)
    leader.pause()
    time.sleep(7.0)  # idle: over twice the collective timeout
    leader.send_step(layout, buffer + 1, message=b"\x00save ops\xff")
    leader.stop()
    thread.join(timeout=10)
    assert not thread.is_alive()
    assert [r[0] for r in received] == [StepOp.STEP, StepOp.PAUSE, StepOp.STEP, StepOp.STOP]
    assert received[0][1:] == (layout, list(range(8)), b"")
    assert received[2][2:] == (list(range(1, 9)), b"\x00save ops\xff")
