"""`tandem bundle`: trimming, packing, manifest, install.sh and pip failures on synthetic
wheels (fast), and one real build from PyPI (marked slow)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from tandem.cluster import bundle
from tandem.cluster.bundle import BundleConfig, BundleError


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes],
               requires: tuple[str, ...] = (), tag: str = "py3-none-any") -> Path:
    """A real wheel zip: the given files plus a dist-info with METADATA, WHEEL and RECORD."""
    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires) + "\nlong description\n"
    members = dict(files)
    members[f"{dist_info}/METADATA"] = metadata.encode()
    members[f"{dist_info}/WHEEL"] = f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()
    record = "".join(f"{path},,\n" for path in members) + f"{dist_info}/RECORD,,\n"
    members[f"{dist_info}/RECORD"] = record.encode()
    path = folder / f"{name}-{version}-{tag}.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for member, data in members.items():
            zf.writestr(member, data)
    return path


@pytest.fixture
def fake_ray_wheel(tmp_path: Path) -> Path:
    files = {
        "ray/__init__.py": b"__version__ = '9.9.9'\n",
        "ray/serve/__init__.py": b"",
        "ray/rllib/__init__.py": b"x" * 5000,
        "ray/rllib/algorithms/ppo.py": b"x" * 5000,
        "ray/dashboard/__init__.py": b"",
        "ray/dashboard/client/build/index.html": b"<html>" * 1000,
        "ray/air/__init__.py": b"",
        "ray/air/examples/demo.py": b"print()\n",
        "ray-9.9.9.data/purelib/ray_extra.py": b"EXTRA = 1\n",
    }
    return make_wheel(tmp_path, "ray", "9.9.9", files, requires=("msgpack", "click>=7"),
                      tag="cp311-cp311-manylinux2014_x86_64")


def tar_names(archive: Path) -> set[str]:
    with tarfile.open(archive, "r:xz") as tar:
        return set(tar.getnames())


def test_trim_and_pack_removes_listed_folders_and_their_record_lines(fake_ray_wheel, tmp_path):
    out = tmp_path / "ray.tar.xz"
    trim = ("ray/rllib", "ray/dashboard/client", "ray/air/examples", "ray/not_there")
    result = bundle.trim_and_pack_wheel(fake_ray_wheel, out, trim)

    assert result.removed_dirs == ("ray/rllib", "ray/dashboard/client", "ray/air/examples")
    assert result.removed_bytes >= 10000 + 6000
    names = tar_names(out)
    assert "ray/serve/__init__.py" in names and "ray/dashboard/__init__.py" in names
    assert not any(n.startswith(("ray/rllib", "ray/dashboard/client", "ray/air/examples"))
                   for n in names)
    # `.data/purelib` content lands at the site root, as pip would install it.
    assert "ray_extra.py" in names and not any(".data" in n for n in names)
    with tarfile.open(out, "r:xz") as tar:
        record = tar.extractfile("ray-9.9.9.dist-info/RECORD").read().decode()
        assert all(m.uid == 0 and m.gid == 0 for m in tar.getmembers())
    assert "ray/rllib" not in record and "ray/serve/__init__.py" in record


def test_pack_is_reproducible(fake_ray_wheel, tmp_path):
    a, b = tmp_path / "a.tar.xz", tmp_path / "b.tar.xz"
    bundle.trim_and_pack_wheel(fake_ray_wheel, a, ("ray/rllib",))
    bundle.trim_and_pack_wheel(fake_ray_wheel, b, ("ray/rllib",))
    # mtimes come from the wheel, owners are fixed and order is sorted: same bytes.
    assert bundle.sha256_of(a) == bundle.sha256_of(b)


def test_wheel_name_version_and_platform_expansion():
    assert bundle.wheel_name_version(
        "pydantic_core-2.50.4-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
    ) == ("pydantic_core", "2.50.4")
    with pytest.raises(BundleError):
        bundle.wheel_name_version("ray.tar.xz")
    tags = bundle.expand_platforms("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags
    assert "manylinux2014_x86_64" in tags and "manylinux_2_16_x86_64" not in tags
    assert bundle.expand_platforms("macosx_11_0_arm64") == ["macosx_11_0_arm64"]


def test_host_requirements_lists_what_the_bundle_does_not_carry(tmp_path):
    a = make_wheel(tmp_path, "fastapi", "1.0", {"fastapi/__init__.py": b""},
                   requires=("starlette>=1", "annotated-doc", "typing_extensions",
                             "uvloop; sys_platform == 'win32'", "httpx; extra == 'all'",
                             "tomli; python_version < '3.11'"))
    b = make_wheel(tmp_path, "starlette", "1.0", {"starlette/__init__.py": b""},
                   requires=("anyio", "Typing-Extensions"))
    needed = bundle.host_requirements([a, b], "3.12", "manylinux_2_28_x86_64")
    assert needed == {
        "annotated-doc": ["fastapi"],
        "anyio": ["starlette"],
        "typing-extensions": ["fastapi", "starlette"],
    }


def write_synthetic_bundle(out: Path, fake_ray_wheel: Path, tmp_path: Path) -> BundleConfig:
    """The bundle layout build_bundle writes, from synthetic wheels (no pip download)."""
    config = BundleConfig(out_dir=out, python_version="%d.%d" % sys.version_info[:2])
    (out / bundle.WHEELS_DIR).mkdir(parents=True)
    trim = bundle.trim_and_pack_wheel(fake_ray_wheel, out / "ray-9.9.9.tar.xz", ("ray/rllib",))
    companion = make_wheel(out / bundle.WHEELS_DIR, "tinydep", "0.1",
                           {"tinydep/__init__.py": b"VALUE = 42\n"}, requires=("pytest",))
    files = [
        bundle.describe(out, "ray-9.9.9.tar.xz", "ray-archive", "ray", "9.9.9"),
        bundle.describe(out, f"wheels/{companion.name}", "wheel", "tinydep", "0.1"),
    ]
    needed = bundle.host_requirements([fake_ray_wheel, companion], config.python_version,
                                      config.platform)
    bundle.write_manifest(out, config, files, trim, needed)
    (out / bundle.INSTALL_NAME).write_text(bundle.install_script(config))
    return config


def test_manifest_records_sizes_and_hashes(fake_ray_wheel, tmp_path):
    out = tmp_path / "bundle"
    write_synthetic_bundle(out, fake_ray_wheel, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                               "NVSHMEM_DISABLE_NVLS": "1"}
    assert manifest["ray"]["trimmed_dirs"] == ["ray/rllib"]
    assert set(manifest["host_requires"]) == {"msgpack", "click", "pytest"}
    for entry in manifest["files"]:
        path = out / entry["path"]
        assert entry["size"] == path.stat().st_size
        assert entry["sha256"] == bundle.sha256_of(path)
    assert manifest["total_bytes"] == sum(e["size"] for e in manifest["files"])


def test_install_sh_installs_into_site_and_prints_env(fake_ray_wheel, tmp_path):
    out = tmp_path / "bundle"
    write_synthetic_bundle(out, fake_ray_wheel, tmp_path)
    site = tmp_path / "site"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(out / "install.sh"), str(site)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (site / "ray" / "serve" / "__init__.py").is_file()
    assert not (site / "ray" / "rllib").exists()
    assert (site / "tinydep" / "__init__.py").read_text() == "VALUE = 42\n"
    for line in ("export NCCL_NVLS_ENABLE=0", "export TORCH_SYMM_MEM_DISABLE_MULTICAST=1",
                 "export NVSHMEM_DISABLE_NVLS=1", f"export PYTHONPATH={site}"):
        assert line in proc.stdout
    assert "tandem-env.sh" in proc.stdout and (site / "tandem-env.sh").is_file()
    # msgpack and click are in this venv; nothing the synthetic bundle needs is missing.
    assert "WARNING" not in proc.stderr
    check = subprocess.run(
        ["bash", "-c", f"source {site}/tandem-env.sh && {sys.executable} -c "
                       "'import tinydep, ray_extra; print(tinydep.VALUE, ray_extra.EXTRA)'"],
        capture_output=True, text=True, timeout=60)
    assert check.stdout.strip() == "42 1", check.stderr


def test_install_sh_refuses_damaged_bundle_and_wrong_python(fake_ray_wheel, tmp_path):
    out = tmp_path / "bundle"
    write_synthetic_bundle(out, fake_ray_wheel, tmp_path)
    env = dict(os.environ, PYTHON=sys.executable)
    with open(out / "ray-9.9.9.tar.xz", "ab") as f:
        f.write(b"corrupt")
    proc = subprocess.run(["bash", str(out / "install.sh"), str(tmp_path / "site")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "sha256 mismatch: ray-9.9.9.tar.xz" in proc.stderr
    assert not (tmp_path / "site").exists()

    (out / "install.sh").write_text(
        bundle.install_script(BundleConfig(out_dir=out, python_version="2.7")))
    proc = subprocess.run(["bash", str(out / "install.sh"), str(tmp_path / "site")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "this bundle is for Python 2.7" in proc.stderr


def test_size_limit_fails_clearly(fake_ray_wheel, tmp_path):
    out = tmp_path / "bundle"
    write_synthetic_bundle(out, fake_ray_wheel, tmp_path)
    files = [bundle.describe(out, "ray-9.9.9.tar.xz", "ray-archive", "ray", "9.9.9")]
    assert bundle.check_size(out, files, max_size_mb=1) < bundle.MIB
    with pytest.raises(BundleError, match=r"(?s)over the limit of 0.001 MiB.*ray-9.9.9.tar.xz"):
        bundle.check_size(out, files, max_size_mb=0.001)


def test_out_dir_that_is_not_a_bundle_is_left_alone(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="refusing to overwrite"):
        bundle.build_bundle(BundleConfig(out_dir=tmp_path), log=lambda msg: None)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_pip_download_failure_says_what_to_do(tmp_path, monkeypatch):
    # An index nobody listens on stands in for "no network".
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    parser = argparse.ArgumentParser()
    bundle.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path / "b"), "--no-project"])
    err_file = tmp_path / "err.txt"
    with open(err_file, "w") as err, monkeypatch.context() as m:
        m.setattr(sys, "stderr", err)
        rc = bundle.run(args)
    message = err_file.read_text()
    assert rc == 2
    assert "pip download of ray==2.60.0 failed" in message
    assert "needs a package index" in message


def _slow_requested(config) -> bool:
    return "slow" in (config.getoption("markexpr") or "") or bool(os.environ.get("TANDEM_RUN_SLOW"))


@pytest.mark.slow
def test_real_bundle_builds_fits_and_installs(tmp_path, request):
    """Downloads ~100 MB from PyPI. Builds for this interpreter so install.sh can be run here."""
    if not _slow_requested(request.config):
        pytest.skip("downloads ~100 MB: run with -m slow (or TANDEM_RUN_SLOW=1)")
    version = "%d.%d" % sys.version_info[:2]
    out = tmp_path / "bundle"
    manifest = bundle.build_bundle(
        BundleConfig(out_dir=out, python_version=version, project_dir=bundle.SOURCE_TREE),
        log=print,
    )
    names = {Path(f["path"]).name for f in manifest["files"]}
    assert "ray-2.60.0.tar.xz" in names
    assert any(n.startswith("tandem_serve-") for n in names)
    assert len(names) == len(bundle.DEFAULT_COMPANION_PINS) + 2
    assert manifest["total_bytes"] < 64 * bundle.MIB
    print(f"real bundle for cp{version.replace('.', '')}: {manifest['total_bytes'] / bundle.MIB:.1f} MiB")

    site = tmp_path / "site"
    proc = subprocess.run(["bash", str(out / "install.sh"), str(site)],
                          env=dict(os.environ, PYTHON=sys.executable),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert not (site / "ray" / "rllib").exists() and not (site / "ray" / "jars").exists()
    probe = ("import ray, ray.serve, fastapi, zmq, cluster.bundle; "
             "from ray.serve.request_router import RequestRouter; print(ray.__file__)")
    env = dict(os.environ, PYTHONPATH=str(site))
    got = subprocess.run([sys.executable, "-c", probe], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip().startswith(str(site))
