"""FP8 (e4m3) KV cache: the KV write quantizes on store and the paged attention kernels
dequantize in registers, each against its plain-torch reference.

The Triton interpreter loads and stores e4m3 exactly but mis-rounds fp32 -> e4m3 conversions
that round up across a power of two (1.96 -> 1.0, checked with triton 3.9), so under the
interpreter the write is fed values already on the e4m3 grid (scaled by powers of two: exact);
the GPU test writes arbitrary values and compares with torch's round-to-nearest.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.kernel_testing import TOLERANCE, assert_close, device, poisoned_allocations
from tests.kernels.test_paged_attention import make_paged_kv
from tandem.kernels.paged_attention import (
    paged_decode_attention,
    paged_decode_attention_ref,
    paged_decode_attention_split,
    paged_prefill_attention,
    paged_prefill_attention_ref,
)
from tandem.kernels.write_kv import FP8_E4M3_MAX, FP8_KV_DTYPE, write_kv, write_kv_ref

FP8 = FP8_KV_DTYPE


def on_fp8_grid(shape, scale: float, dtype) -> torch.Tensor:
    """Values whose x / scale is exactly an e4m3 number (scale a power of two)."""
    return ((torch.randn(shape) * 40).to(FP8).float() * scale).to(dtype).to(device())


def fp8_cache_like(num_blocks, block_size, num_kv_heads, head_dim) -> torch.Tensor:
    return torch.randn(num_blocks, block_size, num_kv_heads, head_dim, device=device()).to(FP8)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k_scale, v_scale", [(1.0, 1.0), (0.25, 4.0)])
def test_write_kv_quantizes_like_ref(dtype, k_scale, v_scale):
    num_tokens, num_blocks, block_size, heads, head_dim = 9, 4, 4, 2, 16
    k = on_fp8_grid((num_tokens, heads, head_dim), k_scale, dtype)
    kv = on_fp8_grid((num_tokens, 3 * heads * head_dim), v_scale, dtype)  # v as a strided view of qkv
    v = kv[:, 2 * heads * head_dim:].view(num_tokens, heads, head_dim)
    k[1, 0, :3] = torch.tensor([1e4, -1e4, FP8_E4M3_MAX * k_scale])  # saturates at +-448
    slots = torch.randperm(num_blocks * block_size, device=device())[:num_tokens]
    slots[::4] = -1
    k_cache, v_cache = fp8_cache_like(num_blocks, block_size, heads, head_dim), fp8_cache_like(num_blocks, block_size, heads, head_dim)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
    write_kv_ref(k, v, k_ref, v_ref, slots, k_scale, v_scale)
    assert same_bytes(k_cache, k_ref) and same_bytes(v_cache, v_ref)
    # And the values stored are what was written, back through the scale (exact on the grid).
    stored = k_cache.view(-1, heads, head_dim)
    assert torch.equal(stored[slots[2]].float() * k_scale, k[2].float())
    assert stored[slots[1], 0, :3].float().tolist() == [FP8_E4M3_MAX, -FP8_E4M3_MAX, FP8_E4M3_MAX]


def fp8_paged_kv(context_lens, num_kv_heads, head_dim, block_size):
    k_cache, v_cache, block_tables, lens = make_paged_kv(context_lens, num_kv_heads, head_dim, block_size, torch.float32)
    return k_cache.to(FP8), v_cache.to(FP8), block_tables, lens


@pytest.mark.parametrize("split", [None, (3, 16, 16)])
def test_decode_attention_fp8_cache(split):
    context_lens, num_q_heads, num_kv_heads, head_dim = [1, 17, 40, 70], 4, 2, 16
    k_cache, v_cache, block_tables, lens = fp8_paged_kv(context_lens, num_kv_heads, head_dim, 4)
    q = torch.randn(len(context_lens), num_q_heads, head_dim, device=k_cache.device)
    scales = dict(k_scale=0.37, v_scale=1.7)
    with poisoned_allocations():
        if split is None:
            out = paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 0.25, **scales)
        else:
            out = paged_decode_attention_split(q, k_cache, v_cache, block_tables, lens, 0.25, *split, **scales)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 0.25, **scales)
    assert_close(out, ref, TOLERANCE[torch.float32])
    # The scales are applied: without them the result is a different one.
    assert (ref - paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 0.25)).abs().max() > 0.1


def test_prefill_attention_fp8_cache():
    q_lens, context_lens, num_q_heads, num_kv_heads, head_dim = [5, 1, 20], [5, 30, 37], 4, 2, 16
    k_cache, v_cache, block_tables, lens = fp8_paged_kv(context_lens, num_kv_heads, head_dim, 4)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=k_cache.device)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, device=k_cache.device)
    with poisoned_allocations():
        out = paged_prefill_attention(q, k_cache, v_cache, cu, block_tables, lens, 0.25, k_scale=0.37, v_scale=1.7)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, cu, block_tables, lens, 0.25, k_scale=0.37, v_scale=1.7)
    assert_close(out, ref, TOLERANCE[torch.float32])


def test_ref_dequantizes_to_the_values_written():
    """Writing through the reference, then attending with the reference, equals attending over
    the e4m3-rounded values themselves in a float32 cache: the two references agree on one format."""
    heads, head_dim, block_size, n = 2, 16, 4, 11
    k = torch.randn(n, heads, head_dim) * 3
    v = torch.randn(n, heads, head_dim) * 3
    slots = torch.arange(n)
    k8, v8 = torch.zeros(3, block_size, heads, head_dim, dtype=FP8), torch.zeros(3, block_size, heads, head_dim, dtype=FP8)
    write_kv_ref(k, v, k8, v8, slots, 0.5, 0.75)
    k32, v32 = k8.float() * 0.5, v8.float() * 0.75
    q = torch.randn(1, 4, head_dim)
    table, lens = torch.tensor([[0, 1, 2]], dtype=torch.int32), torch.tensor([n], dtype=torch.int32)
    out8 = paged_decode_attention_ref(q, k8, v8, table, lens, 0.25, 0.5, 0.75)
    out32 = paged_decode_attention_ref(q, k32, v32, table, lens, 0.25)
    assert torch.allclose(out8, out32, atol=1e-6)
    # e4m3 keeps 3 mantissa bits: every stored value is within 1/16 (relative) of the input.
    k32 = k32.view(-1, heads, head_dim)[:n]
    assert ((k32 - k).abs() <= k.abs() / 16 + 2**-10 * 0.5).all()


# --- GPU: arbitrary values, Llama-3-8B shapes, bf16 queries ---------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 8192])
def test_write_kv_fp8_llama3_8b_gpu(num_tokens):
    dev = torch.device("cuda")
    k = torch.randn(num_tokens, 8, 128, dtype=torch.bfloat16, device=dev) * 3
    v = torch.randn(num_tokens, 8, 128, dtype=torch.bfloat16, device=dev) * 3
    slots = torch.randperm(1024 * 16, device=dev)[:num_tokens]
    k_cache = torch.zeros(1024, 16, 8, 128, dtype=FP8, device=dev)
    v_cache = torch.zeros_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv(k, v, k_cache, v_cache, slots, 0.37, 1.3)
    write_kv_ref(k, v, k_ref, v_ref, slots, 0.37, 1.3)
    assert same_bytes(k_cache, k_ref) and same_bytes(v_cache, v_ref)


@pytest.mark.gpu
@pytest.mark.parametrize("context_lens", [[8192], [1, 17, 300, 1000, 2049, 4097, 8000, 8192]])
def test_decode_attention_fp8_llama3_8b_gpu(context_lens):
    k_cache, v_cache, block_tables, lens = fp8_paged_kv(context_lens, 8, 128, 16)
    q = torch.randn(len(context_lens), 32, 128, dtype=torch.bfloat16, device=k_cache.device)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, lens, 128**-0.5, 0.37, 1.7)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, block_tables, lens, 128**-0.5, 0.37, 1.7)
    assert_close(out, ref, TOLERANCE[torch.bfloat16])


@pytest.mark.gpu
def test_prefill_attention_fp8_llama3_8b_gpu():
    q_lens, context_lens = [512, 1, 100, 3000], [8192, 33, 100, 4111]
    k_cache, v_cache, block_tables, lens = fp8_paged_kv(context_lens, 8, 128, 16)
    dev = k_cache.device
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    q = torch.randn(sum(q_lens), 32, 128, dtype=torch.bfloat16, device=dev)
    out = paged_prefill_attention(q, k_cache, v_cache, cu, block_tables, lens, 128**-0.5, 0.37, 1.7)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, cu, block_tables, lens, 128**-0.5, 0.37, 1.7)
    assert_close(out, ref, TOLERANCE[torch.bfloat16])
