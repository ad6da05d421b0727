"""Suite-wide setup: Triton runs in its interpreter when there is no GPU; `gpu` tests skip
without one (they are reported as skipped, never silently passed); `slow` tests (soak,
multi-node, bundle builds) run only when asked for, e.g. `pytest -m slow` or `-m "slow or not slow"`."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton is first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_slow = pytest.mark.skip(reason="slow: run with -m slow")
    want_slow = "slow" in (config.getoption("markexpr") or "")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not want_slow:
            item.add_marker(skip_slow)
