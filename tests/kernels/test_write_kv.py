"""write_kv (Triton) against the plain-torch reference."""
import pytest
import torch

from tests.kernels.kernel_testing import device
from tandem.kernels.write_kv import write_kv, write_kv_ref


def run(num_tokens, num_blocks, block_size, num_kv_heads, head_dim, dtype, skip_every=3, strided=False):
    dev = device()
    if strided:
        # k and v as views into one fused projection output, as the model produces them.
        kv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, dtype=dtype, device=dev)
        k = kv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
        v = kv[:, 2 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    else:
        k = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=dev)
        v = torch.randn(num_tokens, num_kv_heads, head_dim, dtype=dtype, device=dev)
    slots = torch.randperm(num_blocks * block_size, device=dev)[:num_tokens]
    if skip_every:
        slots[::skip_every] = -1
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype, device=dev)
    v_cache = torch.randn_like(k_cache)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write_kv(k, v, k_cache, v_cache, slots)
    write_kv_ref(k, v, k_ref, v_ref, slots)
    # A copy must be exact: written slots hold the new rows, skipped and other slots are untouched.
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize(
    "num_tokens, num_blocks, block_size, num_kv_heads, head_dim, dtype, strided",
    [
        (7, 4, 4, 2, 16, torch.float32, False),
        (1, 3, 8, 1, 24, torch.float16, False),  # single token, odd head_dim
        (10, 5, 4, 3, 8, torch.float32, True),  # strided views, 3 kv heads
        (0, 2, 4, 2, 8, torch.float32, False),  # nothing to write
    ],
)
def test_write_kv_matches_ref(num_tokens, num_blocks, block_size, num_kv_heads, head_dim, dtype, strided):
    run(num_tokens, num_blocks, block_size, num_kv_heads, head_dim, dtype, strided=strided)


def test_all_slots_skipped_leaves_cache_untouched():
    run(4, 2, 4, 2, 8, torch.float32, skip_every=1)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 64, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_write_kv_llama3_8b_gpu(num_tokens, dtype):
    run(num_tokens, 1024, 16, 8, 128, dtype)
    run(num_tokens, 1024, 16, 8, 128, dtype, strided=True)
