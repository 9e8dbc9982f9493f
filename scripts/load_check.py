"""Load check: N concurrent `lora_finetune` runs through Airflow on the local stack, all registering one model.

    python scripts/load_check.py [--runs 6] [--out out/load-check]       # = make load-check

Every run is `airflow dags test lora_finetune` (local step executor) against the same SeaweedFS and MLflow
servers, started together with distinct logical dates, on the shapes world with a few training steps (the
load is on the pipeline's storage, tracking and registry, not on learning). Each run gets its own Airflow
home: the SQLite metadata database of the local profile takes one writer at a time, and what is shared
between the runs is what production shares (the object store, the tracking server, the registry).

Checked for every run: the DAG run succeeded; its prefixes are separate (`runs/<run id>/`) and every step
output's manifest verifies (every file there with its size and sha256: no lost or torn artifact); it made
exactly one model version; its MLflow parent run ended FINISHED. For the model: one version per run and
exactly one champion. Prints the figures (runs, wall time, versions, failures) and exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "dags"))

import demo_pipeline  # noqa: E402

STEP_PREFIXES = ("preprocess", "invert", "tune", "distill/r1", "evaluate")


def quick_conf(inputs: dict[str, str], model_name: str) -> dict:
    """The demo's configuration with a few steps, one rank, one prompt: seconds of compute per step."""
    return demo_pipeline.demo_conf(
        inputs, model_name, invert_steps=4, tune_steps=4, ranks=[1], tune_rank=1, batch_size=1,
        eval_prompts=["a red {token} circle"], eval_inference_steps=2, eval_sweep_steps=2,
    )  # fmt: skip


def check_run(run_id: str, bucket: str, model_name: str, tracking_uri: str) -> list[str]:
    """What is wrong with one finished run (empty: nothing)."""
    from lora_finetune import run_key as prefix_key
    from lora_pipeline.steps.artifacts import verify
    from lora_pipeline.steps.tracking import KEY_TAG, ROLE_TAG, quote, run_key
    from mlflow import MlflowClient

    problems = []
    root = f"s3://{bucket}/runs/{prefix_key(run_id)}"
    for step in STEP_PREFIXES:
        try:
            manifest = verify(f"{root}/{step}/")
            if manifest.get("run_id") != run_id:
                problems.append(f"{root}/{step}/ was written by run {manifest.get('run_id')!r}")
        except Exception as exc:  # noqa: BLE001 - every failure is a finding
            problems.append(f"{root}/{step}/: {exc}")
    client = MlflowClient(tracking_uri)
    versions = client.search_model_versions(f"name = {quote(model_name)} and tags.`{KEY_TAG}` = '{run_key(run_id)}'")
    if len(versions) != 1:
        problems.append(f"{len(versions)} model versions (expected 1)")
    exp = client.get_experiment_by_name("lora-pipeline")
    runs = client.search_runs([exp.experiment_id], f"tags.`{KEY_TAG}` = '{run_key(run_id)}'", max_results=1000)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "pipeline"]
    if len(parents) != 1 or parents[0].info.status != "FINISHED":
        problems.append(f"parent runs {[p.info.status for p in parents]} (expected one FINISHED)")
    running = [r.data.tags.get("mlflow.runName") for r in runs if r.info.status == "RUNNING"]
    if running:
        problems.append(f"step runs still RUNNING: {running}")
    return problems


def load_check(n: int, env: dict[str, str], inputs: dict[str, str], work: Path, model_name: str,
               echo=print) -> dict:  # fmt: skip
    """Run `n` DAG runs at once; returns the figures and the problems found."""
    from mlflow import MlflowClient

    work.mkdir(parents=True, exist_ok=True)
    template = work / "airflow-template"
    shutil.rmtree(template, ignore_errors=True)
    demo_pipeline.airflow_setup({**env, "AIRFLOW_HOME": str(template),
                                 "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{template / 'airflow.db'}"},
                                echo=echo)  # fmt: skip
    conf = quick_conf(inputs, model_name)
    start = datetime.now(timezone.utc).replace(microsecond=0)
    results: dict[int, dict] = {}

    def one(i: int) -> None:
        home = work / f"airflow-{i}"
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        shutil.copyfile(template / "airflow.db", home / "airflow.db")  # migrated, with the pool: no migration
        run_env = {
            **env,
            "AIRFLOW_HOME": str(home),  # airflow.cfg is written anew there (the template's names its own paths)
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
        }
        date = (start + timedelta(seconds=i)).isoformat()
        t0 = time.monotonic()
        try:
            run_id = demo_pipeline.run_finetune(conf, run_env, work / f"run-{i}.log", echo=lambda s: None,
                                                logical_date=date)  # fmt: skip
            results[i] = {"run_id": run_id, "seconds": time.monotonic() - t0, "error": None}
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = {"run_id": None, "seconds": time.monotonic() - t0, "error": str(exc)[-500:]}
        echo(f"    run {i}: {'ok' if results[i]['error'] is None else 'FAILED'} in {results[i]['seconds']:.0f}s")

    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0

    tracking = env["MLFLOW_TRACKING_URI"]
    problems = {}
    for i, res in sorted(results.items()):
        found = [res["error"]] if res["error"] else check_run(res["run_id"], env["LORA_PIPELINE_BUCKET"], model_name,
                                                              tracking)  # fmt: skip
        if found:
            problems[i] = found
    client = MlflowClient(tracking)
    versions = client.search_model_versions(f"name = '{model_name}'")
    # search results carry no aliases: read each version
    champions = [v.version for v in versions if "champion" in client.get_model_version(model_name, v.version).aliases]
    if len(champions) != 1:
        problems["model"] = [f"{len(champions)} champions among {len(versions)} versions"]
    run_ids = [r["run_id"] for r in results.values() if r["run_id"]]
    if len(set(run_ids)) != len(run_ids):
        problems["run ids"] = [f"runs shared a run id: {run_ids}"]
    return {
        "runs": n,
        "succeeded": sum(1 for r in results.values() if r["error"] is None),
        "wall_seconds": round(wall, 1),
        "run_seconds": [round(results[i]["seconds"], 1) for i in sorted(results)],
        "versions": len(versions),
        "champions": champions,
        "failures": problems,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=6, help="concurrent DAG runs (default 6)")
    p.add_argument("--out", default="out/load-check", help="logs and Airflow homes")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    import stack

    state = stack.state_dir()
    print("local stack: SeaweedFS (S3) + MLflow", flush=True)
    stack_env = stack.up(state)
    env = {**os.environ, **stack.airflow_env(state, stack_env)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    os.environ.update(stack_env)
    out = Path(args.out).resolve()
    inputs = demo_pipeline.prepare_inputs(out / "inputs", stack_env["LORA_PIPELINE_BUCKET"])
    model_name = f"load-check-{int(time.time())}"
    print(f"{args.runs} concurrent lora_finetune runs -> model {model_name}", flush=True)
    figures = load_check(args.runs, env, inputs, out, model_name, echo=lambda s: print(s, flush=True))
    print(json.dumps(figures, indent=2))
    return 0 if not figures["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
