"""gather_blocks / scatter_blocks (Triton) against the plain-torch reference."""
import pytest
import torch

from tests.kernels.kernel_testing import device, poisoned_allocations
from tandem.kernels.block_copy import gather_blocks, gather_blocks_ref, scatter_blocks, scatter_blocks_ref


def run(num_blocks, block_size, num_heads, head_dim, num_ids, dtype, id_dtype=torch.int64):
    dev = device()
    cache = torch.randn(num_blocks, block_size, num_heads, head_dim, device=dev).to(dtype)
    block_ids = torch.randperm(num_blocks, device=dev)[:num_ids].to(id_dtype)
    with poisoned_allocations():
        staging = gather_blocks(cache, block_ids)
    assert staging.is_contiguous()
    assert torch.equal(staging, gather_blocks_ref(cache, block_ids))

    new_blocks = torch.randn(num_ids, block_size, num_heads, head_dim, device=dev).to(dtype)
    expected = cache.clone()
    scatter_blocks_ref(new_blocks, expected, block_ids)
    scatter_blocks(new_blocks, cache, block_ids)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize(
    "num_blocks, block_size, num_heads, head_dim, num_ids, dtype, id_dtype",
    [
        (9, 4, 2, 16, 5, torch.float32, torch.int64),
        (6, 16, 2, 8, 6, torch.float16, torch.int32),  # every block, int32 ids
        (5, 3, 1, 5, 2, torch.float32, torch.int32),  # 15-element blocks: masked tail
        (4, 4, 2, 8, 0, torch.float16, torch.int64),  # nothing to move
        (9, 4, 2, 16, 5, torch.float8_e4m3fn, torch.int64),  # an FP8 KV cache
    ],
)
def test_block_copy_matches_ref(num_blocks, block_size, num_heads, head_dim, num_ids, dtype, id_dtype):
    run(num_blocks, block_size, num_heads, head_dim, num_ids, dtype, id_dtype)


def test_views_of_a_layered_cache():
    # One layer of a [layers, N, bs, H, D] pool: blocks are contiguous, the layer is a view.
    dev = device()
    pool = torch.randn(3, 6, 4, 2, 8, device=dev)
    ids = torch.tensor([4, 0, 2], device=dev)
    assert torch.equal(gather_blocks(pool[1], ids), pool[1][ids])
    staging = torch.randn(3, 4, 2, 8, device=dev)
    expected = pool.clone()
    expected[1][ids] = staging
    scatter_blocks(staging, pool[1], ids)
    assert torch.equal(pool, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_block_copy_llama3_8b_gpu(dtype):
    run(4096, 16, 8, 128, 256, dtype)  # a 4k-token request's blocks of one layer
    run(4096, 16, 8, 128, 1, dtype, torch.int32)
