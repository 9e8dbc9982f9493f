"""Steps never write into their inputs, never take a crashed step's output for a dataset, and name what the
user gave (the S3 URI, the file) in their errors — against a real SeaweedFS server."""

from __future__ import annotations

import pytest
from lora_pipeline.steps import distill, evaluate, invert, preprocess, register, tune
from lora_pipeline.steps.artifacts import overlaps, parse_uri
from minio import Minio
from test_steps import raw_images, upload_folder


def _client(env):
    return Minio(env["S3_ENDPOINT_URL"].split("://")[1], access_key=env["AWS_ACCESS_KEY_ID"],
                 secret_key=env["AWS_SECRET_ACCESS_KEY"], secure=False)  # fmt: skip


def _objects(env, bucket):
    """Every object of a bucket with its etag: what a step must leave untouched."""
    return sorted((o.object_name, o.etag) for o in _client(env).list_objects(bucket, recursive=True))


def test_overlap_rule():
    def over(a, b):
        return overlaps(parse_uri(a), parse_uri(b))

    assert over("s3://b/datasets/x/", "s3://b/datasets/x")
    assert over("s3://b/datasets/x/out/", "s3://b/datasets/x/")  # inside
    assert over("s3://b/datasets/", "s3://b/datasets/x/")  # containing
    assert over("s3://b/", "s3://b/datasets/x/")  # the bucket root contains everything
    assert not over("s3://b/datasets/x2/", "s3://b/datasets/x/")  # a sibling that shares a name prefix
    assert not over("s3://c/datasets/x/", "s3://b/datasets/x/")
    assert not over("/tmp/a/x2", "/tmp/a/x")
    assert over("/tmp/a", "/tmp/a/x")


@pytest.mark.parametrize("where", ["same", "inside", "containing"])
def test_preprocess_refuses_an_output_overlapping_its_dataset(tmp_path, stack_env, capsys, where):  # noqa: F811
    dataset = upload_folder(stack_env, raw_images(tmp_path / "raw"), "overlap", f"datasets/{where}")
    before = _objects(stack_env, "overlap")
    out = {"same": dataset, "inside": f"{dataset}crops/", "containing": "s3://overlap/datasets/"}[where]
    code = preprocess.main(["--run-id", "r1", "--dataset", dataset, "--out", out, "--resolution", "32",
                            "--caption-model", "none", "--mask", "none", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"--out={out} overlaps the input --dataset={dataset}" in err[0]
    assert _objects(stack_env, "overlap") == before  # nothing written, nothing overwritten


def test_every_step_checks_every_input_against_its_output(tmp_path, stack_env, capsys):  # noqa: F811
    base = "s3://overlap2/models/tiny/"
    pre = "s3://overlap2/runs/r/preprocess/"
    cases = [
        (invert, ["--dataset", pre, "--base-model", base, "--out", f"{pre}invert/", "--placeholder-tokens", "<s1>"],
         "--dataset"),
        (tune, ["--dataset", pre, "--tokens", "s3://overlap2/runs/r/invert/", "--base-model", base,
                "--out", "s3://overlap2/runs/r/invert/tune/"], "--tokens"),
        (tune, ["--dataset", pre, "--tokens", "s3://overlap2/runs/r/invert/", "--base-model", base,
                "--out", "s3://overlap2/models/"], "--base-model"),
        (distill, ["--lora", "s3://overlap2/runs/r/tune/", "--rank", "1", "--out", "s3://overlap2/runs/r/tune/"],
         "--lora"),
        (evaluate, ["--dataset", pre, "--base-model", base, "--lora", "s3://overlap2/runs/r/tune/",
                    "--lora", "s3://overlap2/runs/r/distill/r1/", "--out", "s3://overlap2/runs/r/distill/"], "--lora"),
        (register, ["--evaluation", "s3://overlap2/runs/r/evaluate/", "--model-name", "m",
                    "--out", "s3://overlap2/runs/r/evaluate/register/"], "--evaluation"),
    ]  # fmt: skip
    for module, argv, flag in cases:
        code = module.main(["--run-id", "r", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and f"overlaps the input {flag}=" in err[0], (module.__name__, err)


def test_a_crashed_step_output_is_never_taken_for_a_dataset(tmp_path, stack_env, tiny_model, capsys):  # noqa: F811
    """A preprocess that died mid-upload left images but no manifest under the run layout: invert refuses it."""
    crashed = upload_folder(stack_env, raw_images(tmp_path / "half", n=2), "crash", "runs/r9/preprocess")
    base = upload_folder(stack_env, tiny_model, "crash", "models/tiny")
    code = invert.main(["--run-id", "r9", "--dataset", crashed, "--base-model", base, "--out",
                        "s3://crash/runs/r9/invert/", "--placeholder-tokens", "<s1>", "--steps", "1",
                        "--resolution", "32", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert f"--dataset={crashed}: no manifest.json there, so it is not a completed step output" in err[0]
    assert not [o for o, _ in _objects(stack_env, "crash") if o.startswith("runs/r9/invert/")]


def test_errors_name_the_s3_uri_and_the_file_not_the_download_folder(tmp_path, stack_env, capsys):  # noqa: F811
    raw = raw_images(tmp_path / "raw")
    (raw / "dog1.txt").write_bytes(b"a caf\xe9 dog")  # Latin-1, not UTF-8
    dataset = upload_folder(stack_env, raw, "names", "datasets/dog")
    # the caption model is a hub id that cannot load here: the caption file must fail first
    code = preprocess.main(["--run-id", "r1", "--dataset", dataset, "--out", "s3://names/runs/r1/preprocess/",
                            "--resolution", "32", "--caption-model", "none", "--mask", "clipseg",
                            "--mask-model", "nobody/no-such-model", "--device", "cpu"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "dog1.txt: caption file is not UTF-8" in err[0]
    assert dataset.rstrip("/") in err[0] and "/tmp/" not in err[0] and "lora-preprocess-" not in err[0], err[0]
