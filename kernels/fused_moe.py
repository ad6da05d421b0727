"""Fused mixture-of-experts MLP: every token's top-k experts, each a SiLU-gated MLP, weighted and
summed, in two grouped GEMM launches.

    out[t] = sum_j topk_weights[t, j] * down[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])),  e = topk_ids[t, j]

Weights are stacked per expert as transformers v5 keeps them: w_gate_up [E, 2I, H] (gate rows
first, then up), w_down [E, H, I]. An id outside [0, E) contributes nothing: under expert
parallelism a rank passes the experts it does not hold that way.

The Triton path (as vLLM's fused_moe): the T*k (token, slot) pairs are sorted by expert and each
expert's run is padded to BLOCK_M, so every BLOCK_M rows of the sorted order belong to one
expert. Launch 1 multiplies those rows by the expert's gate and up halves and writes
silu(gate) * up; launch 2 multiplies by the expert's down weight, scales each row by its top-k
weight and stores it at its pair's row; a sum over k finishes. The sorting and the grids are
sized from shapes alone (the worst-case padding), so there is no host sync and a decode step can
be captured in a CUDA graph.

FP8 expert weights (e4m3, `MoeFp8Scales`: per expert and row, optionally per column group) are
dequantized in registers to the activation dtype before each tile's dot, so the products are
those of the reference (`fused_moe_ref` dequantizes, then multiplies); the weights are read at
one byte per element.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.kernels.activation import silu_and_mul_ref
from tandem.kernels.fp8 import GemmTiles, dequantize_weight, scale_group_block_k


@dataclass(frozen=True)
class MoeFp8Scales:
    """Float32 scales of e4m3 expert weights, per expert and row (`kernels/fp8.py`'s layout):
    gate_up [E, 2I, G1] over groups of `gate_up_group_k` columns, down [E, H, G2]."""

    gate_up: torch.Tensor
    down: torch.Tensor
    gate_up_group_k: int
    down_group_k: int


def fused_moe_ref(
    x: torch.Tensor,  # [T, H]
    w_gate_up: torch.Tensor,  # [E, 2I, H]
    w_down: torch.Tensor,  # [E, H, I]
    topk_weights: torch.Tensor,  # [T, k], any float dtype
    topk_ids: torch.Tensor,  # [T, k] integer
    scales: MoeFp8Scales | None = None,  # e4m3 weights: dequantized to x's dtype, then as below
) -> torch.Tensor:
    """Per-expert loop in plain torch, rounding like transformers' own expert loop; the weighted
    sum over the k experts is taken in float32."""
    num_experts = w_gate_up.shape[0]
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in torch.unique(topk_ids).tolist():
        if not 0 <= expert < num_experts:
            continue
        token, slot = torch.where(topk_ids == expert)
        w1, w2 = w_gate_up[expert], w_down[expert]
        if scales is not None:
            w1 = dequantize_weight(w1, scales.gate_up[expert], scales.gate_up_group_k).to(x.dtype)
            w2 = dequantize_weight(w2, scales.down[expert], scales.down_group_k).to(x.dtype)
        hidden = silu_and_mul_ref(x[token] @ w1.t())
        y = hidden @ w2.t()
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


@dataclass(frozen=True)
class ExpertBlocks:
    """The (token, slot) pairs sorted by expert, each expert's run padded to `block_m` rows."""

    sorted_pair_ids: torch.Tensor  # [num_blocks * block_m] int32: pair index t*k + j; num_pairs = padding
    block_expert_ids: torch.Tensor  # [num_blocks] int32: the expert of each block; -1 = unused block
    num_pairs: int
    block_m: int


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> ExpertBlocks:
    """Group the pairs by expert without a host sync: the buffers take the worst-case padding
    (every expert that can occur at all wastes block_m - 1 rows) and unused blocks are marked -1."""
    flat = topk_ids.reshape(-1).long()
    num_pairs = flat.numel()
    device = flat.device
    held = (flat >= 0) & (flat < num_experts)
    bucket = torch.where(held, flat, torch.full_like(flat, num_experts))  # extra bucket: not ours
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    padded = (counts[:num_experts] + block_m - 1) // block_m * block_m
    padded_ends = torch.cumsum(padded, 0)
    padded_starts = padded_ends - padded
    max_rows = triton.cdiv(num_pairs + min(num_experts, num_pairs) * (block_m - 1), block_m) * block_m
    max_rows = max(max_rows, block_m)
    # Rows are placed stably: within an expert the pairs keep their (token, slot) order.
    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    starts = torch.cumsum(counts, 0) - counts
    rank_in_expert = torch.arange(num_pairs, device=device) - starts[sorted_bucket]
    dump_row = torch.full((1,), max_rows, dtype=torch.long, device=device)
    dest = torch.cat([padded_starts, dump_row])[sorted_bucket] + rank_in_expert
    dest = torch.where(sorted_bucket < num_experts, dest, dump_row)
    sorted_ids = torch.full((max_rows + 1,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids.scatter_(0, dest, order.to(torch.int32))
    block_starts = torch.arange(0, max_rows, block_m, device=device)
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return ExpertBlocks(sorted_ids[:max_rows], block_expert, num_pairs, block_m)


@triton.jit
def _gate_up_silu_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr,
    num_pairs, top_k, hidden, inter,
    stride_xt, stride_we, stride_wn, stride_wk, stride_om, stride_se, stride_sn, group_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr,
):
    """out[row, n] = silu(x[tok] . w[e, n]) * (x[tok] . w[e, inter + n]) for one BLOCK_M run of
    sorted rows (one expert) and BLOCK_N intermediate columns. FP8: w is e4m3, dequantized in
    registers with s[e, n, k // group_k] to x's dtype before the dot; a K tile lies inside one
    scale group (`scale_group_block_k`), so its scales are one vector per row."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + rows)
        valid = pair < num_pairs
        token = (pair // top_k).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < inter
        w_base = w_ptr + expert * stride_we
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < hidden
            a = tl.load(x_ptr + token[:, None] * stride_xt + offs_k[None, :],
                        mask=valid[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & n_mask[None, :]
            w_gate = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                             mask=w_mask, other=0.0)
            w_up = tl.load(w_base + (offs_n[None, :] + inter) * stride_wn + offs_k[:, None] * stride_wk,
                           mask=w_mask, other=0.0)
            if FP8:
                s_base = s_ptr + expert * stride_se + k0 // group_k
                s_gate = tl.load(s_base + offs_n * stride_sn, mask=n_mask, other=0.0)
                s_up = tl.load(s_base + (offs_n + inter) * stride_sn, mask=n_mask, other=0.0)
                w_gate = (w_gate.to(tl.float32) * s_gate[None, :]).to(a.dtype)
                w_up = (w_up.to(tl.float32) * s_up[None, :]).to(a.dtype)
            acc_gate = tl.dot(a, w_gate, acc_gate, input_precision=DOT_PRECISION)
            acc_up = tl.dot(a, w_up, acc_up, input_precision=DOT_PRECISION)
        # Round as the reference does: the projection, then silu(gate), then the product.
        dtype = out_ptr.dtype.element_ty
        gate = acc_gate.to(dtype).to(tl.float32)
        up = acc_up.to(dtype).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        tl.store(out_ptr + rows.to(tl.int64)[:, None] * stride_om + offs_n[None, :], (silu * up).to(dtype),
                 mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(
    h_ptr, w_ptr, s_ptr, out_ptr, sorted_ids_ptr, block_expert_ptr, topk_weights_ptr,
    num_pairs, hidden, inter,
    stride_hm, stride_we, stride_wn, stride_wk, stride_op, stride_se, stride_sn, group_k,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FP8: tl.constexpr,
):
    """out[pair, n] = topk_weight[pair] * (h[row] . w[e, n]) for one BLOCK_M run of sorted rows."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert >= 0:
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + rows)
        valid = pair < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hidden
        w_base = w_ptr + expert * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < inter
            a = tl.load(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_k[None, :],
                        mask=valid[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & n_mask[None, :]
            w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=w_mask, other=0.0)
            if FP8:
                s = tl.load(s_ptr + expert * stride_se + offs_n * stride_sn + k0 // group_k, mask=n_mask, other=0.0)
                w = (w.to(tl.float32) * s[None, :]).to(a.dtype)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        dtype = out_ptr.dtype.element_ty
        weight = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)
        y = acc.to(dtype).to(tl.float32) * weight[:, None]
        tl.store(out_ptr + pair.to(tl.int64)[:, None] * stride_op + offs_n[None, :], y.to(dtype),
                 mask=valid[:, None] & n_mask[None, :])


MoeTiles = GemmTiles  # BLOCK_M x BLOCK_N x BLOCK_K, warps and stages of both launches


def pick_tiles(num_pairs: int, num_experts: int, device: torch.device) -> MoeTiles:
    if device.type != "cuda":
        return MoeTiles(16, 32, 32)  # the interpreter: small tiles keep the tests fast
    rows_per_expert = num_pairs / max(num_experts, 1)
    if rows_per_expert <= 16:  # decode: few rows per expert, the weights stream once
        return MoeTiles(16, 64, 128, num_warps=4, num_stages=4)
    if rows_per_expert <= 64:
        return MoeTiles(32, 64, 64, num_warps=4, num_stages=4)
    return MoeTiles(64, 128, 64, num_warps=8, num_stages=3)


def fused_moe(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    tiles: MoeTiles | None = None,
    scales: MoeFp8Scales | None = None,
) -> torch.Tensor:
    """Triton version of `fused_moe_ref`."""
    num_tokens, hidden = x.shape
    num_experts, two_inter, _ = w_gate_up.shape
    inter = two_inter // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if num_pairs == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    tiles = tiles or pick_tiles(num_pairs, num_experts, x.device)
    if scales is not None:  # one K tile for both launches, inside the scale groups of both
        tiles = dataclasses.replace(tiles, block_k=min(scale_group_block_k(tiles.block_k, scales.gate_up_group_k, hidden),
                                                       scale_group_block_k(tiles.block_k, scales.down_group_k, inter)))
    blocks = align_by_expert(topk_ids, num_experts, tiles.block_m)
    num_blocks = blocks.block_expert_ids.numel()
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    hidden_act = torch.empty((num_blocks * tiles.block_m, inter), dtype=x.dtype, device=x.device)
    s1, s2 = (scales.gate_up, scales.down) if scales is not None else (w_gate_up, w_down)  # unread without FP8
    fp8 = scales is not None
    _gate_up_silu_kernel[(num_blocks, triton.cdiv(inter, tiles.block_n))](
        x, w_gate_up, s1, hidden_act, blocks.sorted_pair_ids, blocks.block_expert_ids,
        num_pairs, top_k, hidden, inter,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), w_gate_up.stride(2), hidden_act.stride(0),
        s1.stride(0), s1.stride(1), scales.gate_up_group_k if fp8 else 1,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, DOT_PRECISION=precision,
        FP8=fp8, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    # Pairs routed nowhere (ids outside [0, E)) keep their zero row.
    per_pair = torch.zeros((num_pairs, hidden), dtype=x.dtype, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    _down_kernel[(num_blocks, triton.cdiv(hidden, tiles.block_n))](
        hidden_act, w_down, s2, per_pair, blocks.sorted_pair_ids, blocks.block_expert_ids, weights,
        num_pairs, hidden, inter,
        hidden_act.stride(0), w_down.stride(0), w_down.stride(1), w_down.stride(2), per_pair.stride(0),
        s2.stride(0), s2.stride(1), scales.down_group_k if fp8 else 1,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, DOT_PRECISION=precision,
        FP8=fp8, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return per_pair.view(num_tokens, top_k, hidden).sum(dim=1, dtype=torch.float32).to(x.dtype)
