"""Attention over a paged KV cache: decode (one query per sequence) and varlen prefill whose
earlier context already sits in cache blocks (prefix hits, chunked prefill).

Both take the *total* context length of each sequence, counting the new tokens, whose K/V must
already be written to the cache. Query i of a sequence with q_len queries and context length L
sits at position L - q_len + i and attends to positions 0..L - q_len + i (causal).
"""
import functools

import torch
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_kwargs, pdl_prologue
from tandem.kernels.write_kv import is_fp8


def _gather_context(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    block_size = cache.shape[1]
    num_blocks = (length + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, bs, H, D]
    return blocks.reshape(-1, *cache.shape[2:])[:length]


def dequantize_kv_ref(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache contents as values: an FP8 cache's e4m3 numbers times its scale (float32)."""
    return x.float() * scale if is_fp8(x.dtype) else x


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Tq, Hq, D] against k/v [L, Hkv, D], causal with the queries at the end."""
    q_len, num_q_heads, _ = q.shape
    length, num_kv_heads, _ = k.shape
    group = num_q_heads // num_kv_heads
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    q_pos = torch.arange(length - q_len, length, device=q.device)[:, None]
    k_pos = torch.arange(length, device=q.device)[None, :]
    scores = scores.masked_fill(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def paged_prefill_attention_ref(
    q: torch.Tensor,  # [T, Hq, D], sequences packed back to back
    k_cache: torch.Tensor,  # [N, bs, Hkv, D]
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,  # [B + 1] int32
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32, total length incl. the new tokens
    scale: float,
    k_scale: float = 1.0,  # FP8 cache only: values = stored * k_scale (ignored otherwise)
    v_scale: float = 1.0,
) -> torch.Tensor:
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lengths = context_lens.tolist()
    for b, length in enumerate(lengths):
        lo, hi = starts[b], starts[b + 1]
        if hi == lo:
            continue
        k = dequantize_kv_ref(_gather_context(k_cache, block_tables[b], length), k_scale)
        v = dequantize_kv_ref(_gather_context(v_cache, block_tables[b], length), v_scale)
        out[lo:hi] = _attend(q[lo:hi], k, v, scale)
    return out


def paged_decode_attention_ref(
    q: torch.Tensor,  # [B, Hq, D], one query per sequence
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    context_lens: torch.Tensor,  # [B] int32
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    cu = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return paged_prefill_attention_ref(q, k_cache, v_cache, cu, block_tables, context_lens, scale, k_scale, v_scale)


# ---------------------------------------------------------------------------------------------
# Triton kernels.
#
# Both kernels read K/V straight from the paged cache: a tile of BLOCK_N context positions is
# turned into (cache block, offset) pairs through the sequence's block-table row, so any cache
# block size works and a tile may span several cache blocks. Query heads that share a KV head
# (GQA) are handled by the same program and stacked as rows of one matrix, so each K/V tile is
# read once per KV head, not once per query head.
#
# An FP8 cache is dequantized in registers: each tile is converted to the query's dtype for the
# dot products (a no-op for a cache in that dtype), K's per-layer scale is folded into the softmax
# scale and V's into the final normalisation (per-tensor constants: the loops do no extra
# multiplies; with a scale of 1 the arithmetic is the 16-bit cache's, bit for bit).

_LOG2E = 1.4426950408889634


@triton.jit
def _load_kv_tile(cache_ptr, block_table_row, positions, mask_n, kv_head, offs_d, mask_d,
                  stride_blk, stride_tok, stride_h, CACHE_BLOCK: tl.constexpr):
    block = tl.load(block_table_row + positions // CACHE_BLOCK, mask=mask_n, other=0).to(tl.int64)
    offset = (positions % CACHE_BLOCK).to(tl.int64)
    ptrs = cache_ptr + block[:, None] * stride_blk + offset[:, None] * stride_tok + kv_head * stride_h + offs_d[None, :]
    return tl.load(ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)


@triton.jit
def _split_len(context_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr):
    # The split grid is fixed by shapes (a CUDA graph captures it), but each sequence divides
    # its *live* context over it: a 300-token context at batch 1 keeps ~5 x kv_heads programs
    # busy instead of 1 x kv_heads when the split length came from the 8k maximum.
    per_split = (context_len + NUM_SPLITS - 1) // NUM_SPLITS
    return tl.maximum((per_split + BLOCK_N - 1) // BLOCK_N * BLOCK_N, MIN_SPLIT)


@triton.jit(do_not_specialize=["stride_bt_b"])
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    qk_scale, v_scale,
    stride_q_b, stride_q_h,
    stride_k_blk, stride_k_tok, stride_k_h,
    stride_v_blk, stride_v_tok, stride_v_h,
    stride_bt_b, stride_o_b, stride_o_h,
    NUM_Q_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    # Program (sequence, kv head, split): the GROUP query heads of one KV head against context
    # positions [split * split_len, (split + 1) * split_len). With one split it writes the final
    # output; otherwise a normalised partial output and its log2-sum-exp for the reduce kernel.
    pdl_prologue(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    split_len = _split_len(context_len, NUM_SPLITS, BLOCK_N, MIN_SPLIT)
    start = split * split_len
    if NUM_SPLITS > 1:
        if start >= context_len:
            return
    end = tl.minimum(start + split_len, context_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    q_heads = kv_head * GROUP + offs_g
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_q_b + q_heads[:, None] * stride_q_h + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_b

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        positions = n0 + offs_n
        mask_n = positions < end
        k = _load_kv_tile(k_cache_ptr, block_table_row, positions, mask_n, kv_head, offs_d, mask_d,
                          stride_k_blk, stride_k_tok, stride_k_h, CACHE_BLOCK).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_cache_ptr, block_table_row, positions, mask_n, kv_head, offs_d, mask_d,
                          stride_v_blk, stride_v_tok, stride_v_h, CACHE_BLOCK).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out_mask = mask_g[:, None] & mask_d[None, :]
    if NUM_SPLITS == 1:
        # An empty context (a padded batch slot) leaves l_i = 0 and acc = 0: write zeros.
        out = acc * v_scale / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + seq.to(tl.int64) * stride_o_b + q_heads[:, None] * stride_o_h + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (seq.to(tl.int64) * NUM_Q_HEADS + q_heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :], acc * v_scale / l_i[:, None],
                 mask=out_mask)
        tl.store(part_lse_ptr + row, m_i + tl.log2(l_i), mask=mask_g)


@triton.jit
def _reduce_splits_kernel(
    part_out_ptr, part_lse_ptr, context_lens_ptr, out_ptr, stride_o_b, stride_o_h,
    NUM_Q_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr, MIN_SPLIT: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    # Program (sequence, query head): weigh each non-empty split's output by its share of the
    # softmax mass. Splits past the context were never written and are masked out here.
    pdl_prologue(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    split_len = _split_len(context_len, NUM_SPLITS, BLOCK_N, MIN_SPLIT)
    num_valid = tl.minimum((context_len + split_len - 1) // split_len, NUM_SPLITS)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask_s = offs_s < num_valid
    mask_d = offs_d < HEAD_DIM
    row = (seq.to(tl.int64) * NUM_Q_HEADS + head) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + row, mask=mask_s, other=float("-inf"))
    m = tl.where(num_valid > 0, tl.max(lse, 0), 0.0)
    weight = tl.exp2(lse - m)
    parts = tl.load(part_out_ptr + row[:, None] * HEAD_DIM_PAD + offs_d[None, :],
                    mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    total = tl.sum(weight, 0)
    out = tl.sum(weight[:, None] * parts, 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq.to(tl.int64) * stride_o_b + head * stride_o_h + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=mask_d)


# Per-step integers (batch size, block-table width) are not specialised on: Triton would
# otherwise compile a new variant whenever one of them crosses a multiple of 16 mid-run
# (measured: ~1.5-2 s per compile on H100, seven times in one offline run).
@triton.jit(do_not_specialize=["num_seqs", "stride_bt_b"])
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, cu_seqlens_q_ptr, block_tables_ptr, context_lens_ptr, out_ptr,
    qk_scale, v_scale, num_seqs,
    stride_q_t, stride_q_h,
    stride_k_blk, stride_k_tok, stride_k_h,
    stride_v_blk, stride_v_tok, stride_v_h,
    stride_bt_b, stride_o_t, stride_o_h,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CACHE_BLOCK: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, SEQS_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr,
):
    # Program (tile, kv head): BLOCK_Q query tokens of one sequence x the GROUP query heads of
    # one KV head, stacked as BLOCK_Q * GROUP_PAD rows (token-major).
    #
    # Sequence b owns tiles [cu[b] // BLOCK_Q + b, ... + cdiv(q_len_b, BLOCK_Q)); these ranges
    # never overlap and all fit in T // BLOCK_Q + B programs, so the grid needs no host sync.
    pdl_prologue(USE_PDL)
    tile_id = tl.program_id(0)
    kv_head = tl.program_id(1)
    offs_b = tl.arange(0, SEQS_PAD)
    cu = tl.load(cu_seqlens_q_ptr + offs_b, mask=offs_b < num_seqs, other=1 << 30)
    seq = tl.sum((cu // BLOCK_Q + offs_b <= tile_id).to(tl.int32), 0) - 1
    q_start = tl.load(cu_seqlens_q_ptr + seq)
    q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
    q_tile = tile_id - (q_start // BLOCK_Q + seq)
    if q_tile * BLOCK_Q >= q_len:
        return
    context_len = tl.load(context_lens_ptr + seq)
    first_query_pos = context_len - q_len + q_tile * BLOCK_Q

    ROWS: tl.constexpr = BLOCK_Q * GROUP_PAD
    offs_m = tl.arange(0, ROWS)
    tok = q_tile * BLOCK_Q + offs_m // GROUP_PAD
    q_heads = kv_head * GROUP + offs_m % GROUP_PAD
    mask_m = (tok < q_len) & (offs_m % GROUP_PAD < GROUP)
    query_pos = context_len - q_len + tok
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_q_t + q_heads[:, None] * stride_q_h + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    block_table_row = block_tables_ptr + seq.to(tl.int64) * stride_bt_b

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_PAD], tl.float32)
    # Positions every row of the tile may see: no causal mask needed.
    kv_full_end = (first_query_pos + 1) // BLOCK_N * BLOCK_N
    for n0 in range(0, kv_full_end, BLOCK_N):
        positions = n0 + offs_n
        all_n = positions >= 0
        k = _load_kv_tile(k_cache_ptr, block_table_row, positions, all_n, kv_head, offs_d, mask_d,
                          stride_k_blk, stride_k_tok, stride_k_h, CACHE_BLOCK).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_cache_ptr, block_table_row, positions, all_n, kv_head, offs_d, mask_d,
                          stride_v_blk, stride_v_tok, stride_v_h, CACHE_BLOCK).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    # The diagonal: causal mask per row. Position 0 is visible to every row, so the first tile
    # processed always gives each row a finite maximum.
    kv_end = tl.minimum(context_len - q_len + q_tile * BLOCK_Q + BLOCK_Q, context_len)
    for n0 in range(kv_full_end, kv_end, BLOCK_N):
        positions = n0 + offs_n
        mask_n = positions < kv_end
        k = _load_kv_tile(k_cache_ptr, block_table_row, positions, mask_n, kv_head, offs_d, mask_d,
                          stride_k_blk, stride_k_tok, stride_k_h, CACHE_BLOCK).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        visible = (positions[None, :] <= query_pos[:, None]) & mask_n[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_tile(v_cache_ptr, block_table_row, positions, mask_n, kv_head, offs_d, mask_d,
                          stride_v_blk, stride_v_tok, stride_v_h, CACHE_BLOCK).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc * v_scale / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_o_t + q_heads[:, None] * stride_o_h + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers.

def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs get exact fp32 products (Triton's default would be tf32); 16-bit ones ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


def _kv_scale(cache: torch.Tensor, scale: float) -> float:
    """The dequantization scale the kernels apply: an FP8 cache's, 1 for any other (as the ref)."""
    return scale if is_fp8(cache.dtype) else 1.0


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number, splits are exercised by the tests
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# Below this many positions per split, the partial-result traffic is no longer negligible.
_MIN_SPLIT_TOKENS = 256


def plan_decode_splits(
    batch: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int,
    min_split_tokens: int = _MIN_SPLIT_TOKENS,
) -> tuple[int, int]:
    """(num_splits, split_len): enough programs for about two waves over the GPU, from shapes
    alone (no read of context_lens, so the launch can be captured in a CUDA graph). split_len
    is the split length at the maximum context; the kernel divides each sequence's live
    context over the same number of splits (`_split_len`)."""
    programs = max(batch * num_kv_heads, 1)
    wanted = triton.cdiv(2 * num_sms, programs)
    num_splits = max(1, min(wanted, triton.cdiv(max_context, min_split_tokens)))
    split_len = triton.cdiv(triton.cdiv(max(max_context, 1), num_splits), block_n) * block_n
    return triton.cdiv(max(max_context, 1), split_len), split_len


def paged_decode_attention_split(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    min_split_len: int,
    block_n: int,
    num_warps: int = 4,
    num_stages: int = 2,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """`paged_decode_attention` with the split plan and tile given (tests force several splits,
    the benchmark sweeps tiles). Each sequence's context is divided over `num_splits` splits
    of at least `min_split_len` positions (a multiple of `block_n`)."""
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert min_split_len % block_n == 0
    head_dim_pad = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        part_out = torch.empty((batch, num_q_heads, num_splits, head_dim_pad), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_q_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part_out, part_lse,
        scale * _LOG2E * _kv_scale(k_cache, k_scale), _kv_scale(v_cache, v_scale),
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_Q_HEADS=num_q_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, CACHE_BLOCK=k_cache.shape[1],
        BLOCK_N=block_n, MIN_SPLIT=min_split_len, NUM_SPLITS=num_splits,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages, **launch_kwargs(q.device),
    )
    if num_splits > 1:
        _reduce_splits_kernel[(batch, num_q_heads)](
            part_out, part_lse, context_lens, out, out.stride(0), out.stride(1),
            NUM_Q_HEADS=num_q_heads, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            BLOCK_N=block_n, MIN_SPLIT=min_split_len, NUM_SPLITS=num_splits,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4, **launch_kwargs(q.device),
        )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Triton version of `paged_decode_attention_ref` (flash-decoding; a sequence with
    context length 0, e.g. a padded slot of a CUDA-graph batch, gets zeros, as in the ref)."""
    if not q.is_cuda:
        block_n, num_warps, num_stages = 16, 4, 1  # the interpreter
    elif q.dtype == torch.float32:
        block_n, num_warps, num_stages = 32, 4, 2
    else:  # the best of a sweep on H100 at Llama-3-8B shapes (bench/results/kernels_h100.json)
        block_n, num_warps, num_stages = 64, 2, 3
    max_context = block_tables.shape[1] * k_cache.shape[1]
    num_splits, _ = plan_decode_splits(q.shape[0], k_cache.shape[2], max_context, block_n, _num_sms(q.device))
    return paged_decode_attention_split(q, k_cache, v_cache, block_tables, context_lens, scale,
                                        num_splits, block_n, block_n, num_warps, num_stages,
                                        k_scale=k_scale, v_scale=v_scale)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Triton version of `paged_prefill_attention_ref` (no host sync: the grid comes from shapes)."""
    if not q.is_cuda:
        tile = (16, 16, 4, 1)  # the interpreter: small tiles keep the tests fast
    elif q.dtype == torch.float32 or q.shape[-1] > 128:
        tile = (64, 32, 4, 2)  # keeps the K/V stages within shared memory
    else:  # near the best of a sweep on H100 (bench/results/kernels_h100.json), modest shared memory
        tile = (64, 64, 4, 3)
    return paged_prefill_attention_tiled(q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens, scale, *tile,
                                         k_scale=k_scale, v_scale=v_scale)


def _seqs_pad(num_seqs: int) -> int:
    """The constexpr width of the kernel's tile->sequence search: one value for every batch up
    to 256 sequences, so the kernel is compiled once (at engine warm-up), not per batch size."""
    return max(256, triton.next_power_of_2(num_seqs))


def paged_prefill_attention_tiled(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    rows: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    maxnreg: int | None = None,
    *,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """`paged_prefill_attention` with the tile given: `rows` query rows (tokens x grouped heads)
    against `block_n` context positions per step; `maxnreg` caps the registers per thread
    (more programs per multiprocessor, at the risk of spills)."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_seqs = context_lens.shape[0]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return out
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    group_pad = triton.next_power_of_2(group)
    block_q = max(1, rows // group_pad)
    if block_q * group_pad < 16:  # tl.dot needs at least 16 rows
        block_q = triton.cdiv(16, group_pad)
    grid = (num_tokens // block_q + num_seqs, num_kv_heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, cu_seqlens_q, block_tables, context_lens, out,
        scale * _LOG2E * _kv_scale(k_cache, k_scale), _kv_scale(v_cache, v_scale), num_seqs,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad,
        HEAD_DIM=head_dim, HEAD_DIM_PAD=triton.next_power_of_2(head_dim), CACHE_BLOCK=k_cache.shape[1],
        BLOCK_Q=block_q, BLOCK_N=block_n, SEQS_PAD=_seqs_pad(num_seqs),
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=num_warps, num_stages=num_stages, **launch_kwargs(q.device),
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return out
