"""Shared fixtures: one small random-weight model folder per architecture, made once per run."""
import pytest

from tandem.workers.make_model import ARCHITECTURES, make_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {arch: str(make_model(root / arch, arch, seed=1)) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> str:
    return model_dirs["llama"]
