"""The kubernetes and docker executors: pod specs of GPU steps (dry run), secrets by reference, no credentials."""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
from contextlib import redirect_stdout
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
sys.path.insert(0, str(DAGS))

from airflow.dag_processing.dagbag import DagBag  # noqa: E402
from airflow.sdk import DAG  # noqa: E402
from lora_pipeline_tasks import GPU_POOL, ExecutorConfig, step_task  # noqa: E402

SECRET_VALUE = "do-not-leak-7f3a9c"  # a credential in the worker's environment must never reach a pod spec
K8S_ENV = {
    "LORA_PIPELINE_EXECUTOR": "kubernetes",
    "LORA_PIPELINE_NAMESPACE": "lora",
    "LORA_PIPELINE_IMAGE_GPU": "registry.example/lora-pipeline-gpu:1.0",
    "LORA_PIPELINE_IMAGE_CPU": "registry.example/lora-pipeline-cpu:1.0",
    "LORA_PIPELINE_GPU_RESOURCE": "nvidia.com/gpu",
    "LORA_PIPELINE_GPU_COUNT": "1",
    "LORA_PIPELINE_GPU_NODE_SELECTOR": '{"node.kubernetes.io/instance-type": "gpu-h100"}',
    "LORA_PIPELINE_GPU_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]',
    "LORA_PIPELINE_S3_SECRET": "lora-s3",
    "LORA_PIPELINE_MLFLOW_SECRET": "lora-mlflow",
    "LORA_PIPELINE_S3_ENDPOINT": "http://seaweedfs-s3.lora:8333",
    "LORA_PIPELINE_MLFLOW_URI": "http://mlflow.lora:5000",
    "LORA_PIPELINE_BUCKET": "lora-prod",
    "LORA_PIPELINE_SERVICE_ACCOUNT": "lora-steps",
    "LORA_PIPELINE_MODEL_CACHE_PVC": "lora-model-cache",
}
ARGS = ["--run-id", "manual__1", "--dataset", "s3://lora-prod/runs/manual__1/preprocess/", "--out", "s3://x/tune/"]


@pytest.fixture
def k8s_env(monkeypatch):
    for key, value in K8S_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", SECRET_VALUE)
    return K8S_ENV


def _dry_run(op) -> dict:
    """The pod the operator would create (what `dry_run()` prints), as the Kubernetes API would receive it."""
    from kubernetes.client import ApiClient

    out = io.StringIO()
    with redirect_stdout(out):
        op.dry_run()
    assert SECRET_VALUE not in out.getvalue()
    pod = ApiClient().sanitize_for_serialization(op.build_pod_request_obj(dry_run=True))
    assert SECRET_VALUE not in json.dumps(pod)
    return pod


def test_gpu_step_pod_spec(k8s_env):
    with DAG("k8s_check", schedule=None, start_date=datetime(2026, 1, 1)):
        op = step_task("tune", ARGS, gpu=True, config=ExecutorConfig.from_env())
    pod = _dry_run(op)
    spec = pod["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "base"]
    assert container["image"] == "registry.example/lora-pipeline-gpu:1.0"
    assert container["command"] == ["python", "-m", "lora_pipeline.steps.tune"]
    assert container["args"] == ARGS  # the same flags as the local and docker executors
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "1"}
    assert spec["nodeSelector"] == {"node.kubernetes.io/instance-type": "gpu-h100"}
    assert spec["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert spec["serviceAccountName"] == "lora-steps"
    assert pod["metadata"]["namespace"] == "lora"
    # credentials by reference to Secrets, never by value
    secret_refs = sorted(e["secretRef"]["name"] for e in container["envFrom"])
    assert secret_refs == ["lora-mlflow", "lora-s3"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["S3_ENDPOINT_URL"] == "http://seaweedfs-s3.lora:8333"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.lora:5000"
    assert env["LORA_PIPELINE_CACHE"] == "/var/cache/lora-pipeline"
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env)
    assert {"name": "model-cache", "mountPath": "/var/cache/lora-pipeline"} in container["volumeMounts"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == "model-cache"]
    assert volume["persistentVolumeClaim"]["claimName"] == "lora-model-cache"
    assert op.pool == GPU_POOL
    # the result comes back through the XCom sidecar
    assert op.do_xcom_push is True
    assert any(c["name"] == "airflow-xcom-sidecar" for c in spec["containers"])


def test_cpu_step_pod_spec_has_no_gpu(k8s_env):
    with DAG("k8s_check_cpu", schedule=None, start_date=datetime(2026, 1, 1)):
        op = step_task("register", ["--run-id", "r", "--evaluation", "s3://x/", "--model-name", "m"],
                       config=ExecutorConfig.from_env())  # fmt: skip
    spec = _dry_run(op)["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "base"]
    assert container["image"] == "registry.example/lora-pipeline-cpu:1.0"
    assert "nvidia.com/gpu" not in str(container.get("resources", {}))
    assert not spec.get("nodeSelector") and not spec.get("tolerations")
    assert op.pool != GPU_POOL


def test_finetune_dag_under_kubernetes(k8s_env):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    bag = DagBag(dag_folder=str(DAGS / "lora_finetune.py"))
    assert bag.import_errors == {}
    dag = bag.dags["lora_finetune"]
    for step in ("preprocess", "invert", "tune", "evaluate", "register"):
        assert isinstance(dag.get_task(step), KubernetesPodOperator), step
    tune = dag.get_task("tune")
    assert tune.container_resources.limits == {"nvidia.com/gpu": "1"}
    assert tune.node_selector == {"node.kubernetes.io/instance-type": "gpu-h100"}
    assert [t.key for t in tune.tolerations] == ["nvidia.com/gpu"]
    assert tune.cmds == ["python", "-m", "lora_pipeline.steps.tune"]
    assert dag.get_task("register").container_resources is None
    distill = dag.get_task("distill")
    assert distill.operator_class is KubernetesPodOperator or distill.operator_class.__name__ == "KubernetesPodOperator"
    assert "task.arguments" in distill.map_index_template
    # nothing from the worker's credentials was captured when the DAG was parsed
    from airflow.serialization.serialized_objects import DagSerialization

    assert SECRET_VALUE not in str(DagSerialization.to_dict(dag))


def test_docker_executor_requests_gpus_and_keeps_credentials_out(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_VALUE)
    cfg = ExecutorConfig.from_env({"LORA_PIPELINE_EXECUTOR": "docker", "LORA_PIPELINE_GPU_COUNT": "2"})
    with DAG("docker_check", schedule=None, start_date=datetime(2026, 1, 1)):
        gpu = step_task("tune", ARGS, gpu=True, config=cfg)
        cpu = step_task("register", ARGS, config=cfg)
    assert gpu.entrypoint == ["python", "-m", "lora_pipeline.steps.tune"] and gpu.command == ARGS
    assert gpu.image == "lora-pipeline-gpu:latest" and cpu.image == "lora-pipeline-cpu:latest"
    assert gpu.device_requests[0]["Count"] == 2 and gpu.device_requests[0]["Capabilities"] == [["gpu"]]
    assert not cpu.device_requests
    assert gpu.pool == GPU_POOL
    assert SECRET_VALUE not in str(vars(gpu))  # credentials are added only when the container starts
