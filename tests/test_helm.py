"""The Helm chart renders, lints and validates offline, and hands the step pods the right settings.

The chart is rendered with Helm's own engine (helm-python-sdk) for the default values and for the GPU +
external-S3 profile, linted in strict mode, and every rendered manifest is validated against the Kubernetes
OpenAPI schemas shipped in kubernetes-validate (strict: unknown fields are errors). The official Airflow chart is a
dependency fetched by `helm dependency build`; offline it is absent, so the renders here disable it
(`airflow.enabled=false`) and the Airflow values are checked as data.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "lora-pipeline"
PROFILES = {
    "default": CHART / "values.yaml",
    "gpu-external-s3": CHART / "values-gpu-external-s3.yaml",
}
RELEASE, NAMESPACE = "lp", "ml"
# Oldest Kubernetes the chart declares (kubeVersion >=1.27; the oldest schema set kept here at or above it) and newest.
KUBE_VERSIONS = ("1.29.0", kubernetes_validate.utils.latest_version())
EXECUTOR_KEYS = {
    "LORA_PIPELINE_EXECUTOR",
    "LORA_PIPELINE_NAMESPACE",
    "LORA_PIPELINE_IMAGE_GPU",
    "LORA_PIPELINE_IMAGE_CPU",
    "LORA_PIPELINE_GPU_RESOURCE",
    "LORA_PIPELINE_GPU_COUNT",
    "LORA_PIPELINE_GPU_NODE_SELECTOR",
    "LORA_PIPELINE_GPU_TOLERATIONS",
    "LORA_PIPELINE_S3_SECRET",
    "LORA_PIPELINE_MLFLOW_SECRET",
    "LORA_PIPELINE_S3_ENDPOINT",
    "LORA_PIPELINE_MLFLOW_URI",
    "LORA_PIPELINE_BUCKET",
    "LORA_PIPELINE_SERVICE_ACCOUNT",
    "LORA_PIPELINE_MODEL_CACHE_PVC",
}


def profile_values(profile: str, **overrides) -> dict:
    """The values of one profile file, with the Airflow dependency off (it is not fetched offline)."""
    values = yaml.safe_load(PROFILES[profile].read_text()) if profile != "default" else {}
    values.setdefault("airflow", {})["enabled"] = False
    for key, value in overrides.items():
        values[key] = {**values.get(key, {}), **value}
    return values


def render(values: dict) -> tuple[list[dict], str]:
    """Render the chart: (every manifest as a dict, NOTES.txt)."""
    with helm.Chart.load(CHART) as chart:
        files = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs, notes = [], ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs, notes


def find(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def executor_config(docs: list[dict]) -> dict[str, str]:
    (configmap,) = find(docs, "ConfigMap", f"{RELEASE}-lora-pipeline-executor")
    return configmap["data"]


def pod_specs(docs: list[dict]) -> list[dict]:
    return [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet", "Job")]


@pytest.fixture(scope="module", params=sorted(PROFILES))
def rendered(request):
    docs, notes = render(profile_values(request.param))
    return request.param, docs, notes


def test_lint_strict(tmp_path):
    # The only finding on the chart as committed is the dependency that `helm dependency build` fetches.
    fetched = any((CHART / "charts").glob("airflow-*.tgz"))
    report = helm.lint(CHART, profile_values("default"), strict=True)
    assert report["errors"] == ([] if fetched else ["chart directory is missing these dependencies: airflow"]), report
    # With that stanza removed, strict lint (warnings are errors) finds nothing, for every profile.
    chart = tmp_path / "lora-pipeline"
    shutil.copytree(CHART, chart, ignore=shutil.ignore_patterns("charts"))
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    meta.pop("dependencies")
    (chart / "Chart.yaml").write_text(yaml.safe_dump(meta))
    for profile in PROFILES:
        report = helm.lint(chart, profile_values(profile), strict=True, namespace=NAMESPACE)
        assert report["errors"] == [], (profile, report)
        assert all(m["severity"] < 2 for m in report["messages"]), (profile, report["messages"])


def test_manifests_validate_strict(rendered, tmp_path):
    profile, docs, _ = rendered
    # the command line, as a user runs it on `helm template` output
    manifest = tmp_path / f"{profile}.yaml"
    manifest.write_text(yaml.safe_dump_all(docs))
    cli = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run([cli, "--strict", "-k", KUBE_VERSIONS[0], manifest], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.count("passed") == len(docs), result.stdout + result.stderr
    assert len(docs) >= 8, profile
    for doc in docs:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{profile}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: {e.message}")


def test_profiles_deploy_the_right_parts(rendered):
    profile, docs, _ = rendered
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", f"{RELEASE}-lora-pipeline-mlflow") in kinds
    assert ("Service", f"{RELEASE}-lora-pipeline-mlflow") in kinds
    assert ("ServiceAccount", "lora-pipeline-launcher") in kinds
    assert ("RoleBinding", f"{RELEASE}-lora-pipeline-launcher") in kinds
    assert len(find(docs, "NetworkPolicy")) >= 2
    in_cluster_store = {
        ("Deployment", f"{RELEASE}-lora-pipeline-s3"),
        ("Service", f"{RELEASE}-lora-pipeline-s3"),
        ("PersistentVolumeClaim", f"{RELEASE}-lora-pipeline-s3-data"),
    }
    if profile == "default":
        assert in_cluster_store <= kinds
        assert executor_config(docs)["LORA_PIPELINE_S3_ENDPOINT"] == (
            f"http://{RELEASE}-lora-pipeline-s3.{NAMESPACE}.svc.cluster.local:8333"
        )
    else:
        assert not in_cluster_store & kinds
        assert executor_config(docs)["LORA_PIPELINE_S3_ENDPOINT"] == "https://s3.eu-west-1.amazonaws.com"
        assert ("PersistentVolumeClaim", f"{RELEASE}-lora-pipeline-model-cache") in kinds


def test_executor_configmap_gpu_settings():
    values = yaml.safe_load(PROFILES["gpu-external-s3"].read_text())
    docs, _ = render(profile_values("gpu-external-s3"))
    data = executor_config(docs)
    assert set(data) == EXECUTOR_KEYS
    assert all(isinstance(v, str) for v in data.values())
    assert data["LORA_PIPELINE_EXECUTOR"] == "kubernetes"
    assert data["LORA_PIPELINE_GPU_RESOURCE"] == "nvidia.com/gpu"
    assert int(data["LORA_PIPELINE_GPU_COUNT"]) == values["pipeline"]["gpu"]["count"] == 1
    assert json.loads(data["LORA_PIPELINE_GPU_NODE_SELECTOR"]) == values["pipeline"]["gpu"]["nodeSelector"]
    assert json.loads(data["LORA_PIPELINE_GPU_TOLERATIONS"]) == values["pipeline"]["gpu"]["tolerations"]
    assert data["LORA_PIPELINE_IMAGE_GPU"] == "registry.example.com/ml/lora-pipeline-step-cuda:0.1.0"
    assert data["LORA_PIPELINE_IMAGE_CPU"] == "registry.example.com/ml/lora-pipeline-step-cpu:0.1.0"
    assert data["LORA_PIPELINE_NAMESPACE"] == "lora-steps"
    assert data["LORA_PIPELINE_BUCKET"] == "acme-lora-pipeline"
    assert data["LORA_PIPELINE_MODEL_CACHE_PVC"] == f"{RELEASE}-lora-pipeline-model-cache"
    # the step pods' service account, PVC and network policy live where the step pods run
    (step_sa,) = find(docs, "ServiceAccount", data["LORA_PIPELINE_SERVICE_ACCOUNT"])
    assert step_sa["metadata"]["namespace"] == "lora-steps" and step_sa["automountServiceAccountToken"] is False
    (pvc,) = find(docs, "PersistentVolumeClaim", data["LORA_PIPELINE_MODEL_CACHE_PVC"])
    assert pvc["metadata"]["namespace"] == "lora-steps" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    (role,) = find(docs, "Role")
    assert role["metadata"]["namespace"] == "lora-steps"
    assert {"create", "watch", "delete"} <= set(role["rules"][0]["verbs"]) and role["rules"][0]["resources"] == ["pods"]

    # other GPU settings flow through: an AMD pool with two GPUs per step pod
    amd = {
        "resource": "amd.com/gpu",
        "count": 2,
        "nodeSelector": {"gpu.vendor": "amd"},
        "tolerations": [{"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    docs, _ = render(profile_values("default", pipeline={"gpu": amd}))
    data = executor_config(docs)
    assert (data["LORA_PIPELINE_GPU_RESOURCE"], data["LORA_PIPELINE_GPU_COUNT"]) == ("amd.com/gpu", "2")
    assert json.loads(data["LORA_PIPELINE_GPU_NODE_SELECTOR"]) == amd["nodeSelector"]
    assert json.loads(data["LORA_PIPELINE_GPU_TOLERATIONS"]) == amd["tolerations"]
    # without a model cache the DAG gets an empty PVC name (and uses a scratch volume)
    assert data["LORA_PIPELINE_MODEL_CACHE_PVC"] == ""


def test_no_secret_value_outside_secrets():
    sentinels = {
        "s3AccessKeyId": "AKIA" + secrets.token_hex(8).upper(),
        "s3SecretAccessKey": secrets.token_urlsafe(30),
        "mlflowBackendUri": f"postgresql://mlflow:{secrets.token_hex(12)}@db.example.com:5432/mlflow",
    }
    for profile in PROFILES:
        docs, notes = render(profile_values(profile, devSecrets={"create": True, **sentinels}))
        forms = [v for s in sentinels.values() for v in (s, base64.b64encode(s.encode()).decode())]
        holders = [d for d in docs if any(f in yaml.safe_dump(d) for f in forms)]
        assert holders and {d["kind"] for d in holders} == {"Secret"}, [d["kind"] for d in holders]
        assert not any(f in notes for f in forms)
        # every credential-like env var of every pod comes from a Secret, never a literal value
        for spec in pod_specs(docs):
            for container in spec.get("containers", []) + spec.get("initContainers", []):
                for env in container.get("env", []):
                    if re.search(r"KEY_ID|SECRET|PASSWORD|TOKEN|BACKEND_STORE_URI", env["name"]):
                        assert "value" not in env, env
                        assert env["valueFrom"]["secretKeyRef"]["name"], env
                for envfrom in container.get("envFrom", []):
                    assert "configMapRef" not in envfrom or not any(
                        f in yaml.safe_dump(find(docs, "ConfigMap", envfrom["configMapRef"]["name"])) for f in forms
                    )
        for configmap in find(docs, "ConfigMap"):
            for key, value in configmap["data"].items():
                assert not re.search(r"KEY_ID|SECRET_ACCESS|PASSWORD", key) or value == "" or key.endswith("_SECRET")
                assert "://" not in value or "@" not in value, (key, value)  # no user:password@host URIs


def test_mlflow_server_settings(rendered):
    profile, docs, _ = rendered
    (deployment,) = find(docs, "Deployment", f"{RELEASE}-lora-pipeline-mlflow")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    args = dict(a.split("=", 1) if "=" in a else (a, "") for a in container["args"])
    bucket = "lora-pipeline" if profile == "default" else "acme-lora-pipeline"
    assert args["--artifacts-destination"] == f"s3://{bucket}/mlflow-artifacts"
    assert "--serve-artifacts" in args
    assert "--backend-store-uri" not in args
    env = {e["name"]: e for e in container["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {
        "name": "lora-pipeline-mlflow-db",
        "key": "uri",
    }
    assert env["MLFLOW_CREATE_MODEL_VERSION_SOURCE_VALIDATION_REGEX"]["value"]
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == executor_config(docs)["LORA_PIPELINE_S3_ENDPOINT"]
    # the Host header the step pods send (the executor's MLflow URI) and a port-forward's are allowed
    allowed = args["--allowed-hosts"].split(",")
    mlflow_host = executor_config(docs)["LORA_PIPELINE_MLFLOW_URI"].split("://", 1)[1]
    assert mlflow_host in allowed and "localhost:5000" in allowed
    assert "*" not in allowed
    if profile == "gpu-external-s3":
        assert "mlflow.ml.example.com" in allowed


def test_network_policies(rendered):
    profile, docs, _ = rendered
    (steps,) = find(docs, "NetworkPolicy", f"{RELEASE}-lora-pipeline-steps")
    assert steps["spec"]["podSelector"]["matchLabels"] == {"kubernetes_pod_operator": "True"}
    assert steps["spec"]["ingress"] == [] and set(steps["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    egress_ports = {p["port"] for rule in steps["spec"]["egress"] for p in rule.get("ports", [])}
    assert {53, 5000, 443} <= egress_ports
    assert (8333 in egress_ports) == (profile == "default")
    (mlflow,) = find(docs, "NetworkPolicy", f"{RELEASE}-lora-pipeline-mlflow")
    peers = mlflow["spec"]["ingress"][0]["from"]
    assert {"kubernetes_pod_operator": "True"} in [p["podSelector"]["matchLabels"] for p in peers]


def test_schema_rejects_bad_values():
    cases = [
        ({"objectStore": {"mode": "external"}}, "/objectStore/external/endpoint"),
        ({"objectStore": {"mode": "nfs"}}, "/objectStore/mode"),
        ({"pipeline": {"gpu": {"count": 0}}}, "/pipeline/gpu/count"),
        ({"pipeline": {"gpu": {"tolerations": [{"key": "gpu", "effect": "Sometimes"}]}}}, "/pipeline/gpu/tolerations"),
        ({"images": {"pullPolicy": "Sometimes"}}, "/images/pullPolicy"),
        ({"objectStorage": {}}, "objectStorage"),
    ]
    for overrides, where in cases:
        with pytest.raises(helm.HelmValuesError, match=re.escape(where)):
            render(profile_values("default", **overrides))


def test_airflow_values_match_the_chart():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    airflow = values["airflow"]
    assert airflow["executor"] == "KubernetesExecutor"
    assert airflow["dags"]["gitSync"]["enabled"] is False and airflow["dags"]["persistence"]["enabled"] is False
    # the task pods run as the launcher, which the Role lets create step pods
    assert airflow["workers"]["serviceAccount"]["name"] == values["launcher"]["serviceAccountName"]
    # extraEnvFrom (templated by the Airflow chart) names the executor ConfigMap of this release
    env_from = yaml.safe_load(airflow["extraEnvFrom"].replace("{{ .Release.Name }}", RELEASE))
    docs, notes = render(profile_values("default"))
    assert env_from == [{"configMapRef": {"name": f"{RELEASE}-lora-pipeline-executor"}}]
    assert find(docs, "ConfigMap", env_from[0]["configMapRef"]["name"])
    # S3 credentials reach Airflow from the Secret, as secretKeyRefs
    assert {s["secretName"] for s in airflow["secret"]} == {values["objectStore"]["credentialsSecret"]}
    # with Airflow on, a launcher that differs from the Airflow task pods' service account is refused
    bad = profile_values("default", airflow={"enabled": True, "workers": {"serviceAccount": {"name": "other"}}})
    with pytest.raises(helm.HelmRenderError, match="launcher.serviceAccountName"):
        render(bad)


def test_notes_tell_how_to_reach_the_uis():
    _, notes = render(profile_values("default"))
    assert f"kubectl --namespace {NAMESPACE} port-forward svc/{RELEASE}-lora-pipeline-mlflow 5000:5000" in notes
    _, notes = render(
        {**profile_values("default"), "airflow": {**yaml.safe_load((CHART / "values.yaml").read_text())["airflow"]}}
    )
    assert f"kubectl --namespace {NAMESPACE} port-forward svc/{RELEASE}-api-server 8080:8080" in notes


def test_airflow_enabled_creates_the_gpu_pool_the_dag_uses():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    docs, _ = render({"airflow": values["airflow"]})  # Airflow on: our templates render, the dependency is absent
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSIONS[0], strict=True)
    (job,) = find(docs, "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    # the pool the DAG puts its GPU steps in, sized by the values
    (dag_pool,) = re.findall(
        r'^GPU_POOL = "([^"]+)"', (CHART.parents[1] / "dags" / "lora_pipeline_tasks.py").read_text(), re.M
    )
    command = container["args"][-1]
    assert f'airflow pools set "{dag_pool}" {values["pipeline"]["gpuPool"]["slots"]} ' in command
    assert command.startswith("airflow db check-migrations")
    assert container["image"] == "lora-pipeline-airflow:0.1.0"
    (env,) = container["env"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-metadata", "key": "connection"}
    # without Airflow in the release, or with the pool managed elsewhere, there is no Job
    assert not find(render(profile_values("default"))[0], "Job")
    off = {
        "airflow": values["airflow"],
        "pipeline": {**values["pipeline"], "gpuPool": {"create": False, "name": "x", "slots": 1}},
    }
    assert not find(render(off)[0], "Job")
