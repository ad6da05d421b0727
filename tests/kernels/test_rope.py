"""rope (Triton) against the plain-torch reference, with plain and Llama-3-scaled frequencies."""
import math

import pytest
import torch

from tests.kernels.kernel_testing import assert_close, device, poisoned_allocations
from tandem.kernels.rope import build_cos_sin_cache, rope, rope_ref

TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 4e-3}


def llama3_inv_freq(head_dim: int, theta: float = 500000.0) -> torch.Tensor:
    """Llama-3.1 rope scaling (factor 8, low 1, high 4, original 8192), as HF computes it."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    factor, low, high, original = 8.0, 1.0, 4.0, 8192
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


def run(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, max_positions, inv_freq=None, fused=False):
    dev = device()
    if inv_freq is None:
        inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    cos_sin = build_cos_sin_cache(inv_freq, max_positions).to(dev)
    if fused:  # q, k as views into a fused qkv output
        qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, device=dev).to(dtype)
        q = qkv[:, : num_q_heads * head_dim].view(num_tokens, num_q_heads, head_dim)
        k = qkv[:, num_q_heads * head_dim : (num_q_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    else:
        q = torch.randn(num_tokens, num_q_heads, head_dim, device=dev).to(dtype)
        k = torch.randn(num_tokens, num_kv_heads, head_dim, device=dev).to(dtype)
    positions = torch.randint(0, max_positions, (num_tokens,), device=dev)
    with poisoned_allocations():
        q_out, k_out = rope(q, k, positions, cos_sin)
    q_ref, k_ref = rope_ref(q, k, positions, cos_sin)
    assert_close(q_out, q_ref, TOL[dtype])
    assert_close(k_out, k_ref, TOL[dtype])


@pytest.mark.parametrize(
    "num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, fused",
    [
        (6, 4, 2, 16, torch.float32, False),
        (5, 3, 1, 24, torch.float16, False),  # odd head counts, half dim 12 (padded)
        (1, 2, 2, 8, torch.float32, True),  # one token, strided views
    ],
)
def test_rope_matches_ref(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, fused):
    run(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, max_positions=64, fused=fused)


def test_rope_llama3_scaling():
    run(4, 2, 1, 32, torch.float32, max_positions=4096, inv_freq=llama3_inv_freq(32))


def test_rope_no_tokens():
    q = torch.randn(0, 2, 8, device=device())
    cos_sin = build_cos_sin_cache(torch.ones(4), 4).to(q.device)
    q_out, k_out = rope(q, q.clone(), torch.zeros(0, dtype=torch.long, device=q.device), cos_sin)
    assert q_out.shape == (0, 2, 8) and k_out.shape == (0, 2, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 8192])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rope_llama3_8b_gpu(num_tokens, dtype):
    run(num_tokens, 32, 8, 128, dtype, max_positions=131072, inv_freq=llama3_inv_freq(128), fused=True)
