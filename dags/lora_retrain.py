"""
### lora_retrain: retrain a subject when its dataset changes

The dataset collection is the Airflow Asset `lora_datasets` (`s3://<bucket>/datasets/`). Whoever changes a
dataset records an event on it: the `lora_dataset_updated` DAG below (trigger it with
`{"subject": "dog"}` after an upload), or `POST /api/v2/assets/events` with `extra: {"subject": "dog"}`.
`lora_retrain` runs on every such event, checks the named subjects (all of them when an event names
none) against their champions' dataset lineage and triggers `lora_finetune` for those that changed.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path

from airflow.sdk import DAG, Param, task

sys.path.insert(0, str(Path(__file__).parent))  # the DAG folder's own modules, wherever it is mounted
from lora_datasets import DATASETS, SUBJECT_PATTERN, finetune_changed_subjects, scan_arguments, subject_run_params  # noqa: E402

DEFAULT_ARGS = {"retries": 2, "retry_delay": timedelta(minutes=1)}

with DAG(
    dag_id="lora_dataset_updated",
    description="Record that a subject's dataset changed (the producer of the lora_datasets asset)",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    tags=["lora", "data"],
    params={
        "subject": Param(
            "example",
            type="string",
            pattern=SUBJECT_PATTERN,
            title="Subject",
            description="The subject whose dataset changed: the folder s3://<bucket>/datasets/<subject>/",
            section="Dataset",
        )
    },
    default_args=DEFAULT_ARGS,
):

    @task(outlets=[DATASETS])
    def announce(params=None, outlet_events=None) -> dict[str, str]:
        """One asset event naming the subject whose dataset changed."""
        extra = {"subject": params["subject"], "dataset_uri": f"{DATASETS.uri}{params['subject']}/"}
        outlet_events[DATASETS].extra = extra
        return extra

    announce()


with DAG(
    dag_id="lora_retrain",
    description="Fine-tune the subjects named by new lora_datasets events whose data changed",
    doc_md=__doc__,
    schedule=[DATASETS],
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    tags=["lora", "data"],
    params=subject_run_params(),
    default_args=DEFAULT_ARGS,
):

    @task
    def scan_flags(params=None, triggering_asset_events=None) -> list[str]:
        """The scan step's flags: the subjects named by the events (every subject when one names none)."""
        events = [e for evs in (triggering_asset_events or {}).values() for e in evs]
        named = {e.extra["subject"] for e in events if (e.extra or {}).get("subject")}
        only = sorted(named) if named and all((e.extra or {}).get("subject") for e in events) else None
        print(f"{len(events)} dataset event(s); checking {only or 'every subject'}")
        return scan_arguments(DATASETS.uri, params["model_prefix"], params["finetune_conf"], only)

    finetune_changed_subjects(scan_flags(), 2)
