"""Helpers shared by the kernel tests: device choice, error measure, poisoned allocations."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Relative error ||out - ref|| / ||ref|| allowed per dtype when the kernel accumulates in a
# different order than the reference (attention, norms); elementwise ops are checked tighter.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert torch.isfinite(out).all(), "non-finite values: unwritten (poisoned) or broken output"
    ref64 = ref.double()
    denom = ref64.norm().item()
    diff = (out.double() - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"relative error {err:.3e} > {tol:.1e}"


def _poison(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype == torch.bool:
        return t
    return t.fill_(-12345 if t.dtype.is_signed else 123)


@contextlib.contextmanager
def poisoned_allocations() -> Iterator[None]:
    """Within this block torch.empty / torch.empty_like hand out NaN-filled tensors, so an output
    element a kernel forgets to write shows up as NaN instead of as stale memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = empty, empty_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like
