"""scan: which subjects need a fine-tune (the first task of the lora_batch and lora_retrain DAGs).

    python -m lora_pipeline.steps.scan --datasets s3://bucket/datasets/ [--model-prefix lora-] [--subjects dog,owl]
                         [--finetune-conf '{"tune_steps": 500}']

A subject is a folder `<datasets>/<subject>/`; its registered model is `<model-prefix><subject>`. A subject
needs a run when it has no champion yet, or when the hash of its dataset differs from the raw dataset hash
its champion was trained on: the version tag `source_dataset_sha256`, which `register` copies from the run's
manifests (each carries the hash of the dataset the run started from). The dataset hash follows the step
contract (docs/steps.md): the sha256 of the prefix's `manifest.json` when it has one, else the hash of its
`path size sha256` listing. A champion registered without that tag counts as unknown lineage: its subject
runs again once.

Reads only: writes nothing and opens no MLflow run. Result: `subjects` ({subject: uri, sha256, champion
hash, state}) and `confs`, one `lora_finetune` conf per subject that needs a run (the `--finetune-conf`
overrides plus the subject's `dataset_uri` and `model_name`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from typing import Any

from . import common
from .artifacts import SOURCE_DATASET, Store, fetch, parse_uri, read_manifest

STEP = "scan"
SUBJECT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,80}$"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m lora_pipeline.steps.{STEP}", description=__doc__.splitlines()[0])
    p.add_argument("--datasets", required=True, help="prefix holding one folder per subject: s3://bucket/datasets/")
    p.add_argument("--model-prefix", default="lora-", help="a subject's registered model is <prefix><subject>")
    p.add_argument("--subjects", default="", help="comma-separated subjects to check (default: every subject)")
    p.add_argument("--finetune-conf", default="{}", help="JSON object: lora_finetune overrides for every run")
    return p


def select_subjects(datasets: dict[str, str], champions: dict[str, str | None]) -> list[str]:
    """Subjects whose dataset hash (`datasets[subject]`) differs from their champion's (None: no champion)."""
    return sorted(s for s, digest in datasets.items() if champions.get(s) != digest)


def finetune_confs(
    subjects: list[str], uris: dict[str, str], model_prefix: str, overrides: dict[str, Any]
) -> list[dict[str, Any]]:
    """One `lora_finetune` conf per subject: the overrides plus the subject's dataset and model name."""
    for key in ("dataset_uri", "model_name"):
        if key in overrides:
            raise ValueError(f"--finetune-conf: {key!r} is set per subject; remove it from the overrides")
    return [{**overrides, "dataset_uri": uris[s], "model_name": f"{model_prefix}{s}"} for s in subjects]


def list_subjects(datasets_uri: str) -> dict[str, str]:
    """{subject: dataset prefix URI} of the folders directly under `datasets_uri` that hold files."""
    loc = parse_uri(datasets_uri, "--datasets").as_prefix()
    subjects = {}
    for rel, _size in Store.for_uri(loc).list(loc):
        subject, sep, _ = rel.partition("/")
        if sep and re.match(SUBJECT_PATTERN, subject):
            subjects[subject] = str(loc.join(subject).as_prefix())
    return subjects


def dataset_hash(uri: str) -> str:
    """The dataset's content hash as the steps record it (manifest sha256, else listing hash)."""
    found = read_manifest(uri)
    if found is not None:
        return found[1]
    with tempfile.TemporaryDirectory(prefix="lora-scan-") as tmp:
        return fetch(uri, tmp, name="dataset").sha256


def champion_dataset_hash(client, model_name: str) -> str | None:
    """The raw dataset hash behind `model_name@champion`; None when there is no champion or it has no lineage."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version_by_alias(model_name, "champion")
    except MlflowException:
        return None
    return (mv.tags or {}).get(SOURCE_DATASET) or None


def _overrides(raw: str) -> dict[str, Any]:
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--finetune-conf: not JSON ({exc.msg} at character {exc.pos})") from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"--finetune-conf: expected a JSON object, got {type(value).__name__}")
    return value


def run(argv: list[str] | None = None) -> dict[str, Any]:
    import mlflow

    args = build_parser().parse_args(argv)
    overrides = _overrides(args.finetune_conf)
    only = {s.strip() for s in args.subjects.split(",") if s.strip()}
    for s in sorted(only):
        if not re.match(SUBJECT_PATTERN, s):
            raise ValueError(f"--subjects: {s!r} is not a subject name (letters, digits, '.', '_', '-')")
    uris = list_subjects(args.datasets)
    if only:
        uris = {s: u for s, u in uris.items() if s in only}
    client = mlflow.MlflowClient()
    hashes = {s: dataset_hash(u) for s, u in uris.items()}
    champions = {s: champion_dataset_hash(client, f"{args.model_prefix}{s}") for s in uris}
    subjects = {}
    for s in sorted(uris):
        state = "no champion" if champions[s] is None else ("unchanged" if champions[s] == hashes[s] else "changed")
        print(f"{s}: dataset {hashes[s][:12]} ({state})", file=sys.stderr)
        subjects[s] = {"uri": uris[s], "sha256": hashes[s], "champion_sha256": champions[s], "state": state}
    chosen = select_subjects(hashes, champions)
    return {"step": STEP, "subjects": subjects, "confs": finetune_confs(chosen, uris, args.model_prefix, overrides)}


def main(argv: list[str] | None = None) -> int:
    return common.main(STEP, run, argv)


if __name__ == "__main__":
    sys.exit(main())
