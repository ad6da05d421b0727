"""The `ray up` YAMLs: valid for Ray's own cluster launcher (its defaults merged in and its
JSON schema checked, as `ray up` does), and GPU nodes carry their pool's custom resource."""
from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml", "local.yaml"])
def test_cluster_yaml_passes_ray_validation(name):
    prepared = prepare_config(copy.deepcopy(load(name)))
    validate_config(prepared)  # raises jsonschema.ValidationError on any bad field


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_validation_catches_a_broken_node_type(name):
    config = load(name)
    config["available_node_types"]["decode_gpu"]["resources"]["decode"] = "eight"
    with pytest.raises(Exception, match="eight"):
        validate_config(prepare_config(config))


def test_gcp_validation_catches_a_missing_node_config():
    config = load("gcp.yaml")
    del config["available_node_types"]["prefill_gpu"]["node_config"]
    with pytest.raises(Exception, match="node_config"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_pools_are_separate_gpu_node_types_with_one_unit_per_gpu(name):
    config = load(name)
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert not {"GPU", "prefill", "decode"} & set(head["resources"])
    for pool, node_type in (("prefill", "prefill_gpu"), ("decode", "decode_gpu")):
        spec = node_types[node_type]
        resources = spec["resources"]
        assert resources[pool] == resources["GPU"] >= 1
        other = "decode" if pool == "prefill" else "prefill"
        assert other not in resources
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= config["max_workers"]


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_cloud_installs_tandem_and_starts_serve_on_the_head(name):
    config = load(name)
    assert config["provider"]["type"] == name.split(".")[0]
    assert any("pip install" in c and "~/tandem" in c for c in config["setup_commands"])
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--include-dashboard=" in head
    assert "serve start" in head


def test_gcp_gpu_nodes_stop_on_host_maintenance():
    # GCP refuses to create GPU VMs that would live-migrate.
    node_types = load("gcp.yaml")["available_node_types"]
    for name in ("prefill_gpu", "decode_gpu"):
        assert {"onHostMaintenance": "TERMINATE"} in node_types[name]["node_config"]["scheduling"]


def run_worker_start(tmp_path: Path, node_ip: str, num_gpus: int) -> list[str]:
    """Run local.yaml's worker start command in bash with stand-ins for hostname, nvidia-smi
    and ray; returns the argv `ray start` got."""
    config = load("local.yaml")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    argv_file = tmp_path / "ray_argv.json"
    stubs = {
        "hostname": f"echo '{node_ip} 172.17.0.1'",
        "nvidia-smi": "for i in $(seq 0 $(({n} - 1))); do echo \"GPU $i: H100 (UUID: x)\"; done"
                      .format(n=num_gpus),
        "ray": f"""python3 -c 'import json,sys; json.dump(sys.argv[1:], open("{argv_file}", "w"))' "$@" """,
    }
    for name, body in stubs.items():
        (fake_bin / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (fake_bin / name).chmod(0o755)
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "tandem-env.sh").write_text("export NCCL_NVLS_ENABLE=0\n")
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}", HOME=str(tmp_path),
               RAY_HEAD_IP="10.0.0.10")
    for command in config["worker_start_ray_commands"]:
        subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    return json.loads(argv_file.read_text())


@pytest.mark.parametrize("node_ip,pool", [("10.0.0.11", "prefill"), ("10.0.0.12", "decode"),
                                          ("10.0.0.13", "decode")])
def test_local_workers_start_with_their_pool_resource(tmp_path, node_ip, pool):
    config = load("local.yaml")
    assert node_ip in config["provider"]["worker_ips"]
    argv = run_worker_start(tmp_path, node_ip, num_gpus=2)
    assert argv[0] == "start" and "--address=10.0.0.10:6379" in argv
    assert "--num-gpus=2" in argv
    resources = next(a for a in argv if a.startswith("--resources="))
    assert json.loads(resources.split("=", 1)[1]) == {pool: 2}


def test_local_prefill_ips_are_cluster_workers():
    config = load("local.yaml")
    command = " ".join(config["worker_start_ray_commands"])
    prefill_ips = re.search(r'PREFILL_IPS="([^"]*)"', command).group(1).split()
    assert prefill_ips and set(prefill_ips) < set(config["provider"]["worker_ips"])
    head = " ".join(config["head_start_ray_commands"])
    assert "--include-dashboard=false" in head and "--num-gpus=0" in head
    assert any("install.sh" in c for c in config["setup_commands"])
