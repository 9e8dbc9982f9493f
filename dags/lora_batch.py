"""
### lora_batch: scheduled fine-tuning of every subject whose data is new or changed

Every night it scans `datasets_uri` (`s3://bucket/datasets/<subject>/`), compares each subject's dataset
hash with the dataset lineage of its registered champion (`<model_prefix><subject>@champion` in MLflow)
and triggers one `lora_finetune` run per subject that is new or changed, at most
`LORA_PIPELINE_BATCH_PARALLELISM` (default 2) at a time. `finetune_conf` is passed to every run
(e.g. `{"base_model": "...", "tune_steps": 500}`).
"""

from __future__ import annotations

import os
import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Param, task

sys.path.insert(0, str(Path(__file__).parent))  # the DAG folder's own modules, wherever it is mounted
from lora_datasets import BUCKET, finetune_changed_subjects, scan_arguments, subject_run_params  # noqa: E402

PARALLELISM = int(os.environ.get("LORA_PIPELINE_BATCH_PARALLELISM", "").strip() or "2")

with DAG(
    dag_id="lora_batch",
    description="Fine-tune every subject whose dataset is new or changed since its champion",
    doc_md=__doc__,
    schedule="@daily",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["lora", "batch"],
    params={
        "datasets_uri": Param(
            f"s3://{BUCKET}/datasets/",
            type="string",
            pattern=r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.*/$",
            title="Datasets prefix",
            description="One folder of images per subject: s3://bucket/datasets/<subject>/",
            section="Subjects",
        ),
        **subject_run_params(),
    },
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
) as dag:

    @task
    def scan_flags(params=None) -> list[str]:
        """The scan step's flags from the form."""
        return scan_arguments(params["datasets_uri"], params["model_prefix"], params["finetune_conf"])

    finetune_changed_subjects(scan_flags(), PARALLELISM)
