"""`tandem bundle`: the offline install bundle for a GPU host without internet.

This module owns the recipe of `shared/OFFLINE_GPU_HOST.md` as code: Ray's wheel unpacked,
trimmed of the parts Serve does not need and packed with xz; the companion wheels Ray Serve
imports that such hosts lack; Tandem itself as a wheel; a manifest (names, versions, sizes,
sha256) and an `install.sh` that installs all of it into one SITE folder with no network.

Layout written under `--out` (default `.bundle`):

    ray-<version>.tar.xz     Ray, trimmed, to be unpacked into SITE
    wheels/*.whl             companions + tandem_serve, `pip install --no-index --target SITE`
    manifest.json            what is in the bundle, with sha256 and sizes
    install.sh               the host-side installer (checks sums, installs, prints env lines)

The bundle has to fit the 64 MiB that can be carried to those hosts, so the size is checked
and the build fails, naming the largest files, when it is over.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

MIB = 1024 * 1024

DEFAULT_RAY_PIN = "ray==2.60.0"

# Companions Ray Serve needs that the GPU hosts lack (OFFLINE_GPU_HOST.md, step 2). Pins that
# matter: grpcio-reflection must not be newer than the host's grpcio (1.84.0 there); fastapi
# 0.16x imports opentelemetry-api; Serve imports grpc_reflection at start. Tandem's own: xgrammar
# (its torch, transformers, numpy and triton requirements are met by the host's).
DEFAULT_COMPANION_PINS: tuple[str, ...] = (
    "aiohttp_cors==0.8.1",
    "annotated_types==0.8.0",
    "apache_tvm_ffi==0.1.15.post2",  # xgrammar's runtime
    "colorful==0.5.8",
    "fastapi==0.165.0",
    "grpcio_reflection==1.84.0",
    "importlib_metadata==10.2.0",
    "jsonschema==4.26.0",
    "jsonschema_specifications==2025.9.1",
    "opentelemetry_api==1.45.2",
    "pydantic==2.14.3",
    "pydantic_core==2.50.4",
    "pyzmq==27.3.0",
    "referencing==0.37.0",
    "rpds_py==2026.9.1",
    "starlette==1.10.0",
    "typing_inspection==0.4.5",
    "uvicorn==0.54.0",
    "xgrammar==0.2.9",  # structured output (engine/structured.py): 1.3 MB, with apache_tvm_ffi 4.6 MB
    # The official OpenAI client, which bench/serving_path_bench.py (and `tandem bench`'s users)
    # drive the app with, and what it imports beyond the host's packages.
    "openai==3.63.0",
    "httpx2==2.17.0",
    "httpcore2==2.17.0",
    "truststore==0.10.5",
    "jiter==0.19.0",
    "sniffio==1.3.1",
    "anyio==4.16.0",
    "h11==0.16.0",
)

# Folders of Ray's wheel that serving never imports (OFFLINE_GPU_HOST.md, step 1).
DEFAULT_RAY_TRIM: tuple[str, ...] = (
    "ray/jars",
    "ray/rllib",
    "ray/tune",
    "ray/train",
    "ray/data",
    "ray/llm",
    "ray/air/examples",
    "ray/dashboard/client",
)

# NVLink multicast must stay off on those hosts (OFFLINE_GPU_HOST.md, step 3).
HOST_ENV: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}

# torch >= 2.6 ships manylinux_2_28 wheels, so a host that runs torch has glibc >= 2.28.
DEFAULT_PLATFORM = "manylinux_2_28_x86_64"
DEFAULT_PYTHON_VERSION = "3.12"
# The checkout this module runs from (editable install); a wheel install has no pyproject here.
SOURCE_TREE = Path(__file__).resolve().parent.parent

MANIFEST_NAME = "manifest.json"
INSTALL_NAME = "install.sh"
WHEELS_DIR = "wheels"


class BundleError(RuntimeError):
    """A bundle could not be built; the message says why and what to do."""


@dataclass(frozen=True)
class BundleConfig:
    out_dir: Path
    python_version: str = DEFAULT_PYTHON_VERSION
    platform: str = DEFAULT_PLATFORM
    ray_pin: str = DEFAULT_RAY_PIN
    companion_pins: tuple[str, ...] = DEFAULT_COMPANION_PINS
    ray_trim: tuple[str, ...] = DEFAULT_RAY_TRIM
    skip_ray_trim: bool = False
    project_dir: Path | None = None  # None: leave the Tandem wheel out
    max_size_mb: float = 64.0
    xz_preset: int = 6


@dataclass(frozen=True)
class BundleFile:
    path: str  # relative to the bundle folder
    kind: str  # "ray-archive" | "wheel"
    name: str
    version: str
    size: int
    sha256: str


@dataclass(frozen=True)
class TrimResult:
    archive: Path
    removed_dirs: tuple[str, ...]
    unpacked_bytes: int
    removed_bytes: int


# ---------------------------------------------------------------------------------------------
# pure steps (tested on synthetic wheels)


def wheel_name_version(filename: str) -> tuple[str, str]:
    """`pydantic_core-2.50.4-cp312-...whl` -> ("pydantic_core", "2.50.4")."""
    parts = Path(filename).name.split("-")
    if len(parts) < 5 or not filename.endswith(".whl"):
        raise BundleError(f"not a wheel file name: {filename}")
    return parts[0], parts[1]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(MIB), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expand_platforms(platform: str) -> list[str]:
    """pip does not widen `manylinux_2_28_x86_64` to older glibc tags the way it does for the
    running interpreter, so a host with glibc 2.28 would miss manylinux2014 wheels (Ray's).
    Widen it here: manylinux_2_N_arch -> every manylinux_2_M_arch for 17 <= M <= N, plus the
    legacy manylinux2014/2010/1 aliases. Other platforms pass through."""
    prefix = "manylinux_2_"
    if not platform.startswith(prefix):
        return [platform]
    minor_str, _, arch = platform[len(prefix):].partition("_")
    if not minor_str.isdigit() or not arch:
        return [platform]
    minor = int(minor_str)
    tags = [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)]
    if minor >= 17:
        tags += [f"manylinux2014_{arch}", f"manylinux2010_{arch}", f"manylinux1_{arch}"]
    return tags


def _unpack_wheel(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            target = (dest / info.filename).resolve()
            if not str(target).startswith(str(dest.resolve()) + os.sep):
                raise BundleError(f"{wheel.name}: member escapes the folder: {info.filename}")
            zf.extract(info, dest)
            mode = (info.external_attr >> 16) & 0o777
            if mode and not info.is_dir():
                os.chmod(target, mode)


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _rewrite_record(unpacked: Path, removed: list[str]) -> None:
    """Drop RECORD lines of removed files, so `pip uninstall`/`pip check` see a consistent
    install rather than hundreds of missing files."""
    if not removed:
        return
    for record in unpacked.glob("*.dist-info/RECORD"):
        kept = [
            line
            for line in record.read_text().splitlines()
            if not any(line.startswith(prefix.rstrip("/") + "/") for prefix in removed)
        ]
        record.write_text("\n".join(kept) + "\n")


def _move_data_dir(unpacked: Path) -> None:
    """A wheel's `<name>.data/{purelib,platlib}` goes to the site root when installed; do the
    same so the archive can simply be untarred into SITE. Scripts/headers are not needed."""
    for data_dir in unpacked.glob("*.data"):
        for scheme in ("purelib", "platlib"):
            src = data_dir / scheme
            if src.is_dir():
                for child in src.iterdir():
                    shutil.move(str(child), str(unpacked / child.name))
        shutil.rmtree(data_dir)


def _open_xz_sink(out_path: Path, preset: int):
    """A writable xz stream: the `xz` tool (multi-threaded) when present, else lzma."""
    xz = shutil.which("xz")
    if xz:
        out = open(out_path, "wb")
        proc = subprocess.Popen([xz, "-T0", f"-{preset}", "-c"], stdin=subprocess.PIPE, stdout=out)
        return proc, out
    return None, lzma.open(out_path, "wb", preset=preset)


def pack_tar_xz(folder: Path, out_path: Path, preset: int = 6, mtime: int | None = None) -> None:
    """Pack the contents of `folder` (not the folder itself) as a tar.xz, in sorted order with
    fixed owners (and, given `mtime`, fixed times), so the same inputs give the same bytes."""
    proc, sink = _open_xz_sink(out_path, preset)
    stream = proc.stdin if proc else sink
    try:
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(folder.rglob("*")):
                arcname = path.relative_to(folder).as_posix()
                info = tar.gettarinfo(str(path), arcname)
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if mtime is not None:
                    info.mtime = mtime
                if info.isfile():
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
                else:
                    tar.addfile(info)
    finally:
        if proc:
            proc.stdin.close()
            rc = proc.wait()
            sink.close()
            if rc != 0:
                raise BundleError(f"xz failed with exit code {rc} while writing {out_path}")
        else:
            sink.close()


def _wheel_mtime(wheel: Path) -> int:
    """The newest member time in the wheel: a stable timestamp for everything packed from it."""
    with zipfile.ZipFile(wheel) as zf:
        newest = max(info.date_time for info in zf.infolist())
    return int(time.mktime(newest + (0, 0, -1)))


def trim_and_pack_wheel(
    wheel: Path, out_path: Path, trim: tuple[str, ...], preset: int = 6
) -> TrimResult:
    """Unpack `wheel`, remove the `trim` folders (paths inside the wheel), pack as tar.xz."""
    with tempfile.TemporaryDirectory(prefix="tandem-trim-") as tmp:
        unpacked = Path(tmp)
        _unpack_wheel(wheel, unpacked)
        _move_data_dir(unpacked)
        before = _folder_bytes(unpacked)
        removed: list[str] = []
        for rel in trim:
            target = unpacked / rel
            if target.is_dir():
                shutil.rmtree(target)
                removed.append(rel)
            elif target.exists():
                target.unlink()
                removed.append(rel)
        _rewrite_record(unpacked, removed)
        after = _folder_bytes(unpacked)
        pack_tar_xz(unpacked, out_path, preset, mtime=_wheel_mtime(wheel))
    return TrimResult(out_path, tuple(removed), after, before - after)


def normalize_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_requirements(wheel: Path) -> list[str]:
    """The `Requires-Dist` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(
            (n for n in zf.namelist() if n.count("/") == 1 and n.endswith(".dist-info/METADATA")),
            None,
        )
        if meta_name is None:
            raise BundleError(f"{wheel.name} has no .dist-info/METADATA")
        metadata = zf.read(meta_name).decode("utf-8", "replace")
    header = metadata.split("\n\n", 1)[0]
    return [line.split(":", 1)[1].strip() for line in header.splitlines()
            if line.startswith("Requires-Dist:")]


def target_marker_env(python_version: str, platform: str) -> dict[str, str]:
    machine = "x86_64" if platform.endswith("x86_64") else platform.rsplit("_", 1)[-1]
    return {
        "python_version": python_version,
        "python_full_version": f"{python_version}.0",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "platform_machine": machine,
        "extra": "",
    }


def host_requirements(
    wheels: list[Path], python_version: str, platform: str
) -> dict[str, list[str]]:
    """What the bundled wheels require (no extras) that the bundle itself does not carry:
    the host must already have these. Maps a requirement name to the bundled wheels that
    need it, so install.sh can say which missing package breaks what."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip always vendors it
        from pip._vendor.packaging.requirements import Requirement
    env = target_marker_env(python_version, platform)
    provided = {normalize_name(wheel_name_version(w.name)[0]) for w in wheels}
    needed: dict[str, list[str]] = {}
    for wheel in wheels:
        owner = wheel_name_version(wheel.name)[0]
        for line in wheel_requirements(wheel):
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate(env):
                continue
            name = normalize_name(req.name)
            if name not in provided:
                needed.setdefault(name, []).append(owner)
    return dict(sorted(needed.items()))


def describe(bundle_dir: Path, rel: str, kind: str, name: str, version: str) -> BundleFile:
    path = bundle_dir / rel
    return BundleFile(rel, kind, name, version, path.stat().st_size, sha256_of(path))


def write_manifest(
    bundle_dir: Path,
    config: BundleConfig,
    files: list[BundleFile],
    trim: TrimResult | None,
    host_requires: dict[str, list[str]] | None = None,
) -> Path:
    manifest = {
        "format": 1,
        "created_unix": int(time.time()),
        "python_version": config.python_version,
        "implementation": "cp",
        "platform": config.platform,
        "ray": {
            "pin": config.ray_pin,
            "trimmed_dirs": list(trim.removed_dirs) if trim else [],
            "unpacked_bytes": trim.unpacked_bytes if trim else None,
        },
        "env": HOST_ENV,
        # Not in the bundle; expected on the host already (install.sh checks and warns).
        "host_requires": host_requires or {},
        "total_bytes": sum(f.size for f in files),
        "files": [asdict(f) for f in files],
    }
    path = bundle_dir / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def install_script(config: BundleConfig) -> str:
    env_lines = "\n".join(f'echo "export {k}={v}"' for k, v in HOST_ENV.items())
    return f"""#!/usr/bin/env bash
# Installs this Tandem offline bundle into SITE, with no network; see docs/CLUSTER.md.
#   bash install.sh [SITE]        (default SITE: ./site beside this script)
#   PYTHON=python3.12 bash install.sh /opt/tandem-site
# Then `source SITE/tandem-env.sh` (or paste the lines printed at the end).
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
SITE="${{1:-${{SITE:-$HERE/site}}}}"
PYTHON="${{PYTHON:-python3}}"
WANT="{config.python_version}"

have="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$have" != "$WANT" ] && [ -z "${{TANDEM_BUNDLE_ANY_PYTHON:-}}" ]; then
  echo "install.sh: this bundle is for Python $WANT but $PYTHON is $have;" >&2
  echo "  set PYTHON=python$WANT, or rebuild with: tandem bundle --python-version $have" >&2
  exit 2
fi

# Every file must match the manifest before anything is installed.
"$PYTHON" - "$HERE" <<'PY'
import hashlib, json, pathlib, sys
root = pathlib.Path(sys.argv[1])
bad = []
for entry in json.loads((root / "{MANIFEST_NAME}").read_text())["files"]:
    path = root / entry["path"]
    if not path.is_file():
        bad.append(f"missing: {{entry['path']}}")
        continue
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry["sha256"]:
        bad.append(f"sha256 mismatch: {{entry['path']}}")
if bad:
    sys.exit("install.sh: bundle is damaged:\\n  " + "\\n  ".join(bad))
print("install.sh: all files match manifest.json")
PY

# What the bundle leaves to the host (manifest "host_requires"): warn about what is missing.
"$PYTHON" - "$HERE" <<'PY' || true
import importlib.metadata as md, json, pathlib, sys
needed = json.loads((pathlib.Path(sys.argv[1]) / "{MANIFEST_NAME}").read_text())["host_requires"]
missing = []
for name, users in needed.items():
    try:
        md.version(name)
    except md.PackageNotFoundError:
        missing.append(f"{{name}} (needed by {{', '.join(users)}})")
if missing:
    print("install.sh: WARNING: not installed for this Python, and not in the bundle:\\n  "
          + "\\n  ".join(missing)
          + "\\n  Some may be optional; add the ones you need with `tandem bundle --extra NAME==VER`.",
          file=sys.stderr)
PY

mkdir -p "$SITE"
SITE="$(cd "$SITE" && pwd)"
for archive in "$HERE"/ray-*.tar.xz; do
  echo "install.sh: unpacking $(basename "$archive") into $SITE"
  tar -C "$SITE" -xJf "$archive"
done

if "$PYTHON" -m pip --version >/dev/null 2>&1; then
  "$PYTHON" -m pip install --no-index --no-deps --upgrade --target "$SITE" "$HERE"/{WHEELS_DIR}/*.whl
else
  # No pip on the host: these wheels are plain zips with no build step, so unpacking them is
  # the install (console scripts are not generated; use `python -m tandem.cluster.cli`).
  echo "install.sh: no pip for $PYTHON; unpacking wheels directly" >&2
  for whl in "$HERE"/{WHEELS_DIR}/*.whl; do "$PYTHON" -m zipfile -e "$whl" "$SITE"; done
fi

{{
  echo "export PYTHONPATH=$SITE\\${{PYTHONPATH:+:\\$PYTHONPATH}}"
  echo "export PATH=$SITE/bin:\\$PATH"
{_indent(env_lines, "  ")}
}} > "$SITE/tandem-env.sh"

echo
echo "install.sh: done. Put these in the environment of every Ray process on this host"
echo "(or: source $SITE/tandem-env.sh), and start Ray with --include-dashboard=false:"
cat "$SITE/tandem-env.sh"
"""


def _indent(text: str, prefix: str) -> str:
    return "\n".join(prefix + line for line in text.splitlines())


def check_size(bundle_dir: Path, files: list[BundleFile], max_size_mb: float) -> int:
    total = sum(f.size for f in files) + sum(
        (bundle_dir / n).stat().st_size for n in (MANIFEST_NAME, INSTALL_NAME)
        if (bundle_dir / n).exists()
    )
    if total > max_size_mb * MIB:
        largest = sorted(files, key=lambda f: f.size, reverse=True)[:5]
        listing = "\n".join(f"  {f.size / MIB:8.1f} MiB  {f.path}" for f in largest)
        raise BundleError(
            f"bundle is {total / MIB:.1f} MiB, over the limit of {max_size_mb:g} MiB "
            f"(--max-size-mb); largest files:\n{listing}\n"
            f"The files are left in {bundle_dir} for inspection."
        )
    return total


# ---------------------------------------------------------------------------------------------
# steps that call pip


def _pip(args: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BundleError(
            f"{what} failed (pip exit code {proc.returncode}).\n"
            f"command: {' '.join(cmd)}\n{tail}\n"
            "`tandem bundle` needs a package index (PyPI or a mirror set in pip.conf / "
            "PIP_INDEX_URL): build the bundle on a machine with one, then carry the folder "
            "to the offline host."
        )


def pip_download(pins: list[str], dest: Path, config: BundleConfig) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    args = [
        "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
        "--python-version", config.python_version, "--implementation", "cp",
        "-d", str(dest),
    ]
    for tag in expand_platforms(config.platform):
        args += ["--platform", tag]
    _pip(args + pins, f"pip download of {', '.join(pins)}")
    got = sorted(set(dest.glob("*.whl")) - before)
    if not got and pins:
        raise BundleError(f"pip download of {', '.join(pins)} produced no wheel in {dest}")
    return got


def build_project_wheel(project_dir: Path, dest: Path) -> Path:
    if not (project_dir / "pyproject.toml").is_file():
        raise BundleError(f"no pyproject.toml in {project_dir}: cannot build the Tandem wheel")
    dest.mkdir(parents=True, exist_ok=True)
    before = set(dest.glob("*.whl"))
    args = ["wheel", "--no-deps", "--disable-pip-version-check", "-w", str(dest)]
    # Reuse this environment's setuptools when it has one: no index needed for the build.
    if importlib.util.find_spec("setuptools") is not None:
        args.append("--no-build-isolation")
    _pip(args + [str(project_dir)], f"building the Tandem wheel from {project_dir}")
    got = sorted(set(dest.glob("*.whl")) - before)
    if len(got) != 1:
        raise BundleError(f"expected one Tandem wheel in {dest}, found {[p.name for p in got]}")
    return got[0]


def _prepare_out_dir(out_dir: Path) -> None:
    """Reuse the folder of an earlier bundle, but never wipe a folder that is something else."""
    if out_dir.exists():
        entries = [p for p in out_dir.iterdir()]
        if entries and not (out_dir / MANIFEST_NAME).exists():
            raise BundleError(
                f"{out_dir} is not empty and holds no {MANIFEST_NAME}: refusing to overwrite it; "
                "pass an empty or new --out folder"
            )
        for path in entries:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def build_bundle(config: BundleConfig, log=print) -> dict:
    """Build the bundle into `config.out_dir`; returns the manifest. Raises BundleError."""
    out_dir = config.out_dir
    _prepare_out_dir(out_dir)
    wheels_dir = out_dir / WHEELS_DIR
    wheels_dir.mkdir()
    files: list[BundleFile] = []
    bundled_wheels: list[Path] = []

    with tempfile.TemporaryDirectory(prefix="tandem-bundle-") as tmp:
        log(f"downloading {config.ray_pin} (cp{config.python_version.replace('.', '')}, "
            f"{config.platform})")
        ray_wheel = pip_download([config.ray_pin], Path(tmp), config)[0]
        name, version = wheel_name_version(ray_wheel.name)
        archive_rel = f"ray-{version}.tar.xz"
        trim = () if config.skip_ray_trim else config.ray_trim
        log(f"trimming {ray_wheel.name} ({ray_wheel.stat().st_size / MIB:.1f} MiB) and packing "
            f"{archive_rel}")
        trim_result = trim_and_pack_wheel(ray_wheel, out_dir / archive_rel, trim, config.xz_preset)
        files.append(describe(out_dir, archive_rel, "ray-archive", name, version))

        if config.companion_pins:
            log(f"downloading {len(config.companion_pins)} companion wheels")
            bundled_wheels += pip_download(list(config.companion_pins), wheels_dir, config)

        if config.project_dir is not None:
            log(f"building the Tandem wheel from {config.project_dir}")
            bundled_wheels.append(build_project_wheel(config.project_dir, wheels_dir))

        for wheel in bundled_wheels:
            rel = f"{WHEELS_DIR}/{wheel.name}"
            files.append(describe(out_dir, rel, "wheel", *wheel_name_version(wheel.name)))
        host_requires = host_requirements(
            [ray_wheel, *bundled_wheels], config.python_version, config.platform
        )

    write_manifest(out_dir, config, files, trim_result, host_requires)
    script = out_dir / INSTALL_NAME
    script.write_text(install_script(config))
    script.chmod(0o755)
    total = check_size(out_dir, files, config.max_size_mb)
    log(f"bundle written to {out_dir}: {len(files)} files, {total / MIB:.1f} MiB; "
        f"the host must already have: {', '.join(host_requires) or 'nothing else'}")
    return json.loads((out_dir / MANIFEST_NAME).read_text())


# ---------------------------------------------------------------------------------------------
# command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Build the offline install bundle (trimmed Ray, companion wheels, Tandem wheel, "
        "manifest, install.sh) for GPU hosts without internet."
    )
    parser.add_argument("--out", type=Path, default=Path(".bundle"),
                        help="output folder (default: .bundle)")
    parser.add_argument("--python-version", default=DEFAULT_PYTHON_VERSION,
                        help="target Python X.Y (default: %(default)s)")
    parser.add_argument("--platform", default=DEFAULT_PLATFORM,
                        help="target wheel platform; manylinux_2_N also takes older manylinux "
                             "wheels (default: %(default)s)")
    parser.add_argument("--ray", default=DEFAULT_RAY_PIN, help="Ray pin (default: %(default)s)")
    parser.add_argument("--pin", action="append", default=None, metavar="REQ",
                        help="companion wheel pin, repeatable; replaces the default list")
    parser.add_argument("--extra", action="append", default=[], metavar="REQ",
                        help="extra wheel pin added to the default list, repeatable")
    parser.add_argument("--skip-ray-trim", action="store_true",
                        help="pack Ray's wheel whole (larger than 64 MiB)")
    parser.add_argument("--project", type=Path, default=SOURCE_TREE,
                        help="Tandem source tree to build the wheel from (default: %(default)s)")
    parser.add_argument("--no-project", action="store_true",
                        help="leave the Tandem wheel out")
    parser.add_argument("--max-size-mb", type=float, default=64.0,
                        help="fail if the bundle is larger (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    pins = tuple(args.pin) if args.pin is not None else DEFAULT_COMPANION_PINS
    config = BundleConfig(
        out_dir=args.out,
        python_version=args.python_version,
        platform=args.platform,
        ray_pin=args.ray,
        companion_pins=pins + tuple(args.extra),
        skip_ray_trim=args.skip_ray_trim,
        project_dir=None if args.no_project else args.project,
        max_size_mb=args.max_size_mb,
    )
    try:
        build_bundle(config)
    except BundleError as err:
        print(f"tandem bundle: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="tandem bundle")
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))
