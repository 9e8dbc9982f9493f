"""The pipeline steps end to end on the tiny model: preprocess -> invert -> tune -> distill -> evaluate -> register,
against real SeaweedFS (artifacts) and MLflow (tracking, registry) servers."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from lora_pipeline.steps import distill, evaluate, invert, preprocess, register, tune
from lora_pipeline.steps.artifacts import read_manifest
from minio import Minio
from PIL import Image


@pytest.fixture(scope="module")
def vision_models(tmp_path_factory):
    from lora_ops.tiny_vision import make_tiny_preprocess_models

    return make_tiny_preprocess_models(tmp_path_factory.mktemp("vision"))


def upload_folder(env, folder, bucket, prefix):
    client = Minio(env["S3_ENDPOINT_URL"].split("://")[1], access_key=env["AWS_ACCESS_KEY_ID"],
                   secret_key=env["AWS_SECRET_ACCESS_KEY"], secure=False)  # fmt: skip
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            client.fput_object(bucket, f"{prefix}/{path.relative_to(folder).as_posix()}", str(path))
    return f"s3://{bucket}/{prefix}/"


def raw_images(folder, n=3, seed=0):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray((rng.random((72, 96, 3)) * 255).astype("uint8")).save(folder / f"dog{i}.png")
    return folder


PRINTED: list[str] = []  # everything the steps printed, for the secret-value check


def call(module, argv, capsys):
    code = module.main(argv)
    captured = capsys.readouterr()
    PRINTED.extend([captured.out, captured.err])
    assert code == 0, captured.err[-3000:]
    return json.loads(captured.out.strip().splitlines()[-1])


def test_chain_preprocess_to_register(tmp_path, stack_env, tiny_model, vision_models, capsys, monkeypatch):  # noqa: F811
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(tmp_path / "cache"))
    xcom = tmp_path / "xcom"
    xcom.mkdir()
    monkeypatch.setenv("LORA_PIPELINE_XCOM_DIR", str(xcom))
    run_id = "chain-1"
    runs = f"s3://artifacts/runs/{run_id}"
    dataset = upload_folder(stack_env, raw_images(tmp_path / "raw"), "artifacts", "datasets/dog")
    base = upload_folder(stack_env, tiny_model, "models", "tiny")
    common = ["--run-id", run_id, "--device", "cpu"]

    pre = call(preprocess, [*common, "--dataset", dataset, "--out", f"{runs}/preprocess/", "--resolution", "32",
                            "--caption-model", str(vision_models["captioner"]), "--mask-model",
                            str(vision_models["segmenter"]), "--token-substitution", "a dog|<s1>"], capsys)  # fmt: skip
    assert pre["num_images"] == 3 and pre["reused"] is False
    assert json.loads((xcom / "return.json").read_text()) == pre  # XCom = the last stdout line

    inv = call(invert, [*common, "--dataset", pre["dataset"], "--base-model", base, "--out", f"{runs}/invert/",
                        "--placeholder-tokens", "<s1>", "--initializer-tokens", "dog", "--steps", "2",
                        "--resolution", "32"], capsys)  # fmt: skip
    tun = call(tune, [*common, "--dataset", pre["dataset"], "--tokens", inv["out"], "--base-model", base,
                      "--out", f"{runs}/tune/", "--rank", "4", "--steps", "3", "--save-steps", "2",
                      "--resolution", "32"], capsys)  # fmt: skip
    assert tun["rank"] == 4 and tun["resumed_from"] is None
    dis = call(distill, [*common, "--lora", tun["out"], "--rank", "2", "--out", f"{runs}/distill-r2/"], capsys)
    assert 0 < dis["energy"] <= 1
    again = call(distill, [*common, "--lora", tun["out"], "--rank", "2", "--out", f"{runs}/distill-r2/"], capsys)
    assert again["reused"] is True and again["manifest_sha256"] == dis["manifest_sha256"]

    ev = call(evaluate, [*common, "--dataset", pre["dataset"], "--base-model", base, "--lora", tun["out"],
                         "--lora", dis["out"], "--out", f"{runs}/evaluate/", "--prompts", "a photo of {token}",
                         "--seed", "0", "--clip-model", str(vision_models["clip"]), "--num-inference-steps", "2",
                         "--resolution", "32", "--sweep-steps", "2", "--class-word", "dog"], capsys)  # fmt: skip
    assert ev["best"]["lora"] in (tun["out"], dis["out"]) and {"clip_i", "clip_t"} <= set(ev["best"]["metrics"])

    reg = call(register, ["--run-id", run_id, "--evaluation", ev["out"], "--model-name", "chain-dog"], capsys)
    assert reg["alias"] == "champion" and reg["version"] == 1

    # lineage: every manifest records its inputs by hash, down to the raw dataset and the base model
    tune_manifest, _ = read_manifest(tun["out"])
    assert tune_manifest["inputs"]["dataset"]["sha256"] == pre["manifest_sha256"]
    assert tune_manifest["inputs"]["tokens"]["sha256"] == inv["manifest_sha256"]
    assert tune_manifest["inputs"]["base_model"]["uri"] == base
    assert tune_manifest["parameters"]["rank"] == 4
    client = MlflowClient()
    mv = client.get_model_version("chain-dog", "1")
    assert mv.tags["dataset_sha256"] == pre["manifest_sha256"] and mv.tags["tokens"] == "<s1>"

    # MLflow: one parent run, one nested run per step, loss curves, images
    exp = client.get_experiment_by_name("lora-pipeline")
    found = client.search_runs([exp.experiment_id], f"tags.pipeline_run_id = '{run_id}'")
    parents = [r for r in found if r.data.tags.get("lora_pipeline.role") == "pipeline"]
    children = {r.data.tags["mlflow.runName"]: r for r in found if r.data.tags.get("lora_pipeline.role") == "step"}
    assert len(parents) == 1
    assert set(children) == {"preprocess", "invert", "tune", "distill-r2", "evaluate", "register"}
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children.values())
    assert all(r.info.status == "FINISHED" for r in children.values())
    history = client.get_metric_history(children["tune"].info.run_id, "tuning/loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert children["tune"].data.params["rank"] == "4"
    assert not any("secret" in k.lower() for r in children.values() for k in r.data.params)
    logged = [a.path for a in client.list_artifacts(children["evaluate"].info.run_id, "images")]
    assert "images/comparison.png" in logged
    gifs = [a.path for d in logged for a in client.list_artifacts(children["evaluate"].info.run_id, d)
            if a.path.endswith(".gif")]  # fmt: skip
    assert gifs, f"no alpha-sweep GIF among {logged}"

    # secret values (not only their names) appear nowhere: MLflow params and tags, manifests, output, XCom
    secrets = [stack_env["AWS_SECRET_ACCESS_KEY"], stack_env["AWS_ACCESS_KEY_ID"]]
    texts = [json.dumps({"params": r.data.params, "tags": r.data.tags}) for r in found]
    texts += [json.dumps(dict(mv.tags))]
    for prefix in (pre["out"], inv["out"], tun["out"], dis["out"], ev["out"]):
        texts.append(json.dumps(read_manifest(prefix)[0]))
    texts += [*PRINTED, (xcom / "return.json").read_text()]
    leaked = [s for s in secrets for t in texts if s in t]
    assert not leaked, "a credential value was recorded"


def test_step_command_line_and_clear_errors(tmp_path, stack_env, capsys):  # noqa: F811
    """The real console entry point: usage errors and bad input exit non-zero with one line, no traceback."""
    assert distill.main(["--run-id", "x", "--lora", "s3://artifacts/none/", "--rank", "0", "--out", "o"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["distill: error: --rank=0: must be a positive integer"]
    proc = subprocess.run([sys.executable, "-m", "lora_pipeline.steps.distill", "--run-id", "x", "--lora", "s3://artifacts/none/",
                           "--rank", "2", "--out", str(tmp_path / "o")], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--lora=s3://artifacts/none/: no manifest.json there" in lines[-1]
    assert not (tmp_path / "o").exists()


def test_a_one_file_checkpoint_base_through_the_steps_and_serving(
    tmp_path, stack_env, tiny_model, vision_models, capsys, monkeypatch
):  # noqa: F811
    """A community checkpoint (one .safetensors object in S3) with its architecture's configs (an s3:// prefix):
    invert, tune, evaluate and register run on it, and the served model loads it and answers like the folder."""
    import mlflow.pyfunc
    import torch
    from lora_pipeline.steps.models import resolve_base_model

    from lora_ops import load_pipeline
    from lora_ops.single_file import save_single_file

    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(tmp_path / "cache"))
    run_id = "chain-one-file"
    runs = f"s3://artifacts/runs/{run_id}"
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    save_single_file(load_pipeline(tiny_model), ckpt_dir / "community.safetensors")
    ckpt = upload_folder(stack_env, ckpt_dir, "models", "community") + "community.safetensors"
    config = upload_folder(stack_env, tiny_model, "models", "tiny-config")
    dataset = upload_folder(stack_env, raw_images(tmp_path / "raw", n=2), "artifacts", "datasets/one-file")
    common = ["--run-id", run_id, "--device", "cpu"]
    base = ["--base-model", ckpt, "--base-model-config", config]

    # resolved once into the cache, keyed by the object's ETag; the lineage names the checkpoint and its config
    first = resolve_base_model(ckpt, config=config)
    assert first.path.endswith("community.safetensors") and first.config_path is not None
    assert resolve_base_model(ckpt, config=config).path == first.path
    assert first.lineage()["config"] == config
    with pytest.raises(ValueError, match="--base-model-config is for one-file checkpoints"):
        resolve_base_model(config, config=config)

    pre = call(preprocess, [*common, "--dataset", dataset, "--out", f"{runs}/preprocess/", "--resolution", "32",
                            "--caption-model", "none", "--mask", "none"], capsys)  # fmt: skip
    inv = call(invert, [*common, "--dataset", pre["dataset"], *base, "--out", f"{runs}/invert/",
                        "--placeholder-tokens", "<s1>", "--initializer-tokens", "dog", "--steps", "2",
                        "--resolution", "32", "--template", "object"], capsys)  # fmt: skip
    tun = call(tune, [*common, "--dataset", pre["dataset"], "--tokens", inv["out"], *base, "--out", f"{runs}/tune/",
                      "--rank", "2", "--steps", "2", "--resolution", "32", "--lr-unet", "1e-2"], capsys)  # fmt: skip
    ev = call(evaluate, [*common, "--dataset", pre["dataset"], *base, "--lora", tun["out"], "--out",
                         f"{runs}/evaluate/", "--prompts", "a photo of {token}", "--seed", "0",
                         "--num-inference-steps", "2", "--resolution", "32", "--sweep-steps", "0",
                         "--clip-model", str(vision_models["clip"])], capsys)  # fmt: skip
    reg = call(register, ["--run-id", run_id, "--evaluation", ev["out"], "--model-name", "one-file-dog"], capsys)
    assert reg["alias"] == "champion"
    model = mlflow.pyfunc.load_model("models:/one-file-dog@champion")
    meta = model.unwrap_python_model().metadata
    assert meta["base_model"] == ckpt and meta["base_model_config"] == config
    images = model.predict(["a photo of <s1>"], params={"num_inference_steps": 2, "height": 32, "width": 32})
    assert len(images) == 1
    # the served pipeline is the checkpoint's: the same UNet weights as the folder it was written from
    served = model.unwrap_python_model().pipe
    folder = load_pipeline(tiny_model)
    key = "conv_in.weight"
    assert torch.equal(served.unet.state_dict()[key].float(), folder.unet.state_dict()[key].float())
