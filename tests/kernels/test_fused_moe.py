"""fused_moe (Triton) against the plain-torch per-expert reference, and the expert grouping it
relies on. Small shapes run in the interpreter; realistic Qwen3-30B-A3B / Mixtral-8x7B shapes
run on a GPU."""
from __future__ import annotations

import pytest
import torch

from tandem.kernels.fused_moe import MoeTiles, align_by_expert, fused_moe, fused_moe_ref
from tests.kernels.kernel_testing import assert_close, device, poisoned_allocations

# Same roundings as the reference; only the GEMMs' accumulation order differs.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_inputs(num_tokens, num_experts, top_k, hidden, inter, dtype, dev=None, skip_experts=()):
    dev = dev or device()
    x = torch.randn(num_tokens, hidden, device=dev).to(dtype)
    w_gate_up = (torch.randn(num_experts, 2 * inter, hidden, device=dev) / hidden**0.5).to(dtype)
    w_down = (torch.randn(num_experts, hidden, inter, device=dev) / inter**0.5).to(dtype)
    logits = torch.randn(num_tokens, num_experts, device=dev)
    if skip_experts:
        logits[:, list(skip_experts)] = float("-inf")  # these experts get no tokens at all
    weights, ids = torch.topk(torch.softmax(logits, dim=-1), top_k, dim=-1)
    return x, w_gate_up, w_down, weights, ids


CASES = [
    # tokens, experts, top_k, hidden, inter, dtype
    (1, 4, 1, 32, 16, torch.float32),
    (5, 4, 2, 32, 16, torch.float32),
    (37, 8, 2, 64, 32, torch.float32),  # rows per expert not a multiple of BLOCK_M
    (20, 16, 4, 48, 40, torch.float16),  # hidden / inter not multiples of the tiles
    (64, 8, 8, 32, 24, torch.float16),  # k = E: every token goes everywhere
    (3, 32, 2, 32, 16, torch.float32),  # most experts idle
]


@pytest.mark.parametrize("num_tokens, num_experts, top_k, hidden, inter, dtype", CASES)
def test_fused_moe_matches_ref(num_tokens, num_experts, top_k, hidden, inter, dtype):
    x, w13, w2, weights, ids = make_inputs(num_tokens, num_experts, top_k, hidden, inter, dtype)
    with poisoned_allocations():
        out = fused_moe(x, w13, w2, weights, ids)
    assert out.dtype == dtype
    assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), TOL[dtype])


def test_experts_with_zero_tokens():
    x, w13, w2, weights, ids = make_inputs(24, 8, 2, 32, 16, torch.float32, skip_experts=(0, 3, 4, 7))
    assert not torch.isin(ids, torch.tensor([0, 3, 4, 7], device=ids.device)).any()
    with poisoned_allocations():
        out = fused_moe(x, w13, w2, weights, ids)
    assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), TOL[torch.float32])


def test_ids_outside_the_held_experts_contribute_nothing():
    """Expert parallelism passes experts held elsewhere as ids outside [0, E)."""
    x, w13, w2, weights, ids = make_inputs(16, 8, 2, 32, 16, torch.float32)
    ids[::2, 0] = -1
    ids[1::3, 1] = 8
    out = fused_moe(x, w13, w2, weights, ids)
    kept = (ids >= 0) & (ids < 8)
    expected = fused_moe_ref(x, w13, w2, weights * kept, ids.clamp(0, 7))
    assert_close(out, expected, TOL[torch.float32])
    routed_nowhere = (ids[:, 0] == -1) & (ids[:, 1] == 8)
    assert routed_nowhere.any() and (out[routed_nowhere] == 0).all()


def test_no_tokens():
    x, w13, w2, weights, ids = make_inputs(0, 4, 2, 32, 16, torch.float32)
    assert fused_moe(x, w13, w2, weights, ids).shape == (0, 32)


@pytest.mark.parametrize("block_m", [16, 32])
def test_align_by_expert_groups_pairs(block_m):
    ids = torch.tensor([[3, 1], [1, 0], [3, 5], [9, 1], [-1, 3]], device=device())  # 9, -1: not held
    blocks = align_by_expert(ids, num_experts=6, block_m=block_m)
    sorted_ids = blocks.sorted_pair_ids.cpu().tolist()
    experts = blocks.block_expert_ids.cpu().tolist()
    flat = ids.reshape(-1).cpu().tolist()
    placed = [p for p in sorted_ids if p < blocks.num_pairs]
    assert sorted(placed) == [p for p, e in enumerate(flat) if 0 <= e < 6], "each held pair exactly once"
    for b, expert in enumerate(experts):
        rows = [p for p in sorted_ids[b * block_m : (b + 1) * block_m] if p < blocks.num_pairs]
        if expert < 0:
            assert not rows
        else:
            assert rows and all(flat[p] == expert for p in rows)
            assert rows == sorted(rows), "stable: a block keeps token order"
    assert sorted(e for e in experts if e >= 0) == [0, 1, 3, 5]


def test_explicit_tiles():
    x, w13, w2, weights, ids = make_inputs(40, 4, 2, 64, 48, torch.float32)
    out = fused_moe(x, w13, w2, weights, ids, tiles=MoeTiles(32, 16, 16))
    assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), TOL[torch.float32])


# ------------------------------------------------------------------------------------- GPU
GPU_SHAPES = {
    "qwen3_30b_a3b": dict(hidden=2048, inter=768, num_experts=128, top_k=8),
    "mixtral_8x7b": dict(hidden=4096, inter=14336, num_experts=8, top_k=2),
}


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 16, 512, 4096])
@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_fused_moe_realistic_shapes_gpu(model, num_tokens):
    s = GPU_SHAPES[model]
    x, w13, w2, weights, ids = make_inputs(num_tokens, s["num_experts"], s["top_k"], s["hidden"], s["inter"],
                                           torch.bfloat16, dev=torch.device("cuda"))
    with poisoned_allocations():
        out = fused_moe(x, w13, w2, weights, ids)
    assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), TOL[torch.bfloat16])


@pytest.mark.gpu
def test_fused_moe_cuda_graph_gpu():
    """No host sync inside: a decode-sized call can be captured and replayed with new routing."""
    x, w13, w2, weights, ids = make_inputs(8, 128, 8, 2048, 768, torch.bfloat16, dev=torch.device("cuda"))
    fused_moe(x, w13, w2, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe(x, w13, w2, weights, ids)
    _, _, _, new_weights, new_ids = make_inputs(8, 128, 8, 16, 16, torch.bfloat16, dev=torch.device("cuda"))
    weights.copy_(new_weights)
    ids.copy_(new_ids)
    graph.replay()
    assert_close(out, fused_moe_ref(x, w13, w2, weights, ids), TOL[torch.bfloat16])
