"""register and the registry lookup against real SeaweedFS + MLflow servers."""

from __future__ import annotations

import json

import pytest
import torch
from stack_fixtures import mlflow_server, s3_server, stack_env  # noqa: F401 - fixtures

from steps import register
from steps.artifacts import publish, sha256_file


def make_lora(base_model, path, seed: int = 0):
    """A real LoRA for the tiny model: peft-injected attention LoRA with non-zero lora_B and one token."""
    from lora_ops import LoraConfig, LoraFile, extract_lora, inject_lora, load_pipeline, save_lora

    torch.manual_seed(seed)
    pipe = load_pipeline(base_model)
    params = inject_lora(pipe.unet, LoraConfig(targets="unet", r=2))
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5)
    unet = extract_lora(pipe.unet, "unet")
    lora = LoraFile(unet=unet, tokens={"<s1>": torch.randn(32)}, metadata={"base_model": str(base_model)})
    return save_lora(path, lora)


def publish_candidate(tmp_path, run_id, base_model, seed=0):
    folder = tmp_path / f"cand-{run_id}"
    folder.mkdir()
    make_lora(base_model, folder / "lora.safetensors", seed)
    out = f"s3://artifacts/runs/{run_id}/distill-r2/"
    publish(folder, out, step="distill", run_id=run_id, inputs={}, parameters={"rank": 2},
            result={"lora": out + "lora.safetensors"})  # fmt: skip
    return out


def publish_evaluation(tmp_path, run_id, lora_prefix, metrics, base_model):
    folder = tmp_path / f"eval-{run_id}"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"candidates": [{"lora": lora_prefix, **metrics}]}))
    out = f"s3://artifacts/runs/{run_id}/evaluate/"
    inputs = {
        "dataset": {"uri": "s3://artifacts/datasets/dog/", "sha256": "d" * 64},
        "base_model": {"uri": str(base_model), "sha256": "b" * 64},
        "lora0": {"uri": lora_prefix, "sha256": "c" * 64},
    }
    best = {"lora": lora_prefix, "metrics": metrics, "scale": 1.0}
    publish(folder, out, step="evaluate", run_id=run_id, inputs=inputs, parameters={},
            result={"step": "evaluate", "best": best, "metrics": out + "metrics.json"})  # fmt: skip
    return out


def run_register(run_id, evaluation, name, capsys, *extra):
    code = register.main(["--run-id", run_id, "--evaluation", evaluation, "--model-name", name, *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def test_decide_rules():
    assert register.decide({"clip_i": 0.5, "clip_t": 0.3}, None, "clip_i", 0.01)[0] == "champion"
    champ = {"clip_i": 0.6, "clip_t": 0.3}
    assert register.decide({"clip_i": 0.6, "clip_t": 0.3}, champ, "clip_i", 0.01)[0] == "challenger"  # tie
    assert register.decide({"clip_i": 0.7, "clip_t": 0.295}, champ, "clip_i", 0.01)[0] == "champion"
    assert register.decide({"clip_i": 0.7, "clip_t": 0.2}, champ, "clip_i", 0.01)[0] == "challenger"
    with pytest.raises(ValueError, match="--promotion-metric='dino'"):
        register.decide({"clip_i": 0.7}, champ, "dino", 0.01)


def test_champion_moves_only_when_better_and_retry_makes_no_duplicate(tmp_path, stack_env, tiny_model, capsys):  # noqa: F811
    from mlflow.tracking import MlflowClient

    name = "dog-lora"
    client = MlflowClient()
    results = {}
    for run_id, metrics in [
        ("r1", {"clip_i": 0.60, "clip_t": 0.30}),
        ("r2", {"clip_i": 0.70, "clip_t": 0.20}),  # better CLIP-I, CLIP-T too low (worse CLIP-I: test_decide_rules)
        ("r3", {"clip_i": 0.65, "clip_t": 0.295}),  # better, CLIP-T within tolerance
    ]:
        cand = publish_candidate(tmp_path, run_id, tiny_model, seed=len(results))
        evaluation = publish_evaluation(tmp_path, run_id, cand, metrics, tiny_model)
        results[run_id] = run_register(run_id, evaluation, name, capsys)
        assert client.get_model_version_by_alias(name, "champion").version == str({"r1": 1, "r2": 1, "r3": 3}[run_id])
    assert [results[r]["alias"] for r in ("r1", "r2", "r3")] == ["champion", "challenger", "champion"]
    assert "clip_t" in results["r2"]["reason"]

    # register retried for r2: the same version, nothing new
    again = run_register("r2", "s3://artifacts/runs/r2/evaluate/", name, capsys)
    assert again["version"] == results["r2"]["version"] and again["reused"] is True
    assert len(client.search_model_versions(f"name = '{name}'")) == 3

    mv = client.get_model_version(name, "3")
    assert mv.tags["pipeline_run_id"] == "r3" and mv.tags["tokens"] == "<s1>" and mv.tags["rank"] == "2"
    assert mv.tags["dataset_sha256"] == "d" * 64 and mv.tags["base_model"] == str(tiny_model)
    assert float(mv.tags["metric.clip_i"]) == pytest.approx(0.65)

    # serving lookup: the console script and the pyfunc model
    out = tmp_path / "served"
    from steps.registry import main as registry_main  # the `lora-registry` console script

    assert registry_main(["get", f"{name}@champion", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out.strip().splitlines()[-1])
    assert got["version"] == 3 and "champion" in got["aliases"]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["lora_sha256"] == sha256_file(out / "lora.safetensors")
    assert meta["base_model"] == str(tiny_model) and meta["pipeline_run_id"] == "r3"

    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    params = {"num_inference_steps": 2, "height": 32, "width": 32, "seed": 1}
    images = model.predict(["a photo of <s1> dog", "<s1> on a beach"], params=params)
    assert len(images) == 2 and images[0].size == (32, 32)
    # the LoRA is really applied: scale 0 gives a different image than scale 1
    plain = model.predict(["a photo of <s1> dog"], params={**params, "scale": 0.0})[0]
    diff = (torch.tensor(list(images[0].getdata())) - torch.tensor(list(plain.getdata()))).abs().float().mean()
    assert diff > 0.5, f"LoRA had no visible effect (mean abs pixel diff {diff:.3f})"


def test_register_errors_are_one_clear_line(tmp_path, stack_env, capsys):  # noqa: F811
    code = register.main(["--run-id", "bad", "--evaluation", str(tmp_path / "nothing"), "--model-name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--evaluation=" in err[0] and "no manifest.json" in err[0]
