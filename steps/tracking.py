"""MLflow tracking for the steps: one parent run per pipeline run, one nested run per step (and per rank).

The parent run is found (or created) by its tag `pipeline_run_id` (searched as its hash, `run_key`), so steps running in different pods
and retries land in the same run tree. Without MLFLOW_TRACKING_URI the steps run untracked (`NullTracker`).
Parameters are step flags only; credentials are never logged.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_ops.image_files import PICTURE_SUFFIXES

DEFAULT_EXPERIMENT = "lora-pipeline"
ROLE_TAG = "lora_pipeline.role"  # "pipeline" for the parent, "step" for nested runs
KEY_TAG = "lora_pipeline.run_key"  # `run_key(pipeline_run_id)`: what runs and model versions are searched by
SECRET_WORDS = ("secret", "password", "token_value", "access_key", "credential")


class NullTracker:
    """Tracking switched off: every call does nothing."""

    enabled = False
    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_image(self, image, artifact_file: str) -> None: ...
    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def loss_callback(self, every: int = 1):
        return _no_callback

    def flush(self) -> None: ...
    def end(self, status: str = "FINISHED") -> None: ...

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        return None


def _no_callback(*args, **kwargs) -> None:
    return None


def clean_params(params: Mapping[str, Any]) -> dict[str, str]:
    """Params as MLflow strings (≤ 6000 chars); any key that looks like a secret is dropped."""
    out = {}
    for key, value in params.items():
        if any(word in key.lower() for word in SECRET_WORDS):
            continue
        text = value if isinstance(value, str) else repr(value) if not isinstance(value, (int, float)) else str(value)
        out[key] = text[:6000]
    return out


def run_key(pipeline_run_id: str) -> str:
    """A search-safe key of a pipeline run id (any quotes, spaces or non-ASCII): runs and model versions are
    found by this tag, never by matching the free-text id inside a filter string."""
    import hashlib

    return hashlib.sha256(pipeline_run_id.encode("utf-8")).hexdigest()[:32]


def quote(value: str) -> str:
    """`value` as an MLflow filter string literal; a value holding both quote characters is refused."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r}: a name may not contain both ' and \"")


def _find_runs(client, experiment_id: str, filter_string: str):
    return client.search_runs(
        [experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"], max_results=1000
    )


def _get_or_create_run(client, experiment_id: str, filter_string: str, run_name: str, tags: dict[str, str]):
    """The oldest run matching `filter_string`, created when there is none.

    Two processes may create one at the same moment; both then keep the oldest and the other one is
    deleted, so the run tree stays single.
    """
    found = _find_runs(client, experiment_id, filter_string)
    if found:
        return found[0]
    mine = client.create_run(experiment_id, run_name=run_name, tags=tags)
    found = _find_runs(client, experiment_id, filter_string)
    if found and found[0].info.run_id != mine.info.run_id:
        client.delete_run(mine.info.run_id)
        return found[0]
    return mine


class Tracker:
    """The nested MLflow run of one step. Create with `start_step`."""

    enabled = True

    def __init__(self, client, run_id: str, parent_run_id: str, experiment_id: str):
        self.client = client
        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.experiment_id = experiment_id
        self._pending: list = []
        self._last_flush = time.monotonic()

    # -- logging -------------------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any], attempts: int = 5) -> None:
        """Log the params the run does not have yet: a retried step, or two attempts of one step running at
        once (both insert the same params; the store's UNIQUE-constraint error means the other one did)."""
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        cleaned = clean_params(params)
        for attempt in range(attempts):
            existing = self.client.get_run(self.run_id).data.params
            new = [Param(k, v) for k, v in cleaned.items() if k not in existing]
            try:
                for i in range(0, len(new), 100):
                    self.client.log_batch(self.run_id, params=new[i : i + 100])
                return
            except MlflowException as exc:
                if attempt == attempts - 1 or "UNIQUE constraint" not in str(exc):
                    raise
                time.sleep(0.2 * (attempt + 1))

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._pending.append(Metric(_metric_key(key), float(value), now, int(step or 0)))
        if len(self._pending) >= 200 or time.monotonic() - self._last_flush > 5:
            self.flush()

    def flush(self) -> None:
        while self._pending:
            batch, self._pending = self._pending[:500], self._pending[500:]
            self.client.log_batch(self.run_id, metrics=batch)
        self._last_flush = time.monotonic()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image (or a path to a PNG/GIF) as an artifact, shown by the MLflow UI."""
        if isinstance(image, (str, Path)):
            folder = str(Path(artifact_file).parent) if Path(artifact_file).parent != Path(".") else None
            self.client.log_artifact(self.run_id, str(image), folder)
        else:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_dict(self, data: Mapping[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, dict(data), artifact_file)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            if value is not None:
                self.client.set_tag(self.run_id, key, str(value))

    def loss_callback(self, every: int = 1):
        """A trainer callback `callback(step, {"loss": …, "lr": …, "phase": name})`: logs every numeric value
        as a metric at that step (`<phase>/<name>` when a phase is given), every `every` steps."""

        def callback(step: int, values: Mapping[str, Any]) -> None:
            if step % every:
                return
            phase = values.get("phase")
            metrics = {
                f"{phase}/{k}" if phase else k: float(v)
                for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            if metrics:
                self.log_metrics(metrics, step=step)

        return callback

    def end(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """The step's run ends FINISHED, or FAILED when an exception (a crash, a kill, Ctrl-C) passes."""
        self.end("FAILED" if exc_type is not None else "FINISHED")


def _metric_key(key: str) -> str:
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def start_step(
    step: str,
    pipeline_run_id: str,
    experiment: str = DEFAULT_EXPERIMENT,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, Any] | None = None,
    run_name: str | None = None,
    required: bool = False,
) -> Tracker | NullTracker:
    """The nested run for `step` (name `run_name`, default the step) under the pipeline run's parent run.

    A retried step finds its earlier nested run (same tags and name) and continues it.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if required:
            raise ValueError(f"{step}: MLFLOW_TRACKING_URI must be set (this step writes to the model registry)")
        print(f"{step}: MLFLOW_TRACKING_URI is not set; running without tracking", file=sys.stderr)
        return NullTracker()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            experiment_id = client.create_experiment(experiment)
        except Exception:  # created by a parallel step in the meantime
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            experiment_id = exp.experiment_id
    else:
        experiment_id = exp.experiment_id
    key = run_key(pipeline_run_id)
    parent_tags = {"pipeline_run_id": pipeline_run_id, KEY_TAG: key, ROLE_TAG: "pipeline"}
    for env_key, tag in (("AIRFLOW_CTX_DAG_ID", "airflow_dag_id"), ("AIRFLOW_CTX_DAG_RUN_ID", "airflow_run_id")):
        if os.environ.get(env_key):
            parent_tags[tag] = os.environ[env_key]
    parent = _get_or_create_run(
        client,
        experiment_id,
        f"tags.`{KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'pipeline'",
        pipeline_run_id,
        parent_tags,
    )
    name = run_name or step
    child = _get_or_create_run(
        client,
        experiment_id,
        f"tags.`{KEY_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'step' and tags.`mlflow.runName` = {quote(name)}",
        name,
        {
            "pipeline_run_id": pipeline_run_id,
            KEY_TAG: key,
            ROLE_TAG: "step",
            "step": step,
            "mlflow.parentRunId": parent.info.run_id,
            **{k: str(v) for k, v in (tags or {}).items() if v is not None},
        },
    )
    if child.info.status != "RUNNING":
        client.update_run(child.info.run_id, status="RUNNING")
    tracker = Tracker(client, child.info.run_id, parent.info.run_id, experiment_id)
    if params:
        tracker.log_params(params)
    return tracker


def end_pipeline(pipeline_run_id: str, status: str, experiment: str = DEFAULT_EXPERIMENT) -> dict[str, Any]:
    """End the pipeline run's parent run with `status` (FINISHED or FAILED), and every nested run still
    RUNNING (a step killed before it could end its run) as FAILED. Returns what was ended."""
    if status not in ("FINISHED", "FAILED"):
        raise ValueError(f"status={status!r}: expected FINISHED or FAILED")
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return {"tracked": False}
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = _find_runs(client, exp.experiment_id, f"tags.`{KEY_TAG}` = '{run_key(pipeline_run_id)}'") if exp else []
    parent, ended = None, []
    for run in runs:
        if run.data.tags.get(ROLE_TAG) == "pipeline":
            parent = run
        elif run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")
            ended.append(run.data.tags.get("mlflow.runName", run.info.run_id))
    if parent is not None:
        client.set_terminated(parent.info.run_id, status)
    return {"tracked": True, "parent_run": parent.info.run_id if parent else None, "status": status,
            "steps_ended_as_failed": ended}  # fmt: skip


def log_images_dir(tracker: Tracker | NullTracker, folder: str | Path, artifact_path: str = "images") -> int:
    """Every PNG/JPEG/GIF under `folder` as artifacts; returns how many."""
    folder = Path(folder)
    n = 0
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in PICTURE_SUFFIXES and path.is_file():
            rel_parent = path.parent.relative_to(folder).as_posix()
            dest = artifact_path if rel_parent == "." else f"{artifact_path}/{rel_parent}"
            tracker.log_artifact(path, dest)
            n += 1
    return n


def temp_json(data: Mapping[str, Any], name: str) -> Path:
    import json

    folder = Path(tempfile.mkdtemp(prefix="lora-track-"))
    path = folder / name
    path.write_text(json.dumps(dict(data), indent=2, sort_keys=True, default=str))
    return path
