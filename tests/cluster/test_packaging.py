"""Install hygiene: Tandem adds one import name, `tandem`, and lives beside Hugging Face's
`kernels` package (which transformers >= 5.25 imports), from the repository root and from any
other directory."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# One process: Hugging Face's `kernels`, a transformers Llama (config + model class, as the HF
# parity oracle loads it) and Tandem's engine on the CPU, with Tandem's own Triton kernels module.
_COEXIST = r"""
import sys, tempfile
import kernels
assert hasattr(kernels, "get_kernel"), f"`kernels` is not Hugging Face's: {kernels.__file__}"
from transformers import AutoConfig, LlamaForCausalLM
from transformers.integrations import hub_kernels  # the module that broke on Tandem's `kernels`
import tandem.kernels.paged_attention as tandem_paged_attention
from tandem import LLM, SamplingParams
from tandem.engine.make_model import make_model

folder = make_model(tempfile.mkdtemp(), arch="llama")
config = AutoConfig.from_pretrained(folder)
hf = LlamaForCausalLM.from_pretrained(folder)
llm = LLM(str(folder), device="cpu", dtype="float32")
out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(temperature=0, max_tokens=4))
ids = out[0].outputs[0].token_ids
assert len(ids) == 4, ids
print("OK", kernels.__file__, tandem_paged_attention.__file__)
"""


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_hf_kernels_transformers_and_tandem_in_one_process(where, tmp_path):
    cwd = ROOT if where == "repository root" else tmp_path
    proc = subprocess.run([sys.executable, "-c", _COEXIST], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    _, hf_kernels_file, tandem_kernel_file = line.split()
    assert "site-packages" in hf_kernels_file
    assert Path(tandem_kernel_file).resolve() == (ROOT / "kernels" / "paged_attention.py").resolve()


def test_no_top_level_folder_shadows_an_installed_package():
    """A top-level folder with `__init__.py` wins over site-packages from the repository root.
    `kernels` must not be one (transformers imports Hugging Face's)."""
    assert importlib.util.find_spec("kernels") is not None  # transformers' dependency is installed
    assert not (ROOT / "kernels" / "__init__.py").exists()


def _package_dirs() -> dict[str, Path]:
    """Every folder the wheel must carry, as its `tandem.*` name: the mapped folders and the
    subfolders of theirs that hold Python files (bench's probes, checks and results excepted)."""
    mapping = PYPROJECT["tool"]["setuptools"]["package-dir"]
    found: dict[str, Path] = {}
    for name, rel in mapping.items():
        base = ROOT / rel
        for d in [base, *sorted(p for p in base.rglob("*") if p.is_dir())]:
            parts = d.relative_to(base).parts
            if "__pycache__" in parts or (rel == "bench" and parts[:1] in {("probes",), ("checks",), ("results",)}):
                continue
            if any(d.glob("*.py")) or any(d.glob("*.json")):
                found[".".join((name, *parts))] = d
    return found


def test_pyproject_packages_cover_every_folder():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert listed == set(_package_dirs())
    assert all(name == "tandem" or name.startswith("tandem.") for name in listed)
    assert PYPROJECT["project"]["scripts"]["tandem"].startswith("tandem.")


def test_wheel_adds_only_tandem(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("tandem_serve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"tandem"}
    assert "tandem/kernels/paged_attention.py" in names and "tandem/engine/llm.py" in names
    assert "tandem/bench/loadgen/cli.py" in names and "tandem/cluster/serve.yaml" in names
    assert not [n for n in names if "/probes/" in n or "/checks/" in n or "/results/" in n]
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "tandem = tandem.cluster.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
