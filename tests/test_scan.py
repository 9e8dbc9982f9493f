"""The scan step (the first task of lora_batch and lora_retrain) against real SeaweedFS + MLflow servers."""

from __future__ import annotations

import json

import pytest
from lora_pipeline.steps import scan
from lora_pipeline.steps.artifacts import Store, parse_uri


def upload(tmp_path, uri: str, files: dict[str, bytes]) -> None:
    loc = parse_uri(uri).as_prefix()
    store = Store.for_uri(loc)
    store.ensure_bucket(loc)
    for name, data in files.items():
        path = tmp_path / "upload" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        store.put_file(path, loc.join(name))


def champion(client, name: str, source_sha256: str | None):
    client.create_registered_model(name)
    tags = {"source_dataset_sha256": source_sha256} if source_sha256 else {}
    mv = client.create_model_version(name, source=f"s3://scan/seed/{name}/", tags=tags)
    client.set_registered_model_alias(name, "champion", mv.version)


def run_scan(capsys, *args) -> dict:
    code = scan.main(["--datasets", "s3://scan/datasets/", *args])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def test_scan_selects_new_changed_and_unknown_lineage_subjects(tmp_path, stack_env, capsys):
    from mlflow import MlflowClient

    for subject in ("cat", "dog", "owl", "fox"):
        upload(tmp_path / subject, f"s3://scan/datasets/{subject}/", {"a.png": subject.encode(), "a.txt": b"a photo"})
    upload(tmp_path / "bad", "s3://scan/datasets/", {"-not-a-subject/x.png": b"x"})
    hashes = {s: scan.dataset_hash(f"s3://scan/datasets/{s}/") for s in ("cat", "dog", "owl", "fox")}
    client = MlflowClient()
    champion(client, "lora-cat", hashes["cat"])  # trained on this very dataset
    champion(client, "lora-dog", "0" * 64)  # trained on an older dataset
    champion(client, "lora-fox", None)  # registered without lineage
    # owl: no champion

    result = run_scan(capsys, "--model-prefix", "lora-", "--finetune-conf", '{"tune_steps": 5}')
    assert sorted(result["subjects"]) == ["cat", "dog", "fox", "owl"]
    states = {s: v["state"] for s, v in result["subjects"].items()}
    assert states == {"cat": "unchanged", "dog": "changed", "fox": "no champion", "owl": "no champion"}
    assert result["subjects"]["cat"]["sha256"] == hashes["cat"]
    assert result["confs"] == [
        {"tune_steps": 5, "dataset_uri": "s3://scan/datasets/dog/", "model_name": "lora-dog"},
        {"tune_steps": 5, "dataset_uri": "s3://scan/datasets/fox/", "model_name": "lora-fox"},
        {"tune_steps": 5, "dataset_uri": "s3://scan/datasets/owl/", "model_name": "lora-owl"},
    ]

    # retraining on events: only the named subjects are looked at
    only = run_scan(capsys, "--subjects", "cat,dog")
    assert sorted(only["subjects"]) == ["cat", "dog"] and [c["model_name"] for c in only["confs"]] == ["lora-dog"]

    # a new upload changes the hash: the unchanged subject needs a run again
    upload(tmp_path / "cat2", "s3://scan/datasets/cat/", {"b.png": b"another cat"})
    assert [c["model_name"] for c in run_scan(capsys, "--subjects", "cat")["confs"]] == ["lora-cat"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--finetune-conf", "[1]"], "expected a JSON object"),
        (["--finetune-conf", "{nope"], "not JSON"),
        (["--finetune-conf", '{"model_name": "x"}'], "set per subject"),
        (["--subjects", "../etc"], "not a subject name"),
    ],
)
def test_scan_errors_name_the_flag(stack_env, capsys, args, message):
    code = scan.main(["--datasets", "s3://scan-empty/datasets/", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_select_subjects_and_confs():
    hashes = {"cat": "h1", "dog": "h2", "owl": "h3"}
    assert scan.select_subjects(hashes, {"cat": "h1", "dog": "old", "owl": None}) == ["dog", "owl"]
    uris = {s: f"s3://b/datasets/{s}/" for s in hashes}
    assert scan.finetune_confs(["dog"], uris, "lora-", {"tune_steps": 500}) == [
        {"tune_steps": 500, "dataset_uri": "s3://b/datasets/dog/", "model_name": "lora-dog"}
    ]
