"""SiLU-and-mul: the gated MLP's activation, x = [gate | up] -> silu(gate) * up."""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tandem.kernels.pdl import launch_kwargs, pdl_prologue


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_out, half, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < half
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + half + offs, mask=mask, other=0.0).to(tl.float32)
    # Round silu(gate) to the activation dtype before the product, as torch does in two ops.
    silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton version of `silu_and_mul_ref`."""
    half = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], half), dtype=x.dtype, device=x.device)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out2 = out.view(-1, half)
    if x2.shape[0] == 0 or half == 0:
        return out
    block = min(1024, triton.next_power_of_2(half))
    _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(half, block))](
        x2, out2, x2.stride(0), out2.stride(0), half, BLOCK=block, num_warps=4, **launch_kwargs(x.device),
    )
    return out
