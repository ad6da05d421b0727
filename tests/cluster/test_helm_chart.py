"""The KubeRay RayService chart in helm/.

Always checked (no helm needed): values.yaml against values.schema.json; every `.Values.x.y`
a template names exists in values.yaml; the RayService the templates produce, built here in
Python mirroring templates/rayservice.yaml, against the KubeRay RayService CRD's schema (kept in
tests/cluster/schemas, with its source). Checked when Helm is at hand (the `helm` binary, or the helm-python-sdk
package, which embeds Helm's Go SDK): `helm lint --strict`, `helm template`, the rendered
objects against the CRD, and that the Python mirror equals Helm's rendering.
"""
from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm"
RAYSERVICE_SCHEMA = Path(__file__).resolve().parent / "schemas" / "kuberay_rayservice_v1.schema.json"
RELEASE, NAMESPACE = "demo", "llm"


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def values_schema() -> dict:
    return json.loads((CHART / "values.schema.json").read_text())


def chart() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


_CRD_SCHEMA: dict | None = None


def rayservice_schema() -> dict:
    global _CRD_SCHEMA
    if _CRD_SCHEMA is None:
        _CRD_SCHEMA = json.loads(RAYSERVICE_SCHEMA.read_text())
    return _CRD_SCHEMA


def validate_rayservice(obj: dict) -> None:
    assert obj["apiVersion"] == "ray.io/v1" and obj["kind"] == "RayService"
    jsonschema.Draft7Validator(rayservice_schema()).validate(obj)


# --- values --------------------------------------------------------------------------------

def test_values_match_their_schema():
    jsonschema.Draft7Validator.check_schema(values_schema())
    jsonschema.validate(values(), values_schema())


@pytest.mark.parametrize("path,bad", [
    (("prefill", "gpusPerPod"), 0),
    (("decode", "maxReplicas"), "many"),
    (("serveConfig", "applications", 0, "args", "mode"), "mixed"),
    (("image", "pullPolicy"), "Sometimes"),
    (("decode", "gpus"), 1),  # unknown key: typo guard
])
def test_schema_rejects_bad_values(path, bad):
    doc = values()
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, values_schema())


def _values_paths(obj, prefix=()) -> set[tuple]:
    paths = {prefix} if prefix else set()
    if isinstance(obj, dict):
        for key, child in obj.items():
            paths |= _values_paths(child, prefix + (key,))
    return paths


def test_templates_reference_only_existing_values():
    known = _values_paths(values())
    referenced = set()
    for template in (CHART / "templates").iterdir():
        for match in re.finditer(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", template.read_text()):
            referenced.add(tuple(match.group(1).strip(".").split(".")))
    assert referenced, "templates reference no values at all"
    assert referenced <= known, f"unknown values: {sorted(referenced - known)}"
    # Values the chart documents but never uses would mislead users.
    top_level = {p[0] for p in referenced} | {"prefill", "decode"}  # pools go through a helper
    assert set(values()) <= top_level


# --- the manifest, built in Python the way templates/rayservice.yaml builds it ----------------

def labels(component: str | None = None) -> dict:
    meta = chart()
    out = {
        "app.kubernetes.io/name": meta["name"],
        "app.kubernetes.io/instance": RELEASE,
        "app.kubernetes.io/version": str(meta["appVersion"]),
        "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": f"{meta['name']}-{meta['version']}",
    }
    if component:
        out["tandem.dev/pool"] = component
    return out


def container(v: dict, component: str, resources: dict) -> dict:
    c = {"name": f"ray-{component}", "image": f"{v['image']['repository']}:{v['image']['tag']}",
         "imagePullPolicy": v["image"]["pullPolicy"]}
    if v.get("env"):
        c["env"] = v["env"]
    c["resources"] = resources
    c["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}}
    return c


def pod_spec(v: dict, group: dict, component: str, resources: dict) -> dict:
    spec: dict = {}
    if v.get("imagePullSecrets"):
        spec["imagePullSecrets"] = v["imagePullSecrets"]
    spec["containers"] = [container(v, component, resources)]
    if group.get("nodeSelector"):
        spec["nodeSelector"] = group["nodeSelector"]
    if group.get("tolerations"):
        spec["tolerations"] = group["tolerations"]
    return {"metadata": {"labels": labels(component)}, "spec": spec}


def worker_group(v: dict, pool: str) -> dict:
    group = v[pool]
    gpus = int(group["gpusPerPod"])
    resources = copy.deepcopy(group["resources"])
    resources["limits"]["nvidia.com/gpu"] = gpus
    resources["requests"]["nvidia.com/gpu"] = gpus
    return {
        "groupName": pool,
        "replicas": group["replicas"],
        "minReplicas": group["minReplicas"],
        "maxReplicas": group["maxReplicas"],
        "rayStartParams": {"num-gpus": str(gpus), "resources": f'"{{\\"{pool}\\": {gpus}}}"'},
        "template": pod_spec(v, group, pool, resources),
    }


def build_rayservice(v: dict) -> dict:
    name = v.get("fullnameOverride") or f"{RELEASE}-{v.get('nameOverride') or chart()['name']}"
    port = v["serveConfig"]["http_options"]["port"]
    cluster = {"rayVersion": v["rayVersion"], "enableInTreeAutoscaling": v["autoscaler"]["enabled"]}
    if v["autoscaler"]["enabled"]:
        cluster["autoscalerOptions"] = {"upscalingMode": v["autoscaler"]["upscalingMode"],
                                        "idleTimeoutSeconds": v["autoscaler"]["idleTimeoutSeconds"]}
    cluster["headGroupSpec"] = {
        "rayStartParams": v["head"]["rayStartParams"],
        "template": pod_spec(v, v["head"], "head", v["head"]["resources"]),
    }
    cluster["workerGroupSpecs"] = [worker_group(v, "prefill"), worker_group(v, "decode")]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name, "labels": labels()},
        "spec": {
            "serveService": {"metadata": {"name": f"{name}-serve"},
                             "spec": {"type": v["service"]["type"],
                                      "ports": [{"name": "http", "port": port, "targetPort": port}]}},
            "serveConfigV2": yaml.safe_dump(v["serveConfig"]),
            "rayClusterConfig": cluster,
        },
    }


def test_mirrored_manifest_validates_against_kuberay_crd():
    obj = build_rayservice(values())
    validate_rayservice(obj)
    groups = {g["groupName"]: g for g in obj["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for pool, group in groups.items():
        assert json.loads(json.loads(group["rayStartParams"]["resources"])) == {pool: 1}
        (c,) = group["template"]["spec"]["containers"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_crd_validation_catches_a_broken_manifest():
    obj = build_rayservice(values())
    del obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]
    with pytest.raises(jsonschema.ValidationError, match="template"):
        validate_rayservice(obj)


# --- with Helm -------------------------------------------------------------------------------

def helm_render(overrides: dict | None = None) -> dict[str, str]:
    """Template name -> rendered text, through the helm binary or helm-python-sdk."""
    if shutil.which("helm"):
        cmd = ["helm", "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        docs: dict[str, str] = {}
        if overrides:
            cmd += ["--set-json", ",".join(f"{k}={json.dumps(v)}" for k, v in overrides.items())]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        for part in out.split("---\n# Source: ")[1:]:
            source, _, body = part.partition("\n")
            docs[source] = body
        return docs
    helm = pytest.importorskip("helm_python", reason="neither `helm` nor helm-python-sdk installed")
    with helm.Chart.load(str(CHART)) as loaded:
        return loaded.render(overrides or {}, name=RELEASE, namespace=NAMESPACE)


def helm_lint() -> list[str]:
    if shutil.which("helm"):
        proc = subprocess.run(["helm", "lint", "--strict", str(CHART)], capture_output=True, text=True)
        return [] if proc.returncode == 0 else [proc.stdout + proc.stderr]
    helm = pytest.importorskip("helm_python", reason="neither `helm` nor helm-python-sdk installed")
    report = helm.lint(str(CHART), strict=True)
    # severity 1 is INFO (e.g. "icon is recommended"); anything above fails `--strict`.
    return report["errors"] + [m for m in report["messages"] if m["severity"] > 1]


def rendered_rayservice(overrides: dict | None = None) -> dict:
    docs = helm_render(overrides)
    (text,) = [t for path, t in docs.items() if path.endswith("rayservice.yaml")]
    return yaml.safe_load(text)


def test_helm_lint_strict_passes():
    assert helm_lint() == []


def test_helm_template_validates_against_crd_and_matches_mirror():
    obj = rendered_rayservice()
    validate_rayservice(obj)
    mirrored = build_rayservice(values())
    # serveConfigV2 is YAML text: compare what it means, not its layout.
    assert yaml.safe_load(obj["spec"].pop("serveConfigV2")) == yaml.safe_load(
        mirrored["spec"].pop("serveConfigV2"))
    assert obj == mirrored


def test_helm_template_follows_pool_values():
    overrides = {"decode": {**values()["decode"], "gpusPerPod": 4, "maxReplicas": 2}}
    obj = rendered_rayservice(overrides)
    validate_rayservice(obj)
    decode = obj["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]
    assert decode["groupName"] == "decode" and decode["maxReplicas"] == 2
    assert decode["rayStartParams"] == {"num-gpus": "4", "resources": '"{\\"decode\\": 4}"'}
    (c,) = decode["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 4
