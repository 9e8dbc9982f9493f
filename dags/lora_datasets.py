"""Which subjects need a fine-tune: shared by `lora_batch` (scheduled scan) and `lora_retrain` (asset-triggered).

A subject is a folder `s3://<bucket>/datasets/<subject>/`; its registered model is `<model_prefix><subject>`.
A subject needs a run when it has no champion yet, or when the hash of its dataset differs from the
dataset hash of the champion's lineage. The dataset hash follows the step contract (docs/steps.md): the
sha256 of the prefix's `manifest.json` when it has one, else the hash of its `path size sha256` listing.

The champion's dataset hash is the raw dataset hash recorded by its run's `preprocess` manifest
(`<run>/preprocess/manifest.json`, inputs.dataset.sha256), found from the version's `lora_uri` tag,
or the version tag `source_dataset_sha256` when present.

Only `select_subjects` and `finetune_confs` are pure; the other functions talk to S3 and MLflow and import
their clients (steps.artifacts, mlflow) when called, never when a DAG file is parsed.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Any

from airflow.sdk import Asset, Param

BUCKET = os.environ.get("LORA_PIPELINE_BUCKET", "").strip() or "lora-pipeline"
# Any change to a dataset (an upload tool, a producer DAG, the REST API) is an event on this asset;
# the event's extra names the subject: {"subject": "dog", "dataset_uri": "s3://.../datasets/dog/"}.
DATASETS = Asset(name="lora_datasets", uri=f"s3://{BUCKET}/datasets/")
SUBJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$"


def select_subjects(datasets: dict[str, str], champions: dict[str, str | None]) -> list[str]:
    """Subjects whose dataset hash (`datasets[subject]`) differs from their champion's (None: no champion)."""
    return sorted(s for s, digest in datasets.items() if champions.get(s) != digest)


def finetune_confs(
    subjects: list[str], uris: dict[str, str], model_prefix: str, overrides: dict[str, Any]
) -> list[dict[str, Any]]:
    """One `lora_finetune` conf per subject: the batch's overrides plus the subject's dataset and model name."""
    for key in ("dataset_uri", "model_name"):
        if key in overrides:
            raise ValueError(f"finetune_conf: {key!r} is set per subject; remove it from the overrides")
    return [{**overrides, "dataset_uri": uris[s], "model_name": f"{model_prefix}{s}"} for s in subjects]


def list_subjects(datasets_uri: str) -> dict[str, str]:
    """{subject: dataset prefix URI} of the folders directly under `datasets_uri` that hold files."""
    from steps.artifacts import Store, parse_uri

    loc = parse_uri(datasets_uri, "datasets_uri").as_prefix()
    subjects = {}
    for rel, _size in Store.for_uri(loc).list(loc):
        subject, sep, _ = rel.partition("/")
        if sep and re.match(SUBJECT_PATTERN, subject):
            subjects[subject] = str(loc.join(subject).as_prefix())
    return subjects


def dataset_hash(uri: str) -> str:
    """The dataset's content hash as the steps record it (manifest sha256, else listing hash)."""
    from steps.artifacts import fetch, read_manifest

    found = read_manifest(uri)
    if found is not None:
        return found[1]
    with tempfile.TemporaryDirectory() as tmp:
        return fetch(uri, tmp, name="dataset").sha256


def champion_dataset_hash(client, model_name: str) -> str | None:
    """The raw dataset hash behind `model_name@champion`, or None when there is no champion."""
    from mlflow.exceptions import MlflowException

    from steps.artifacts import read_manifest

    try:
        mv = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    tags = mv.tags or {}
    if tags.get("source_dataset_sha256"):
        return tags["source_dataset_sha256"]
    lora_uri = tags.get("lora_uri", "")
    root, sep, _ = lora_uri.partition("/distill/")
    if not sep:
        root, sep, _ = lora_uri.partition("/tune/")
    if not sep:
        return tags.get("dataset_sha256")
    found = read_manifest(f"{root}/preprocess/")
    if found is None:
        return None
    return found[0].get("inputs", {}).get("dataset", {}).get("sha256")


def subjects_to_train(datasets_uri: str, model_prefix: str, only: set[str] | None = None) -> tuple[list[str], dict]:
    """(subjects that need a run, {subject: dataset URI}); `only` restricts the scan to named subjects."""
    import mlflow

    uris = list_subjects(datasets_uri)
    if only is not None:
        uris = {s: u for s, u in uris.items() if s in only}
    client = mlflow.MlflowClient()
    hashes = {s: dataset_hash(u) for s, u in uris.items()}
    champions = {s: champion_dataset_hash(client, f"{model_prefix}{s}") for s in uris}
    for s in sorted(uris):
        state = "no champion" if champions[s] is None else ("unchanged" if champions[s] == hashes[s] else "changed")
        print(f"{s}: dataset {hashes[s][:12]} ({state})")
    return select_subjects(hashes, champions), uris


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
