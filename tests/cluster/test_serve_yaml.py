"""cluster/serve.yaml: valid for Ray Serve's own schema, three separately scaled deployments,
each pool on its own custom resource; the Helm chart embeds the same shape."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import ServeDeploySchema

ROOT = Path(__file__).resolve().parents[2]


def serve_config() -> dict:
    return yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())


def deployments(config: dict) -> dict[str, dict]:
    (app,) = config["applications"]
    return {d["name"]: d for d in app["deployments"]}


def test_serve_yaml_parses_with_serve_schema():
    schema = ServeDeploySchema.model_validate(serve_config())
    (app,) = schema.applications
    assert app.name == "tandem" and app.import_path == "tandem.workers.app:build_app"
    assert app.args["mode"] in ("disaggregated", "colocated") and app.args["model"]
    assert [d.name for d in app.deployments] == ["OpenAIIngress", "PrefillWorker", "DecodeWorker"]


def test_serve_schema_rejects_a_bad_field():
    config = serve_config()
    deployments(config)["DecodeWorker"]["ray_actor_options"]["num_gpus"] = "one"
    with pytest.raises(Exception, match="num_gpus"):
        ServeDeploySchema.model_validate(config)


@pytest.mark.parametrize("name,pool", [("PrefillWorker", "prefill"), ("DecodeWorker", "decode")])
def test_pools_have_their_own_resources_and_autoscaling(name, pool):
    spec = deployments(serve_config())[name]
    options = spec["ray_actor_options"]
    assert options["num_gpus"] == 1 and options["resources"] == {pool: 1}
    # Serve's own AutoscalingConfig checks bounds and delays (ServeDeploySchema keeps a dict).
    autoscaling = AutoscalingConfig(**spec["autoscaling_config"])
    assert 1 <= autoscaling.min_replicas <= autoscaling.max_replicas
    assert autoscaling.downscale_delay_s > autoscaling.upscale_delay_s


@pytest.mark.parametrize("name,policy", [("PrefillWorker", "PrefillPolicy"), ("DecodeWorker", "DecodePolicy")])
def test_pools_scale_with_their_own_policy(name, policy):
    from ray.serve._private.autoscaling_state import _resolve_policy_callable

    from tandem.workers import autoscaling

    for config in (serve_config(), yaml.safe_load((ROOT / "helm" / "values.yaml").read_text())["serveConfig"]):
        autoscaling_config = AutoscalingConfig(**deployments(config)[name]["autoscaling_config"])
        assert autoscaling_config.policy.policy_function == f"tandem.workers.autoscaling:{policy}"
        # What the controller builds: the policy class with the config's targets.
        built = _resolve_policy_callable(autoscaling_config.policy)
        assert type(built).__name__ == policy
        expected = getattr(autoscaling, policy)(**autoscaling_config.policy.policy_kwargs).targets
        assert built.targets == expected


def test_decode_drains_longer_than_prefill():
    specs = deployments(serve_config())
    assert (specs["DecodeWorker"]["graceful_shutdown_timeout_s"]
            >= specs["PrefillWorker"]["graceful_shutdown_timeout_s"])
    assert "num_gpus" not in specs["OpenAIIngress"]["ray_actor_options"]


def test_helm_chart_embeds_the_same_deployments():
    values = yaml.safe_load((ROOT / "helm" / "values.yaml").read_text())
    ServeDeploySchema.model_validate(values["serveConfig"])
    ours, chart = deployments(serve_config()), deployments(values["serveConfig"])
    assert set(ours) == set(chart)
    for name in ours:
        assert ours[name]["ray_actor_options"] == chart[name]["ray_actor_options"]
    # A pool's Serve replica ceiling fits in its worker group: one GPU per replica.
    for pool, name in (("prefill", "PrefillWorker"), ("decode", "DecodeWorker")):
        group = values[pool]
        assert (chart[name]["autoscaling_config"]["max_replicas"]
                <= group["maxReplicas"] * group["gpusPerPod"])
