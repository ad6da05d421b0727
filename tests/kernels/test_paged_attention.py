"""Paged decode and prefill attention (Triton) against the plain-torch reference."""
from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.kernel_testing import TOLERANCE, assert_close, device, poisoned_allocations
from tandem.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_decode_attention_split,
    paged_prefill_attention,
    paged_prefill_attention_ref,
    plan_decode_splits,
)


def make_paged_kv(context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, dtype, spare_blocks: int = 3):
    """A cache holding every sequence's context in shuffled, non-adjacent blocks; the block table
    is padded with stale block ids (never read: past each context)."""
    dev = device()
    blocks_per_seq = [math.ceil(n / block_size) for n in context_lens]
    max_blocks = max(max(blocks_per_seq, default=0), 1) + 1
    num_blocks = sum(blocks_per_seq) + spare_blocks
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=dev)
    v_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=dev)
    order = torch.randperm(num_blocks, device=dev)
    block_tables = torch.randint(0, num_blocks, (len(context_lens), max_blocks), device=dev)
    used = 0
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = order[used : used + n]
        used += n
    lens = torch.tensor(context_lens, dtype=torch.int32, device=dev)
    return k_cache, v_cache, block_tables.to(torch.int32), lens


def run_decode(context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype, split=None):
    k_cache, v_cache, block_tables, lens = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(context_lens), num_q_heads, head_dim, dtype=dtype, device=k_cache.device)
    scale = head_dim**-0.5
    with poisoned_allocations():
        if split is None:
            out = paged_decode_attention(q, k_cache, v_cache, block_tables, lens, scale)
        else:
            out = paged_decode_attention_split(q, k_cache, v_cache, block_tables, lens, scale, *split)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, scale)
    assert_close(out, ref, TOLERANCE[dtype])


def run_prefill(q_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype):
    k_cache, v_cache, block_tables, lens = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, dtype)
    dev = k_cache.device
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, dtype=dtype, device=dev)
    scale = head_dim**-0.5
    with poisoned_allocations():
        out = paged_prefill_attention(q, k_cache, v_cache, cu, block_tables, lens, scale)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, cu, block_tables, lens, scale)
    assert_close(out, ref, TOLERANCE[dtype])


# --- CPU (interpreter) and GPU alike: small shapes ---------------------------------------------

@pytest.mark.parametrize(
    "context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype",
    [
        ([1, 13, 37], 4, 4, 32, 4, torch.float32),  # MHA, contexts not multiples of the block
        ([29, 16], 8, 2, 16, 16, torch.float16),  # GQA 4
        ([5, 0, 21], 6, 2, 24, 8, torch.float32),  # GQA 3, head_dim 24 (padded), an empty slot
    ],
)
def test_decode_matches_ref(context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype):
    run_decode(context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_split_over_context_matches_ref(dtype):
    # 16-position splits: up to 5 splits per sequence, some sequences end inside a split,
    # one ends exactly on a split boundary, one is empty (all its splits skipped).
    run_decode([70, 32, 9, 0], 4, 2, 16, 4, dtype, split=(5, 16, 16))


def test_decode_splits_follow_the_live_context():
    # 3 splits of at least 16: a 200-token context gets splits of 80 (cdiv(67, 16) * 16), the
    # last one partial; a 17-token one gets two splits; a 16-token one exactly one.
    run_decode([200, 17, 16, 3], 4, 2, 16, 8, torch.float32, split=(3, 16, 16))


def test_decode_split_plan_from_shapes():
    # One sequence on a big GPU: many splits; a full batch: one split; never an empty split.
    num_splits, split_len = plan_decode_splits(1, 8, 8192, 64, 132)
    assert num_splits > 8 and split_len % 64 == 0 and (num_splits - 1) * split_len < 8192
    assert plan_decode_splits(256, 8, 8192, 64, 132)[0] == 1
    assert plan_decode_splits(1, 8, 100, 64, 132) == (1, 128)


@pytest.mark.parametrize(
    "q_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype",
    [
        ([9], [9], 2, 2, 16, 4, torch.float32),  # plain causal prefill
        ([5, 1, 17], [12, 1, 17], 4, 2, 32, 4, torch.float32),  # prefix hit, 1-token seq
        ([6, 0, 3], [21, 5, 3], 8, 2, 16, 8, torch.float16),  # GQA 4, empty seq in the middle
        ([4, 11], [30, 11], 3, 1, 16, 16, torch.float32),  # GQA 3, chunk after 26 cached
    ],
)
def test_prefill_matches_ref(q_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype):
    run_prefill(q_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype)


def test_prefill_step_with_many_decodes():
    # A mixed step: one-token sequences (decodes) around two prompt chunks, all in the prefill
    # kernel. Every row is written: the output is allocated poisoned. (Sending the decodes to the
    # split decode kernel instead was measured slower on H100: bench/results/engine_*.md.)
    contexts = [1, 70, 16, 17, 33, 64, 5, 48, 9, 2]
    run_prefill([1] * 5 + [9] + [1] * 4 + [4, 1], contexts[:5] + [9] + contexts[5:9] + [40, contexts[9]],
                4, 2, 16, 4, torch.float32)


def test_prefill_every_alignment():
    # One batch whose sequences start their queries at every offset around a 16-position tile
    # (the causal diagonal lands on each column of the KV tile at least once).
    prefixes = list(range(0, 35))
    run_prefill([5] * len(prefixes), [p + 5 for p in prefixes], 2, 1, 16, 4, torch.float32)


def test_decode_every_alignment():
    run_decode(list(range(1, 40)), 2, 1, 16, 4, torch.float32, split=(3, 16, 16))


def test_prefill_padded_as_the_mixed_step_graph_pads():
    """The layout `engine.cuda_graphs.CudaGraphMixed` replays: the batch padded to a fixed
    sequence count (padded sequences: no query tokens, context 0, stale block-table rows) and a
    fixed token count (padded tokens in no sequence). The real rows must equal the unpadded
    kernel's and the reference's; the padded rows are never read."""
    q_lens, context_lens = [5, 1, 1, 17], [12, 30, 7, 17]  # a chunk after a prefix, two decodes, a prompt
    k_cache, v_cache, block_tables, lens = make_paged_kv(context_lens, 2, 16, 4, torch.float32)
    dev = k_cache.device
    real_t, pad_t, pad_b = sum(q_lens), 40, 9
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = torch.randn(pad_t, 4, 16, device=dev)
    cu_pad = torch.cat([cu, torch.full((pad_b - len(q_lens),), real_t, dtype=torch.int32, device=dev)])
    lens_pad = torch.cat([lens, torch.zeros(pad_b - len(q_lens), dtype=torch.int32, device=dev)])
    stale = torch.randint(0, k_cache.shape[0], (pad_b - len(q_lens), block_tables.shape[1]), device=dev)
    tables_pad = torch.cat([block_tables, stale.to(torch.int32)])
    with poisoned_allocations():
        padded = paged_prefill_attention(q, k_cache, v_cache, cu_pad, tables_pad, lens_pad, 0.25)
        plain = paged_prefill_attention(q[:real_t], k_cache, v_cache, cu, block_tables, lens, 0.25)
    assert torch.equal(padded[:real_t], plain)
    ref = paged_prefill_attention_ref(q[:real_t], k_cache, v_cache, cu, block_tables, lens, 0.25)
    assert_close(padded[:real_t], ref, TOLERANCE[torch.float32])


def test_empty_batches():
    k_cache, v_cache, block_tables, lens = make_paged_kv([], 2, 16, 4, torch.float32)
    q = torch.randn(0, 2, 16, device=k_cache.device)
    assert paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.25).shape == (0, 2, 16)
    cu = torch.zeros(1, dtype=torch.int32, device=k_cache.device)
    assert paged_prefill_attention(q, k_cache, v_cache, cu, block_tables, lens, 0.25).shape == (0, 2, 16)


# --- GPU: Llama-3-8B shapes (32 q heads, 8 kv heads, head_dim 128, block 16), bf16 -----------

@pytest.mark.gpu
@pytest.mark.parametrize(
    "context_lens",
    [
        [8192],  # batch 1, long: many splits
        [1, 17, 300, 1000, 2049, 4097, 8000, 8192],
        [int(n) for n in torch.randint(1, 4096, (64,), generator=torch.Generator().manual_seed(1))],
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_llama3_8b_gpu(context_lens, dtype):
    run_decode(context_lens, 32, 8, 128, 16, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "q_lens, context_lens",
    [
        ([2048], [2048]),
        ([512, 1, 100, 3000], [8192, 33, 100, 4111]),  # prefix hits / chunked prefill, 1 token
        ([7, 0, 129], [7, 16, 1025]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_llama3_8b_gpu(q_lens, context_lens, dtype):
    run_prefill(q_lens, context_lens, 32, 8, 128, 16, dtype)


@pytest.mark.gpu
def test_decode_and_prefill_fp32_gpu():
    run_decode([1, 500, 3000], 32, 8, 128, 16, torch.float32)
    run_prefill([64, 5], [300, 5], 32, 8, 128, 16, torch.float32)


@pytest.mark.gpu
def test_decode_other_block_sizes_and_gqa_gpu():
    run_decode([33, 700, 5000], 28, 4, 128, 32, torch.bfloat16)  # Qwen2-7B-like: GQA 7
    run_decode([33, 700, 5000], 16, 16, 64, 8, torch.bfloat16)  # MHA, head_dim 64
    run_prefill([100, 33], [700, 33], 28, 4, 128, 32, torch.bfloat16)
