"""Expert parallelism across 2 real processes over gloo on the CPU: each rank holds half of the
experts of every MoE layer. Greedy tokens through the whole engine equal HF transformers' and the
single-process model's; logits of a forward pass where each rank brings a different batch (data
parallel attention) equal the single-process model's; both dispatch paths (all-to-all, and the
all-gather fallback for gloo builds without all-to-all) are exercised."""
from __future__ import annotations

import functools
import multiprocessing as mp
import queue
import socket
import time
import traceback
from datetime import timedelta

import pytest
import torch

from tests.engine.hf_oracle import hf_greedy
from tests.engine.model_logits import prefill_logits
from tests.engine.test_moe_models import MAX_TOKENS, make_prompts
from tandem.engine.expert_parallel import expert_range

WORLD = 2
DISPATCH_MODES = ("all_to_all", "all_gather")
ARCHS = ("qwen3_moe", "mixtral")


def test_expert_range_splits_every_expert_once():
    for num_experts, world in [(8, 2), (128, 8), (10, 4), (3, 4)]:
        ranges = [expert_range(num_experts, r, world) for r in range(world)]
        assert [e for r in ranges for e in r] == list(range(num_experts))
        assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


# ----------------------------------------------------------------------------- child process
def _ep_worker(rank: int, port: int, model_dirs: dict[str, str], results: mp.Queue) -> None:
    try:
        from torch.distributed import TCPStore

        from tandem import LLM, SamplingParams
        from tandem.engine.ep_runner import ExpertParallelModelRunner
        from tandem.engine.expert_parallel import ExpertParallelGroup

        torch.set_num_threads(1)
        store = TCPStore("127.0.0.1", port, WORLD, rank == 0, timeout=timedelta(seconds=60))
        out: dict = {"rank": rank}
        groups = {mode: ExpertParallelGroup(store, rank, WORLD, "cpu", prefix=f"ep/{mode}", dispatch=mode,
                                            timeout_s=60) for mode in DISPATCH_MODES}
        for arch in ARCHS:
            model_dir = model_dirs[arch]
            whole = LLM(model_dir, device="cpu", dtype="float32").engine.runner.model
            prompts = make_prompts(whole.config.vocab_size)
            mine = prompts[:6] if rank == 0 else prompts[6:]  # data-parallel attention: own batches
            expected_logits = prefill_logits(whole, mine)
            for mode, ep in groups.items():
                llm = LLM(model_dir, device="cpu", dtype="float32", max_num_batched_tokens=256,
                          runner_factory=functools.partial(ExpertParallelModelRunner, ep=ep))
                model = llm.engine.runner.model
                experts = model.layers[0].mlp.experts
                out[(mode, arch, "local_experts")] = (experts.first, experts.gate_up_proj.shape[0])
                params = [SamplingParams(temperature=0.0, max_tokens=m) for m in MAX_TOKENS]
                outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
                out[(mode, arch, "tokens")] = [o.outputs[0].token_ids for o in outs]
                ep_logits = prefill_logits(model, mine)
                out[(mode, arch, "logits_err")] = (ep_logits - expected_logits).abs().max().item()
                out[(mode, arch, "argmax_equal")] = torch.equal(ep_logits.argmax(-1), expected_logits.argmax(-1))

        for mode, ep in groups.items():
            # A rank with no tokens still takes part in the collective. Expert e scales by e + 1.
            num_tokens = 7 if rank == 0 else 0
            x, w = torch.randn(num_tokens, 16), torch.rand(num_tokens, 2)
            ids = torch.randint(0, 8, (num_tokens, 2))
            scale, first = torch.arange(1.0, 9.0), ep.expert_range(8).start
            y = ep.run_experts(x, w, ids, 8, lambda rows, local_ids: rows * scale[local_ids + first, None])
            err = (y - x * (w * scale[ids]).sum(-1, keepdim=True)).abs().max().item() if num_tokens else 0.0
            out[(mode, "empty_rank")] = (tuple(y.shape), err)
        results.put(out)
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc()})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(target, *args, timeout: float) -> list[dict]:
    """Spawn WORLD ranks of `target(rank, port, *args, results)`; each puts one dict."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=target, args=(rank, port, *args, results)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    try:
        return [results.get(timeout=timeout) for _ in procs]
    except queue.Empty:
        pytest.fail("an expert-parallel rank did not answer in time")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


@pytest.fixture(scope="module")
def ep_results(model_dirs) -> list[dict]:
    outs = _run_ranks(_ep_worker, model_dirs, timeout=240)
    for out in outs:
        assert "error" not in out, f"rank {out['rank']} failed:\n{out.get('error')}"
    return sorted(outs, key=lambda o: o["rank"])


@pytest.mark.parametrize("mode", DISPATCH_MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_parallel_greedy_matches_hf(ep_results, model_dirs, arch, mode):
    model_dir = model_dirs[arch]
    assert [r[(mode, arch, "local_experts")] for r in ep_results] == [(0, 4), (4, 4)], "each rank half the experts"
    expected = [hf_greedy(model_dir, p, m) for p, m in zip(_prompts_for(model_dir), MAX_TOKENS)]
    for r in ep_results:
        assert r[(mode, arch, "tokens")] == expected, f"rank {r['rank']} diverged from HF"


@pytest.mark.parametrize("mode", DISPATCH_MODES)
@pytest.mark.parametrize("arch", ARCHS)
def test_expert_parallel_logits_match_single_process(ep_results, arch, mode):
    for r in ep_results:
        assert r[(mode, arch, "argmax_equal")]
        assert r[(mode, arch, "logits_err")] < 1e-4, r[(mode, arch, "logits_err")]


@pytest.mark.parametrize("mode", DISPATCH_MODES)
def test_rank_without_tokens_takes_part(ep_results, mode):
    (shape0, err0), (shape1, _) = (r[(mode, "empty_rank")] for r in ep_results)
    assert shape0 == (7, 16) and err0 < 1e-5
    assert shape1 == (0, 16)


# ------------------------------------------------------- unequal work: engine-level step sync
# Rank 0 brings several long-running requests, rank 1 one short request (then nothing), or none
# at all, or starts late: each rank's engine steps with the group (a dummy forward when it has
# nothing scheduled) until no rank has work, and every output equals the single-process model's.
UNEQUAL = {  # scenario -> per rank: (prompt indices, max_tokens)
    "one_short": ([(0, 9), (1, 4), (2, 12), (3, 7)], [(4, 2)]),
    "one_empty": ([(5, 6), (6, 3)], []),
    "mirror": ([(7, 1)], [(8, 10), (9, 5), (0, 3)]),
}
ASYNC_DELAY_S = 0.3  # rank 1's request arrives this late: its engine idles in step first


def _unequal_worker(rank: int, port: int, model_dir: str, results: mp.Queue) -> None:
    import asyncio
    import os

    try:
        from torch.distributed import TCPStore

        from tandem import LLM, SamplingParams
        from tandem.engine.async_engine import AsyncLLM
        from tandem.engine.ep_runner import ExpertParallelModelRunner
        from tandem.engine.expert_parallel import ExpertParallelGroup

        torch.set_num_threads(1)
        store = TCPStore("127.0.0.1", port, WORLD, rank == 0, timeout=timedelta(seconds=60))
        prompts = _prompts_for(model_dir)

        def params(max_tokens: int) -> SamplingParams:
            return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

        out: dict = {"rank": rank, "reference": {}}
        reference = LLM(model_dir, device="cpu", dtype="float32")
        for scenario, per_rank in UNEQUAL.items():
            for i, m in per_rank[rank]:
                out["reference"][(i, m)] = reference.generate({"prompt_token_ids": prompts[i]},
                                                              params(m))[0].outputs[0].token_ids
        for mode in DISPATCH_MODES:
            ep = ExpertParallelGroup(store, rank, WORLD, "cpu", prefix=f"ep-unequal/{mode}", dispatch=mode,
                                     timeout_s=60)
            llm = LLM(model_dir, device="cpu", dtype="float32", max_num_batched_tokens=64,
                      runner_factory=functools.partial(ExpertParallelModelRunner, ep=ep))
            steps = []
            for scenario, per_rank in UNEQUAL.items():
                mine = per_rank[rank]
                before = int(llm.engine.runner.model.expert_load.num_steps)
                outs = llm.generate([{"prompt_token_ids": prompts[i]} for i, _ in mine], [params(m) for _, m in mine])
                out[(mode, scenario)] = [o.outputs[0].token_ids for o in outs]
                steps.append(int(llm.engine.runner.model.expert_load.num_steps) - before)
            out[(mode, "forwards_with_tokens")] = steps

            # The serving loop: rank 1's request arrives late; rank 0's engine must not wait for it.
            engine = AsyncLLM(llm.engine)
            mine = UNEQUAL["one_short"][rank]

            async def run_async():
                if rank == 1:
                    await asyncio.sleep(ASYNC_DELAY_S)

                async def one(i, m):
                    tokens = []
                    async for o in engine.generate({"prompt_token_ids": prompts[i]}, params(m)):
                        tokens = o.outputs[0].token_ids
                    return tokens

                return await asyncio.gather(*(one(i, m) for i, m in mine))

            out[(mode, "async")] = asyncio.run(run_async())
            store.add(f"async-done/{mode}", 1)
            while store.add(f"async-done/{mode}", 0) < WORLD:  # both ranks served everything
                time.sleep(0.01)
            # Leave the engine loop stepping with the group: no rank stops before the other.
            out[(mode, "async_ok")] = not engine.is_dead
        # The store's server lives in rank 0's process: rank 0 leaves only after every rank has
        # made its last store call (else a rank still polling above gets "connection reset").
        store.add("left-store", 1)
        while rank == 0 and store.add("left-store", 0) < WORLD:
            time.sleep(0.01)
        results.put(out)
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc()})
    # The async engines keep stepping together until the processes go; exit without waiting.
    results.close()
    results.join_thread()
    os._exit(0)


@pytest.fixture(scope="module")
def unequal_results(model_dirs) -> list[dict]:
    outs = _run_ranks(_unequal_worker, model_dirs["qwen3_moe"], timeout=240)
    for out in outs:
        assert "error" not in out, f"rank {out['rank']} failed:\n{out.get('error')}"
    return sorted(outs, key=lambda o: o["rank"])


@pytest.mark.parametrize("mode", DISPATCH_MODES)
def test_ranks_with_unequal_work_match_single_process(unequal_results, mode):
    for r in unequal_results:
        for scenario, per_rank in UNEQUAL.items():
            expected = [r["reference"][(i, m)] for i, m in per_rank[r["rank"]]]
            assert r[(mode, scenario)] == expected, (r["rank"], scenario)
            assert all(len(t) == m for t, (_, m) in zip(r[(mode, scenario)], per_rank[r["rank"]]))
        # Idle padding forwards are not counted as expert load: a rank's own forwards differ.
        steps0, steps1 = (o[(mode, "forwards_with_tokens")] for o in unequal_results)
        assert steps0[0] > steps1[0] > 0 and steps1[1] == 0, (steps0, steps1)


@pytest.mark.parametrize("mode", DISPATCH_MODES)
def test_async_engine_steps_with_the_group_while_idle(unequal_results, mode):
    for r in unequal_results:
        expected = [r["reference"][(i, m)] for i, m in UNEQUAL["one_short"][r["rank"]]]
        assert r[(mode, "async")] == expected, r["rank"]
        assert r[(mode, "async_ok")]


def _prompts_for(model_dir: str) -> list[list[int]]:
    from transformers import AutoConfig

    return make_prompts(AutoConfig.from_pretrained(model_dir).vocab_size)


# ------------------------------------------------------------------------------ GPUs (NCCL)
def _nccl_worker(rank: int, port: int, results: mp.Queue) -> None:
    try:
        from torch.distributed import TCPStore

        from tandem.kernels.fused_moe import fused_moe
        from tandem.engine.expert_parallel import ExpertParallelGroup

        torch.cuda.set_device(rank)
        store = TCPStore("127.0.0.1", port, WORLD, rank == 0, timeout=timedelta(seconds=60))
        ep = ExpertParallelGroup(store, rank, WORLD, f"cuda:{rank}", prefix="ep/nccl", timeout_s=60)
        torch.manual_seed(0)  # same weights on both ranks; each keeps its slice
        hidden, inter, num_experts, top_k = 2048, 768, 128, 8
        w13 = (torch.randn(num_experts, 2 * inter, hidden, device="cuda") / hidden**0.5).to(torch.bfloat16)
        w2 = (torch.randn(num_experts, hidden, inter, device="cuda") / inter**0.5).to(torch.bfloat16)
        torch.manual_seed(1 + rank)  # each rank its own batch
        num_tokens = 300 if rank == 0 else 57
        x = torch.randn(num_tokens, hidden, device="cuda").to(torch.bfloat16)
        weights, ids = torch.topk(torch.softmax(torch.randn(num_tokens, num_experts, device="cuda"), -1), top_k)
        mine = ep.expert_range(num_experts)

        def local_experts(rows, local_ids):
            ones = torch.ones((rows.shape[0], 1), device="cuda")
            return fused_moe(rows, w13[mine.start : mine.stop], w2[mine.start : mine.stop], ones, local_ids[:, None])

        out = ep.run_experts(x, weights, ids, num_experts, local_experts)
        full = fused_moe(x, w13, w2, weights, ids)
        err = ((out.double() - full.double()).norm() / full.double().norm()).item()
        results.put({"rank": rank, "mode": ep.dispatch_mode, "err": err})
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc()})


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_all_to_all_matches_one_gpu_gpu():
    outs = _run_ranks(_nccl_worker, timeout=180)
    for out in outs:
        assert "error" not in out, out.get("error")
        assert out["mode"] == "all_to_all"
        assert out["err"] < 1e-2, out
