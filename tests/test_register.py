"""register and the registry lookup against real SeaweedFS + MLflow servers."""

from __future__ import annotations

import json

import pytest
import torch
from lora_pipeline.steps import register
from lora_pipeline.steps.artifacts import publish, sha256_file


def make_lora(base_model, path, seed: int = 0):
    """A real LoRA for the tiny model: peft-injected attention LoRA with non-zero lora_B and one token."""
    from lora_ops import LoraConfig, LoraFile, extract_lora, inject_lora, load_pipeline, save_lora

    torch.manual_seed(seed)
    pipe = load_pipeline(base_model)
    params = inject_lora(pipe.unet, LoraConfig(target_modules="unet", r=2))
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
    # the lineage the batch scan reads: the raw dataset hash the run started from, and where the run lies
    assert mv.tags["source_dataset_sha256"] == "d" * 64 and mv.tags["run_prefix"] == "s3://artifacts/runs/r3/"
    assert float(mv.tags["metric.clip_i"]) == pytest.approx(0.65)

    # serving lookup: the console script and the pyfunc model
    out = tmp_path / "served"
    from lora_pipeline.serving import main as registry_main  # the `lora-registry` console script

    assert registry_main(["get", f"{name}@champion", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out.strip().splitlines()[-1])
    assert got["version"] == 3 and "champion" in got["aliases"]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["lora_sha256"] == sha256_file(out / "lora.safetensors")
    assert meta["base_model"] == str(tiny_model) and meta["pipeline_run_id"] == "r3"

    import mlflow.pyfunc

    from lora_pipeline.serving import decode_png

    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    params = {"num_inference_steps": 2, "height": 32, "width": 32, "seed": 1}
    out = model.predict(["a photo of <s1> dog", "<s1> on a beach"], params=params)  # base64 PNG rows
    images = [decode_png(s) for s in out["image"]]
    assert len(images) == 2 and images[0].size == (32, 32)
    # the LoRA is really applied: scale 0 gives a different image than scale 1
    plain = decode_png(model.predict(["a photo of <s1> dog"], params={**params, "scale": 0.0})["image"][0])
    diff = (torch.tensor(list(images[0].getdata())) - torch.tensor(list(plain.getdata()))).abs().float().mean()
    assert diff > 0.5, f"LoRA had no visible effect (mean abs pixel diff {diff:.3f})"


def test_register_errors_are_one_clear_line(tmp_path, stack_env, capsys):  # noqa: F811
    code = register.main(["--run-id", "bad", "--evaluation", str(tmp_path / "nothing"), "--model-name", "x"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--evaluation=" in err[0] and "no manifest.json" in err[0]


@pytest.mark.parametrize("run_id", ["it's", 'say "hi"', "two words", "ünïcødé-ラン"])
def test_odd_run_ids_retry_into_the_same_runs_and_version(tmp_path, stack_env, tiny_model, capsys, run_id):  # noqa: F811
    from mlflow.tracking import MlflowClient

    name = f"quoting-{abs(hash(run_id)) % 10**8}"
    key = "".join(c if c.isalnum() else "-" for c in run_id.encode("ascii", "replace").decode())
    cand = publish_candidate(tmp_path, key, tiny_model)
    evaluation = publish_evaluation(tmp_path, key, cand, {"clip_i": 0.5, "clip_t": 0.3}, tiny_model)
    first = run_register(run_id, evaluation, name, capsys)
    again = run_register(run_id, evaluation, name, capsys)
    assert again["version"] == first["version"] and again["reused"] is True
    client = MlflowClient()
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    runs = [r for r in client.search_runs([client.get_experiment_by_name("lora-pipeline").experiment_id],
                                          max_results=5000) if r.data.tags.get("pipeline_run_id") == run_id]  # fmt: skip
    roles = sorted(r.data.tags["lora_pipeline.role"] for r in runs)
    assert roles == ["pipeline", "step"], roles  # one parent and one register run, whatever the retries
    assert client.get_model_version(name, first["version"]).tags["pipeline_run_id"] == run_id


def test_every_run_ends_finished_or_failed(tmp_path, stack_env, tiny_model, capsys):  # noqa: F811
    """A failing register ends its run FAILED; a retry with bad input never re-opens the finished run; the
    finish step ends the parent (and any step run left RUNNING by a killed step) when the DAG run ends."""
    from lora_pipeline.steps import finish
    from lora_pipeline.steps.tracking import start_step
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    run_id, name = "status-1", "status-lora"
    cand = publish_candidate(tmp_path, run_id, tiny_model)
    good = publish_evaluation(tmp_path, run_id, cand, {"clip_i": 0.5, "clip_t": 0.3}, tiny_model)
    run_register(run_id, good, name, capsys)

    def runs():
        exp = client.get_experiment_by_name("lora-pipeline").experiment_id
        found = client.search_runs([exp], max_results=5000)
        return {r.data.tags.get("mlflow.runName"): r.info.status for r in found
                if r.data.tags.get("pipeline_run_id") == run_id}  # fmt: skip

    assert runs()["register"] == "FINISHED"
    # a retry with a bad promotion metric: refused before the run is touched
    assert register.main(["--run-id", run_id, "--evaluation", good, "--model-name", name,
                          "--promotion-metric", "nope"]) == 2  # fmt: skip
    assert "no such metric" in capsys.readouterr().err
    assert runs()["register"] == "FINISHED"
    # a failure after the run started (the best candidate's files are gone): the run ends FAILED
    bad_id = "status-2"
    evaluation = publish_evaluation(tmp_path, bad_id, "s3://artifacts/runs/status-2/missing/",
                                    {"clip_i": 0.9, "clip_t": 0.3}, tiny_model)  # fmt: skip
    assert register.main(["--run-id", bad_id, "--evaluation", evaluation, "--model-name", name]) == 2
    capsys.readouterr()
    exp = client.get_experiment_by_name("lora-pipeline").experiment_id
    failed = [r for r in client.search_runs([exp], max_results=5000) if r.data.tags.get("pipeline_run_id") == bad_id]
    assert {r.data.tags["mlflow.runName"]: r.info.status for r in failed}["register"] == "FAILED"

    # a step killed mid-run leaves its run RUNNING; the DAG's finish task ends everything
    start_step("tune", run_id)
    assert runs()["tune"] == "RUNNING" and runs()[run_id] == "RUNNING"  # the parent is named after the run id
    assert finish.main(["--run-id", run_id, "--status", "FAILED"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["steps_ended_as_failed"] == ["tune"]
    assert runs() == {run_id: "FAILED", "register": "FINISHED", "tune": "FAILED"}


def test_two_concurrent_registrations_end_with_the_better_one_as_champion(tmp_path, stack_env, tiny_model):  # noqa: F811
    """Two register processes at once, several times over: the champion is always the better version, as one
    serialised decision in version order would give."""
    import subprocess
    import sys

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for trial in range(3):
        name = f"race-{trial}"
        evals = {}
        for run_id, clip_i in ((f"race{trial}-a", 0.5), (f"race{trial}-b", 0.7)):
            cand = publish_candidate(tmp_path, run_id, tiny_model)
            evals[run_id] = publish_evaluation(tmp_path, run_id, cand, {"clip_i": clip_i, "clip_t": 0.3}, tiny_model)
        procs = {
            run_id: subprocess.Popen([sys.executable, "-m", "lora_pipeline.steps.register", "--run-id", run_id, "--evaluation", uri,
                                      "--model-name", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for run_id, uri in evals.items()
        }  # fmt: skip
        results = {}
        for run_id, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
            results[run_id] = json.loads(out.strip().splitlines()[-1])
        champion = client.get_model_version_by_alias(name, "champion")
        assert champion.tags["pipeline_run_id"] == f"race{trial}-b", (trial, results)
        a, b = results[f"race{trial}-a"], results[f"race{trial}-b"]
        assert b["alias"] == "champion", (trial, results)
        # the weaker one was champion only if it came first, as in a serial order, until the better one came
        assert a["alias"] == "challenger" or a["version"] < b["version"], (trial, results)
        assert len(client.search_model_versions(f"name = '{name}'")) == 2


def test_registered_model_is_logged_from_code_not_pickled(tmp_path, stack_env, tiny_model, capsys):  # noqa: F811
    """Loading a registered version runs only the installed project's code: no pickle in the artifacts."""
    import mlflow
    import yaml

    run_id, name = "fromcode-1", "fromcode-lora"
    cand = publish_candidate(tmp_path, run_id, tiny_model)
    result = run_register(run_id, publish_evaluation(tmp_path, run_id, cand, {"clip_i": 0.5}, tiny_model), name, capsys)
    local = mlflow.artifacts.download_artifacts(result["model_uri"], dst_path=str(tmp_path / "dl"))
    files = sorted(p.name for p in __import__("pathlib").Path(local).rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".cloudpickle"))], files
    flavor = yaml.safe_load((__import__("pathlib").Path(local) / "MLmodel").read_text())["flavors"]["python_function"]
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model" and "pyfunc_model.py" in files


def test_lora_registry_without_the_pipeline_extra_says_which_extra(tmp_path):
    """Without MLflow installed the console script answers with one line naming the extra, no traceback."""
    import subprocess
    import sys

    blocker = (  # this interpreter, as if mlflow were not installed
        "import importlib.util, sys\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a: None if name == 'mlflow' else _find(name, *a)\n"
        "from lora_pipeline.serving_cli import main\n"
        "sys.exit(main(['get', 'x@champion', '--out', 'o']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (
        "lora-registry: needs mlflow, which come with the pipeline extra: pip install 'lora-pipeline[pipeline]'"
    )
