"""The `tandem` command line as a user meets it: every failure is one line on stderr,
`tandem <command>: <what went wrong>`, and a non-zero exit (the real CLI, in a subprocess);
every option's default is in `--help`, and no API key from the environment ever is; serving
beyond loopback without a key is warned about."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest
import torch

from tandem.cluster import cli, serve_cli


def run_tandem(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tandem.cluster.cli", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from parsers(sub)


def test_every_option_of_every_command_shows_its_default():
    missing = []
    for parser in parsers(cli.build_parser()):
        formatter = parser._get_formatter()
        assert isinstance(formatter, cli.HelpFormatter), parser.prog
        for action in parser._actions:
            if action.option_strings and not action.required and not isinstance(action, argparse._HelpAction):
                if "default" not in formatter._expand_help(action):
                    missing.append(f"{parser.prog} {action.option_strings[0]}")
    assert not missing, missing


def test_help_never_shows_an_api_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("TANDEM_API_KEY", "sekrit-tandem")
    monkeypatch.setenv("OPENAI_API_KEY", "sekrit-openai")
    for parser in parsers(cli.build_parser()):
        text = parser.format_help()
        assert "sekrit" not in text, parser.prog


def test_serve_listens_on_loopback_unless_told_and_warns_when_open_without_a_key(monkeypatch):
    monkeypatch.delenv("TANDEM_API_KEY", raising=False)
    args = cli.build_parser().parse_args(["serve"])
    assert args.host == "127.0.0.1" and "api_key" not in serve_cli.app_args(args)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert serve_cli.exposure_warning(host, 8000, None) is None
    for host in ("0.0.0.0", "::", "10.1.2.3", "myhost"):
        warning = serve_cli.exposure_warning(host, 8000, None)
        assert warning and warning.startswith("tandem serve: warning:") and "--api-key" in warning
        assert serve_cli.exposure_warning(host, 8000, "key") is None
    monkeypatch.setenv("TANDEM_API_KEY", "from-env")
    assert serve_cli.app_args(cli.build_parser().parse_args(["serve"]))["api_key"] == "from-env"


def test_serve_kv_cache_dtype_reaches_the_engines():
    parse = cli.build_parser().parse_args
    assert "kv_cache_dtype" not in serve_cli.app_args(parse(["serve"]))["engine_kwargs"]
    assert serve_cli.app_args(parse(["serve", "--kv-cache-dtype", "fp8"]))["engine_kwargs"] == {"kv_cache_dtype": "fp8"}
    with pytest.raises(ValueError, match="contradicts"):
        serve_cli.app_args(parse(["serve", "--kv-cache-dtype", "fp8", "--engine-arg", "kv_cache_dtype=auto"]))


CASES = [
    # (argv, what the line says, exit status)
    (["generate", "--model", "{tmp}/missing"], "is not a Hugging Face model folder", 1),
    (["generate", "--max-tokens", "0"], "max_tokens must be an integer >= 1", 1),
    (["generate", "--max-tokens", "many"], "argument --max-tokens: invalid int value: 'many'", 2),
    (["serve", "--model", "{tmp}/missing"], "is not a Hugging Face model folder", 1),
    (["serve", "--prefill", "1"], "--prefill and --decode go together", 1),
    (["serve", "--autoscale", "decode"], "expected POOL=MIN:MAX", 2),
    (["serve", "--kv-cache-dtype", "int8"], "argument --kv-cache-dtype: invalid choice: 'int8'", 2),
    (["generate", "--kv-cache-dtype", "fp8_e5m2"], "argument --kv-cache-dtype: invalid choice", 2),
    (["generate", "--quantization", "int4"], "argument --quantization: invalid choice: 'int4'", 2),
    (["status", "--address", "not-an-address"], "not-an-address", 1),
    (["bench", "run"], "the following arguments are required: --url", 2),
    (["bench", "compare", "{tmp}/a.json", "{tmp}/b.json"], "a.json", 1),
    ([], "the following arguments are required: command", 2),
]


@pytest.mark.parametrize("argv,says,status", CASES, ids=[" ".join(c[0]) or "(none)" for c in CASES])
def test_a_failing_command_prints_one_line_and_exits_non_zero(tmp_path, argv, says, status):
    done = run_tandem(*(a.format(tmp=tmp_path) for a in argv), env={"TANDEM_CACHE": str(tmp_path / "cache")})
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    command = " ".join(argv[:2] if argv[:1] == ["bench"] else argv[:1])
    assert lines[0].startswith(f"tandem {command}: " if command else "tandem: "), lines[0]
    assert says in lines[0] and "Traceback" not in done.stderr
    assert done.returncode == status and done.stdout == ""


def test_fp8_flags_reach_the_engine(tmp_path):
    """`serve --quantization fp8` becomes the engines' EngineConfig field; `make-model --quantization
    fp8` writes a folder `generate` runs; an unsupported quantization_config is one line."""
    args = cli.build_parser().parse_args(["serve", "--quantization", "fp8", "--engine-arg", "max_num_seqs=8"])
    assert serve_cli.app_args(args)["engine_kwargs"] == {"max_num_seqs": 8, "quantization": "fp8"}
    assert run_tandem("make-model", str(tmp_path / "m"), "--quantization", "fp8").returncode == 0
    done = run_tandem("generate", "--model", str(tmp_path / "m"), "--max-tokens", "3")
    assert done.returncode == 0 and "3 tokens" in done.stdout, done.stderr
    config = tmp_path / "m" / "config.json"
    config.write_text(config.read_text().replace('"quant_method": "fp8"', '"quant_method": "awq"'))
    done = run_tandem("generate", "--model", str(tmp_path / "m"))
    assert done.returncode == 1 and done.stderr.splitlines()[0].startswith(
        "tandem generate: unsupported quantization_config.quant_method 'awq'"), done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a torch without CUDA")
def test_cuda_on_a_cpu_torch_is_one_line(tmp_path):
    done = run_tandem("generate", "--device", "cuda", env={"TANDEM_CACHE": str(tmp_path)})
    assert done.returncode == 1 and done.stderr.splitlines() == [
        f"tandem generate: device 'cuda': this torch is a CPU-only build (torch {torch.__version__}); use device cpu"]


def test_status_without_a_cluster_is_one_line(tmp_path):
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():  # `auto` would join that cluster instead
        pytest.skip("a Ray cluster of another process runs on this machine")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "tandem.cluster.cli", "status"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        "tandem status: no Ray cluster is running on this machine (start one with `tandem serve`, "
        "or pass --address HOST:PORT)"]


def test_join_cluster_turns_rays_connection_error_into_what_to_do(monkeypatch):
    import ray

    from tandem.cluster.ray_session import join_cluster

    def no_cluster(**kwargs):
        raise ConnectionError("Could not find any running Ray instance. Please specify ...")

    monkeypatch.setattr(ray, "init", no_cluster)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConnectionError, match="no Ray cluster is running on this machine"):
        join_cluster("auto")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(ConnectionError, match="cannot reach the Ray cluster at 10.0.0.9:6379: Could not find"):
        join_cluster("10.0.0.9:6379")


def test_describe_names_unexpected_errors_and_keeps_one_line():
    assert cli.describe(FileNotFoundError("no such model")) == "no such model"
    assert cli.describe(RuntimeError("deploy failed:\n  Traceback ...\n  boom")) == \
        "RuntimeError: deploy failed: (TANDEM_DEBUG=1 shows the rest)"
    assert cli.describe(AssertionError()) == "AssertionError (TANDEM_DEBUG=1 shows the rest)"
