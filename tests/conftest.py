"""Suite-wide setup: Triton runs in its interpreter when there is no GPU; Ray's local clusters get
longer to start; `gpu` tests skip without one (they are reported as skipped, never silently
passed); `slow` tests (soak, multi-node, bundle builds) run only when asked for, e.g.
`pytest -m slow` or `-m "slow or not slow"`."""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
# The tests start many local Ray clusters; on a busy 2-core machine a GCS server has taken over
# Ray's default 30 s to publish its port (every test of the module then errors at set-up).
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
# No Ray call in this process starts a cluster by itself (Ray's auto-init of `.remote()`,
# `ray.get`, ...): every test starts its own cluster and stops it. CI of 2026-12-07: a
# request's completion reached a handle's request router after the test's `ray.shutdown()`; its
# call to the index actor started a hidden local Ray, and the next module's `ray.init` failed
# ("called ray.init twice"). The router no longer calls out after a shutdown
# (tests/router/test_router_after_shutdown.py); any other such call now raises where it is made.
os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
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


# Exit with pytest's own status without Python's interpreter finalization. One clean-checkout CI
# run (2026-11-23) passed every test and then died with SIGSEGV during finalization (after
# pytest's last output; the faulthandler had already been unregistered, so no traceback): native
# threads of the libraries under test (Ray core worker, gloo, torch) being torn down in an
# unspecified order. The exit status below is pytest's, unchanged (failures, errors, 5 for an
# empty collection); only the teardown of the already finished interpreter is skipped.
_EXIT_STATUS: list[int] = []


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    if _EXIT_STATUS and not hasattr(config, "workerinput"):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS[0])


# One small random-weight model folder per architecture, made once per run.
@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    from tandem.engine.make_model import ARCHITECTURES, make_model  # after TRITON_INTERPRET is set

    root = tmp_path_factory.mktemp("models")
    return {arch: str(make_model(root / arch, arch, seed=1)) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> str:
    return model_dirs["llama"]
