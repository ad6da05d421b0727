"""tandem.kernels.ops: CUDA tensors go to Triton, CPU tensors to the reference unless TANDEM_TRITON_ON_CPU=1."""
import os

import pytest
import torch

from tandem.kernels import ops
from tandem.kernels.rmsnorm import rms_norm_ref


def _which():
    return ops._dispatch(lambda x, *a: "triton", lambda x, *a: "ref")


def test_cpu_goes_to_ref(monkeypatch):
    monkeypatch.delenv("TANDEM_TRITON_ON_CPU", raising=False)
    assert _which()(torch.ones(2)) == "ref"


def test_env_pushes_cpu_to_triton(monkeypatch):
    monkeypatch.setenv("TANDEM_TRITON_ON_CPU", "1")
    assert _which()(torch.ones(2)) == "triton"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors reach Triton only in its interpreter")
def test_env_runs_the_triton_kernel_on_cpu(monkeypatch):
    monkeypatch.setenv("TANDEM_TRITON_ON_CPU", "1")
    x, weight = torch.randn(3, 32), torch.randn(32)
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), rms_norm_ref(x, weight, 1e-6))


def test_every_op_is_wired():
    names = ["write_kv", "paged_decode_attention", "paged_prefill_attention", "gather_blocks", "scatter_blocks",
             "rms_norm", "fused_add_rms_norm", "rope", "silu_and_mul"]
    for name in names:
        op = getattr(ops, name)
        assert op.__wrapped__.__name__ == name and op.__wrapped__.__module__.startswith("tandem.kernels.")


@pytest.mark.gpu
def test_cuda_goes_to_triton_gpu():
    assert _which()(torch.ones(2, device="cuda")) == "triton"
