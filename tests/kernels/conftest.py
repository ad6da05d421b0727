"""Kernel tests call the Triton launchers directly; on a machine without a GPU they run in the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
