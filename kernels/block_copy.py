"""Gather whole cache blocks into a contiguous staging buffer and scatter them back (KV transfer)."""
import torch
import triton
import triton.language as tl


def gather_blocks_ref(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """cache [N, bs, H, D], block_ids [n] -> staging [n, bs, H, D] (contiguous)."""
    return cache.index_select(0, block_ids.long())


def scatter_blocks_ref(staging: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """staging [n, bs, H, D] -> cache[block_ids]."""
    if cache.dtype.is_floating_point and cache.element_size() == 1:
        # FP8: torch has no index_copy_ for float8; the blocks move as the bytes they are.
        cache, staging = cache.view(torch.uint8), staging.view(torch.uint8)
    cache.index_copy_(0, block_ids.long(), staging)


@triton.jit
def _copy_blocks_kernel(
    src_ptr, dst_ptr, block_ids_ptr,
    stride_src_blk, stride_dst_blk,
    BLOCK_NUMEL: tl.constexpr, CHUNK: tl.constexpr, GATHER: tl.constexpr,
):
    # Program (i, c) copies chunk c of the i-th listed block. A cache block is contiguous, so each
    # thread moves runs of 16 bytes; BLOCK_NUMEL being a constant lets the compiler prove it.
    i = tl.program_id(0).to(tl.int64)
    cache_block = tl.load(block_ids_ptr + i).to(tl.int64)
    offs = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    if GATHER:
        src = src_ptr + cache_block * stride_src_blk + offs
        dst = dst_ptr + i * stride_dst_blk + offs
    else:
        src = src_ptr + i * stride_src_blk + offs
        dst = dst_ptr + cache_block * stride_dst_blk + offs
    if BLOCK_NUMEL % CHUNK == 0:
        tl.store(dst, tl.load(src, cache_modifier=".cg"), cache_modifier=".cs")
    else:
        mask = offs < BLOCK_NUMEL
        tl.store(dst, tl.load(src, mask=mask, cache_modifier=".cg"), mask=mask, cache_modifier=".cs")


def _launch_copy(src: torch.Tensor, dst: torch.Tensor, block_ids: torch.Tensor, gather: bool) -> None:
    num_blocks = block_ids.numel()
    if num_blocks == 0:
        return
    assert src.shape[1:] == dst.shape[1:] and src.dtype == dst.dtype
    assert src[0].is_contiguous() and dst[0].is_contiguous(), "each block must be contiguous"
    block_numel = src[0].numel()
    # 8 KiB of bf16 per program: 4 warps, 4 x 16-byte vectors per thread.
    chunk = min(4096 if src.is_cuda else 256, triton.next_power_of_2(block_numel))
    grid = (num_blocks, triton.cdiv(block_numel, chunk))
    _copy_blocks_kernel[grid](
        src, dst, block_ids, src.stride(0), dst.stride(0),
        BLOCK_NUMEL=block_numel, CHUNK=chunk, GATHER=gather, num_warps=4,
    )


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Triton version of `gather_blocks_ref`."""
    staging = torch.empty((block_ids.numel(), *cache.shape[1:]), dtype=cache.dtype, device=cache.device)
    _launch_copy(cache, staging, block_ids, gather=True)
    return staging


def scatter_blocks(staging: torch.Tensor, cache: torch.Tensor, block_ids: torch.Tensor) -> None:
    """Triton version of `scatter_blocks_ref` (block_ids must be distinct, as for index_copy_)."""
    _launch_copy(staging, cache, block_ids, gather=False)
