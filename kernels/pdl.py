"""Programmatic dependent launch (PDL) for the step's Triton kernels, on Hopper and newer.

A CUDA graph replays a batch-1 decode step as ~400 kernels, most of them small (norms, RoPE,
KV write, attention, SiLU), whose run time is mostly launch and ramp-up. With PDL a kernel may be
scheduled while the kernel before it is still running: its programs start, then wait in
`griddepcontrol.wait` until the previous kernel has finished and its writes are visible, so
scheduling and start-up overlap the previous kernel's tail. Each of our kernels waits first,
before reading anything, so no kernel ever sees its inputs half-written; it then lets the next
kernel be scheduled (`griddepcontrol.launch_dependents`). A kernel not launched with PDL
(cuBLAS's GEMMs) is ordered as usual.

`TANDEM_PDL=0` turns it off (for A/B measurements); it is off on the CPU, under the Triton
interpreter, on GPUs older than sm_90 and with a Triton that lacks it.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


# Triton exposes grid dependency control (and the `launch_pdl` launch option) since 3.3; with an
# older Triton the kernels simply run without it.
_TRITON_HAS_GDC = hasattr(getattr(getattr(tl, "extra", None), "cuda", None), "gdc_wait")


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    return _TRITON_HAS_GDC and torch.cuda.get_device_capability(index)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if os.environ.get("TANDEM_PDL", "1") == "0":
        return False
    return _device_supports_pdl(device.index if device.index is not None else torch.cuda.current_device())


def launch_kwargs(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the kernel's USE_PDL constexpr, and Triton's
    `launch_pdl` launch option when it is on."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_prologue(USE_PDL: tl.constexpr):
    """First thing in a kernel: wait for the previous kernel, then let the next one start."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
