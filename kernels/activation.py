"""SiLU-and-mul: the gated MLP's activation, x = [gate | up] -> silu(gate) * up."""
import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return F.silu(x[..., :half]) * x[..., half:]
