"""The executor factory: one function, `step_task`, builds a pipeline step as an Airflow task.

Every step is the same program (`python -m lora_pipeline.steps.<name> --flag value ...`, see docs/steps.md); only where
it runs changes. The deployment chooses with environment variables read when the DAG file is parsed
(no I/O, no ML imports):

| variable | meaning |
|---|---|
| `LORA_PIPELINE_EXECUTOR` | `local` (default: a subprocess of the worker), `docker`, `kubernetes` |
| `LORA_PIPELINE_PYTHON` | local: the interpreter that runs the steps (default: the worker's own) |
| `LORA_PIPELINE_IMAGE_GPU`, `LORA_PIPELINE_IMAGE_CPU` | docker/kubernetes: step images |
| `LORA_PIPELINE_GPU_RESOURCE`, `LORA_PIPELINE_GPU_COUNT` | GPU limit of GPU steps (`nvidia.com/gpu`, 1) |
| `LORA_PIPELINE_GPU_NODE_SELECTOR` | kubernetes: JSON object, node selector of GPU steps |
| `LORA_PIPELINE_GPU_TOLERATIONS` | kubernetes: JSON list of tolerations of GPU steps |
| `LORA_PIPELINE_NAMESPACE`, `LORA_PIPELINE_SERVICE_ACCOUNT` | kubernetes: where pods run, as whom |
| `LORA_PIPELINE_S3_SECRET`, `LORA_PIPELINE_MLFLOW_SECRET` | kubernetes: Secrets whose keys become env vars |
| `LORA_PIPELINE_S3_ENDPOINT`, `LORA_PIPELINE_MLFLOW_URI` | `S3_ENDPOINT_URL` / `MLFLOW_TRACKING_URI` of the steps |
| `LORA_PIPELINE_BUCKET` | bucket of run outputs (`s3://<bucket>/runs/<run_id>/<step>/`) |
| `LORA_PIPELINE_MODEL_CACHE_PVC` | kubernetes: PVC mounted as `LORA_PIPELINE_CACHE` (base model cache) |

Credentials never appear in a DAG, a flag or XCom: locally and under Docker the steps inherit them from
the worker's environment at run time; under Kubernetes they come from Secrets by reference.
Each task returns the step's result JSON (a small dict) as its XCom.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk import BaseOperator

EXECUTORS = ("local", "docker", "kubernetes")
GPU_POOL = "lora_gpu"  # caps how many GPU steps run at once (slots = GPUs); created by the deployment
STEPS = ("scan", "preprocess", "invert", "tune", "distill", "evaluate", "register", "finish")
CACHE_MOUNT = "/var/cache/lora-pipeline"
# passed from the worker's environment to local/docker steps at run time, never stored in the DAG
CREDENTIAL_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)
# passed as plain settings (not secret)
SETTING_VARS = ("S3_ENDPOINT_URL", "AWS_REGION", "MLFLOW_TRACKING_URI", "LORA_PIPELINE_CACHE")


def json_setting(name: str, raw: str, kind: type) -> Any:
    """A deployment setting holding JSON of `kind` (dict or list); empty: `kind()`. ValueError naming `name`."""
    raw = raw.strip()
    if not raw:
        return kind()
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name}: not valid JSON ({exc.msg}): {raw!r}") from None
    if not isinstance(value, kind):
        expected = {dict: "object", list: "array"}.get(kind, kind.__name__)
        raise ValueError(f"{name}: expected a JSON {expected}, got {type(value).__name__}: {raw!r}")
    return value


def _json_env(env: Mapping[str, str], name: str, kind: type) -> Any:
    return json_setting(name, env.get(name, ""), kind)


@dataclass(frozen=True)
class ExecutorConfig:
    """Where and how steps run; `from_env` reads the `LORA_PIPELINE_*` variables (see the module docstring).

    Args:
        executor: `local`, `docker` or `kubernetes`.
        python: interpreter of local steps.
        image_gpu / image_cpu: step images (docker, kubernetes).
        gpu_resource / gpu_count: the GPU limit of GPU steps.
        gpu_node_selector / gpu_tolerations: scheduling of GPU pods.
        namespace / service_account: where pods run.
        s3_secret / mlflow_secret: Kubernetes Secret names, mounted as environment variables.
        s3_endpoint / mlflow_uri: `S3_ENDPOINT_URL` / `MLFLOW_TRACKING_URI` given to the steps ('' = inherit).
        bucket: bucket of run outputs.
        model_cache_pvc: PersistentVolumeClaim for the base model cache ('' = none).
    """

    executor: str = "local"
    python: str = sys.executable
    image_gpu: str = "lora-pipeline-gpu:latest"
    image_cpu: str = "lora-pipeline-cpu:latest"
    gpu_resource: str = "nvidia.com/gpu"
    gpu_count: int = 1
    gpu_node_selector: dict = field(default_factory=dict)
    gpu_tolerations: list = field(default_factory=list)
    namespace: str = "default"
    service_account: str = ""
    s3_secret: str = ""
    mlflow_secret: str = ""
    s3_endpoint: str = ""
    mlflow_uri: str = ""
    bucket: str = "lora-pipeline"
    model_cache_pvc: str = ""

    def __post_init__(self):
        if self.executor not in EXECUTORS:
            raise ValueError(f"LORA_PIPELINE_EXECUTOR: expected one of {EXECUTORS}, got {self.executor!r}")
        if self.gpu_count < 0:
            raise ValueError(f"LORA_PIPELINE_GPU_COUNT: must be >= 0, got {self.gpu_count}")
        if not self.bucket or "/" in self.bucket:
            raise ValueError(f"LORA_PIPELINE_BUCKET: expected a bucket name, got {self.bucket!r}")
        for tol in self.gpu_tolerations:
            if not isinstance(tol, dict):
                raise ValueError(f"LORA_PIPELINE_GPU_TOLERATIONS: each toleration must be an object, got {tol!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ExecutorConfig:
        env = os.environ if env is None else env
        count = env.get("LORA_PIPELINE_GPU_COUNT", "1").strip() or "1"
        if not count.isdigit():
            raise ValueError(f"LORA_PIPELINE_GPU_COUNT: expected an integer, got {count!r}")
        return cls(
            executor=env.get("LORA_PIPELINE_EXECUTOR", "").strip() or "local",
            python=env.get("LORA_PIPELINE_PYTHON", "").strip() or sys.executable,
            image_gpu=env.get("LORA_PIPELINE_IMAGE_GPU", "").strip() or cls.image_gpu,
            image_cpu=env.get("LORA_PIPELINE_IMAGE_CPU", "").strip() or cls.image_cpu,
            gpu_resource=env.get("LORA_PIPELINE_GPU_RESOURCE", "").strip() or cls.gpu_resource,
            gpu_count=int(count),
            gpu_node_selector=_json_env(env, "LORA_PIPELINE_GPU_NODE_SELECTOR", dict),
            gpu_tolerations=_json_env(env, "LORA_PIPELINE_GPU_TOLERATIONS", list),
            namespace=env.get("LORA_PIPELINE_NAMESPACE", "").strip() or cls.namespace,
            service_account=env.get("LORA_PIPELINE_SERVICE_ACCOUNT", "").strip(),
            s3_secret=env.get("LORA_PIPELINE_S3_SECRET", "").strip(),
            mlflow_secret=env.get("LORA_PIPELINE_MLFLOW_SECRET", "").strip(),
            s3_endpoint=env.get("LORA_PIPELINE_S3_ENDPOINT", "").strip(),
            mlflow_uri=env.get("LORA_PIPELINE_MLFLOW_URI", "").strip(),
            bucket=env.get("LORA_PIPELINE_BUCKET", "").strip() or cls.bucket,
            model_cache_pvc=env.get("LORA_PIPELINE_MODEL_CACHE_PVC", "").strip(),
        )

    def settings(self) -> dict[str, str]:
        """Non-secret environment of a step set by the deployment (overrides what the worker has)."""
        env = {}
        if self.s3_endpoint:
            env["S3_ENDPOINT_URL"] = self.s3_endpoint
        if self.mlflow_uri:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_uri
        return env


def step_command(step: str) -> list[str]:
    """The entry point of a step; its flags follow it. The same in every executor."""
    if step not in STEPS:
        raise ValueError(f"step: expected one of {STEPS}, got {step!r}")
    return ["python", "-m", f"lora_pipeline.steps.{step}"]


# Lineage for the steps (docs/steps.md: AIRFLOW_CTX_* are recorded on the registered version).
AIRFLOW_CONTEXT_ENV = {
    "AIRFLOW_CTX_DAG_ID": "{{ dag.dag_id }}",
    "AIRFLOW_CTX_DAG_RUN_ID": "{{ run_id }}",
    "AIRFLOW_CTX_TASK_ID": "{{ task.task_id }}",
    "AIRFLOW_CTX_TRY_NUMBER": "{{ ti.try_number }}",
}


def _last_json(lines: Sequence[str]) -> dict[str, Any]:
    """The step's result: the last stdout line that is a JSON object."""
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise RuntimeError("the step printed no result JSON on its last stdout line")


class LocalStepOperator(BaseOperator):
    """Runs `python -m lora_pipeline.steps.<step> <arguments>` as a subprocess of the worker and returns its result JSON.

    stdout and stderr stream into the task log. Exit code 2 (invalid input) fails the task without retries;
    any other failure is retried.
    """

    template_fields: Sequence[str] = ("arguments", "env_vars")
    template_fields_renderers = {"arguments": "py", "env_vars": "py"}
    ui_color = "#e8f4e8"

    def __init__(self, *, step: str, arguments: list[str], python: str, env_vars: dict[str, str], **kwargs):
        super().__init__(**kwargs)
        self.step = step
        self.arguments = arguments
        self.python = python
        self.env_vars = env_vars

    def execute(self, context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowException, AirflowFailException

        cmd = [self.python, *step_command(self.step)[1:], *[str(a) for a in self.arguments]]
        env = {**os.environ, **self.env_vars, "PYTHONUNBUFFERED": "1"}
        self.log.info("Running %s", " ".join(cmd))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._proc = proc

        def pump_stderr():
            for line in proc.stderr:
                self.log.info("%s", line.rstrip())

        pump = threading.Thread(target=pump_stderr, daemon=True)
        pump.start()
        out_lines = []
        for line in proc.stdout:
            out_lines.append(line)
            self.log.info("%s", line.rstrip())
        code = proc.wait()
        pump.join(timeout=10)
        if code == 2:
            raise AirflowFailException(
                f"lora_pipeline.steps.{self.step}: invalid input or configuration (exit 2), not retried"
            )
        if code != 0:
            raise AirflowException(f"lora_pipeline.steps.{self.step}: exit code {code}")
        return _last_json(out_lines)

    def on_kill(self) -> None:
        """The task was stopped (UI, timeout): stop the step too; it leaves no half-published output."""
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _docker_operator_class():
    from airflow.providers.docker.operators.docker import DockerOperator

    class DockerStepOperator(DockerOperator):
        """DockerOperator that passes credentials from the worker's environment at run time and returns
        the step's result JSON (not the raw last log line)."""

        def execute(self, context):
            self.private_environment = {k: os.environ[k] for k in CREDENTIAL_VARS if k in os.environ}
            lines = super().execute(context) or []
            return _last_json([lines] if isinstance(lines, str) else lines)

    return DockerStepOperator


def _kubernetes_kwargs(config: ExecutorConfig, gpu: bool) -> dict[str, Any]:
    from airflow.providers.cncf.kubernetes.secret import Secret
    from kubernetes.client import models as k8s

    kwargs: dict[str, Any] = {
        "namespace": config.namespace,
        "image": config.image_gpu if gpu else config.image_cpu,
        "secrets": [Secret("env", None, name) for name in (config.s3_secret, config.mlflow_secret) if name],
        "do_xcom_push": True,  # the step writes /airflow/xcom/return.json; the sidecar returns it
        "get_logs": True,
        "on_finish_action": "delete_pod",
        "startup_timeout_seconds": 600,  # GPU nodes may scale up from zero
        "labels": {"app.kubernetes.io/part-of": "lora-pipeline"},
    }
    if config.service_account:
        kwargs["service_account_name"] = config.service_account
    if config.model_cache_pvc:
        kwargs["volumes"] = [
            k8s.V1Volume(
                name="model-cache",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=config.model_cache_pvc),
            )
        ]
        kwargs["volume_mounts"] = [k8s.V1VolumeMount(name="model-cache", mount_path=CACHE_MOUNT)]
    if gpu:
        limit = {config.gpu_resource: str(config.gpu_count)}
        kwargs["container_resources"] = k8s.V1ResourceRequirements(limits=limit, requests=limit)
        kwargs["node_selector"] = dict(config.gpu_node_selector)
        kwargs["tolerations"] = [k8s.V1Toleration(**_snake(t)) for t in config.gpu_tolerations]
    return kwargs


def _snake(toleration: dict) -> dict:
    """Kubernetes JSON keys (`tolerationSeconds`) to the client's argument names (`toleration_seconds`)."""
    names = {"tolerationSeconds": "toleration_seconds"}
    allowed = {"key", "operator", "value", "effect", "toleration_seconds"}
    out = {names.get(k, k): v for k, v in toleration.items()}
    unknown = set(out) - allowed
    if unknown:
        raise ValueError(f"LORA_PIPELINE_GPU_TOLERATIONS: unknown toleration field(s) {sorted(unknown)}")
    return out


def step_task(
    step: str,
    arguments: list[str] | Any,
    *,
    task_id: str | None = None,
    gpu: bool = False,
    config: ExecutorConfig | None = None,
    expand: Any = None,
    map_index_flag: str | None = None,
    **kwargs: Any,
):
    """Build the task that runs `python -m lora_pipeline.steps.<step> <arguments>` with the configured executor.

    Args:
        step: one of `STEPS`.
        arguments: the step's flags (Jinja-templated strings), or an XComArg that resolves to them.
            Ignored when `expand` is given.
        task_id: default: the step name.
        gpu: a GPU step: GPU image, GPU limit, node selector and tolerations, and the `lora_gpu` pool.
        config: default: `ExecutorConfig.from_env()`.
        expand: an XComArg resolving to a list of argument lists: one mapped task instance each.
        map_index_flag: name each mapped instance by the value of this flag (`--rank` -> "rank 4").
        **kwargs: any other BaseOperator argument (retries, trigger_rule, ...).
    """
    config = config or ExecutorConfig.from_env()
    task_id = task_id or step
    base = {"task_id": task_id, **kwargs}
    if gpu:
        base.setdefault("pool", GPU_POOL)
    env = {**AIRFLOW_CONTEXT_ENV, **config.settings()}

    if config.executor == "local":
        cls, field_name = LocalStepOperator, "arguments"
        base.update(step=step, python=config.python, env_vars=env)
    elif config.executor == "docker":
        from docker.types import DeviceRequest

        cls, field_name = _docker_operator_class(), "command"
        base.update(
            image=config.image_gpu if gpu else config.image_cpu,
            entrypoint=step_command(step),
            environment={**env, **({"LORA_PIPELINE_CACHE": CACHE_MOUNT} if config.model_cache_pvc else {})},
            device_requests=[DeviceRequest(count=config.gpu_count, capabilities=[["gpu"]])] if gpu else None,
            network_mode="host",  # reach S3/MLflow on the host like the other executors
            mount_tmp_dir=False,
            auto_remove="success",
            do_xcom_push=True,
            xcom_all=True,
        )
    else:
        from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

        cls, field_name = KubernetesPodOperator, "arguments"
        if config.model_cache_pvc:
            env["LORA_PIPELINE_CACHE"] = CACHE_MOUNT
        base.update(
            name=f"lora-{task_id.replace('_', '-')}",
            cmds=step_command(step),
            env_vars=env,
            **_kubernetes_kwargs(config, gpu),
        )

    if expand is None:
        return cls(**{field_name: arguments}, **base)
    if map_index_flag:
        # e.g. "rank 4": the value of that flag in the rendered arguments of the mapped instance
        label = map_index_flag.lstrip("-")
        base["map_index_template"] = (
            "{% set a = task." + field_name + " | list %}" + label + " {{ a[a.index('" + map_index_flag + "') + 1] }}"
        )
    return cls.partial(**base).expand(**{field_name: expand})
