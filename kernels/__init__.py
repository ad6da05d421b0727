"""Tandem's kernels: each file holds one Triton kernel and the plain-torch reference it must match.

Cache layout shared by every kernel (and by `kvtransfer`):
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
A token's *slot* is `block_id * block_size + offset_in_block`; slot -1 means "do not write".
This package imports nothing from `workers/`.
"""
