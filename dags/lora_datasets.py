"""What lora_batch (scheduled scan) and lora_retrain (asset-triggered) share: the datasets asset, the form
fields of a subject's runs, and the arguments of the `scan` step that decides which subjects need a run.

The decision itself (dataset hashes against the champions' dataset lineage) is the `scan` step
(`steps/scan.py`), run like every other step through `lora_pipeline_tasks.step_task`: the DAG files import
only Airflow.
"""

from __future__ import annotations

import json
import os
from typing import Any

from airflow.providers.standard.operators.trigger_dagrun import TriggerDagRunOperator
from airflow.sdk import Asset, Param, task
from lora_pipeline_tasks import ExecutorConfig, step_task

BUCKET = os.environ.get("LORA_PIPELINE_BUCKET", "").strip() or "lora-pipeline"
# Any change to a dataset (an upload tool, a producer DAG, the REST API) is an event on this asset;
# the event's extra names the subject: {"subject": "dog", "dataset_uri": "s3://.../datasets/dog/"}.
DATASETS = Asset(name="lora_datasets", uri=f"s3://{BUCKET}/datasets/")
# the form's check of a subject name; the same as the scan step's (tested)
SUBJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$"


def scan_arguments(
    datasets_uri: str, model_prefix: str, finetune_conf: dict[str, Any] | None, subjects: list[str] | None = None
) -> list[str]:
    """The flags of `python -m lora_pipeline.steps.scan` for one scan (`subjects`: only these; None: every subject)."""
    args = [
        "--datasets",
        datasets_uri,
        "--model-prefix",
        model_prefix,
        "--finetune-conf",
        json.dumps(finetune_conf or {}),
    ]
    if subjects:
        args += ["--subjects", ",".join(sorted(subjects))]
    return args


def subject_run_params() -> dict[str, Param]:
    """The form fields lora_batch and lora_retrain share: how a subject's model is named, the conf of its runs."""
    return {
        "model_prefix": Param(
            "lora-",
            type="string",
            pattern=r"^[A-Za-z0-9._-]*$",
            title="Model name prefix",
            description="A subject's registered model is <prefix><subject>",
            section="Subjects",
        ),
        "finetune_conf": Param(
            None,
            type=["null", "object"],
            title="lora_finetune conf for every run",
            description='Overrides of lora_finetune\'s form for every run, e.g. {"tune_steps": 500} (empty: its defaults)',
            section="Fine-tuning",
        ),
    }


def finetune_changed_subjects(scan_flags, parallelism: int):
    """The tasks after the scan flags: the `scan` step, the confs it chose, and one `lora_finetune` run per conf
    (triggered and waited for, at most `parallelism` at a time). Returns the trigger task."""
    scan = step_task("scan", scan_flags, config=ExecutorConfig.from_env())

    @task
    def finetune_confs(result: dict[str, Any]) -> list[dict[str, Any]]:
        """The lora_finetune conf of every subject that needs a run (the scan step's decision)."""
        return result["confs"]

    return TriggerDagRunOperator.partial(
        task_id="finetune",
        trigger_dag_id="lora_finetune",
        wait_for_completion=True,
        poke_interval=10,  # one metadata query per poke: cheap, and a finished run is seen soon
        max_active_tis_per_dagrun=parallelism,
        map_index_template="{{ task.conf.model_name }}",
        retries=0,  # a retry would trigger a second fine-tune of the subject
    ).expand(conf=finetune_confs(scan.output))
