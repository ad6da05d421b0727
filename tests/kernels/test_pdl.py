"""When the step's Triton kernels use programmatic dependent launch (kernels/pdl.py)."""
import pytest
import torch

from tandem.kernels import pdl


def test_off_on_the_cpu_and_under_the_interpreter():
    assert pdl.launch_kwargs(torch.device("cpu")) == {"USE_PDL": False}


@pytest.mark.gpu
def test_on_for_hopper_unless_switched_off(monkeypatch):
    dev = torch.device("cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("TANDEM_PDL", raising=False)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    assert pdl.launch_kwargs(dev) == ({"USE_PDL": True, "launch_pdl": True} if hopper else {"USE_PDL": False})
    monkeypatch.setenv("TANDEM_PDL", "0")
    assert pdl.launch_kwargs(dev) == {"USE_PDL": False}
