"""End to end: `lora_finetune` through Airflow (local executor) against real SeaweedFS and MLflow servers.

On the shapes world: run 1 (the demo's pivotal tuning of the new subject) registers the champion with its
lineage; run 2, a weaker candidate (a few steps only), scores lower on the world's classifier and is
registered as challenger while the champion stays; the batch scan then sees the subject as unchanged, and
as changed once its dataset changes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from stack_fixtures import mlflow_server, s3_server, stack_env  # noqa: F401  (pytest fixtures)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "dags"))

import demo_pipeline  # noqa: E402

from lora_ops.shapes.recipes import RecipeConfig  # noqa: E402

MODEL = "lora-ring"
BUCKET = "lora-pipeline"


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    return tmp_path_factory.mktemp("airflow")


@pytest.mark.slow
def test_finetune_registers_champion_and_keeps_it_against_a_weaker_run(stack_env, airflow_home, tmp_path):  # noqa: F811
    env = {
        **os.environ,
        **stack_env,
        "LORA_PIPELINE_BUCKET": BUCKET,
        "LORA_PIPELINE_CACHE": str(tmp_path / "cache"),
        "LORA_PIPELINE_EXECUTOR": "local",
        "LORA_PIPELINE_PYTHON": sys.executable,
        "AIRFLOW_HOME": str(airflow_home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
    }
    inputs = demo_pipeline.prepare_inputs(tmp_path / "inputs", BUCKET)
    demo_pipeline.airflow_setup(env)

    # run 1: the first version becomes champion, with its lineage
    run1 = demo_pipeline.run_finetune(demo_pipeline.demo_conf(inputs, MODEL), env, tmp_path / "run1.log")
    mv1, champion = demo_pipeline.registered_version(MODEL, run1, stack_env["MLFLOW_TRACKING_URI"])
    assert champion.version == mv1.version and "champion" in mv1.aliases
    tags = mv1.tags
    assert tags["pipeline_run_id"] == run1 and tags["airflow_run_id"] == run1
    assert tags["airflow_dag_id"] == "lora_finetune"
    assert tags["base_model"] == inputs["base_model"]
    assert tags["tokens"] == "<s1>"
    assert tags["rank"] == str(RecipeConfig().rank)  # the demo distills at the tuning rank
    assert len(tags["dataset_sha256"]) == 64
    assert f"/runs/{run1.replace(':', '-').replace('+', '-')}/distill/r" in tags["lora_uri"]
    learned = float(tags["metric.classifier"])  # the share of its images the world's evaluator calls a ring
    assert learned >= 0.4, tags  # measured 0.6 (3 of 5 colours)
    assert "metric.clip_i" in tags and "metric.dino" in tags
    files = demo_pipeline.fetch_evaluation(tags["lora_uri"].split("distill/")[0], tmp_path / "evaluation")
    assert {"comparison.png", "sweep.png", "metrics.json"} <= {f.name for f in files}
    assert all(f.stat().st_size > 0 for f in files)

    # run 2: a weaker candidate (a few steps instead of 800 per phase) scores lower and stays challenger
    weak = demo_pipeline.demo_conf(inputs, MODEL, invert_steps=2, tune_steps=2, seed=1)
    run2 = demo_pipeline.run_finetune(weak, env, tmp_path / "run2.log")
    mv2, champion = demo_pipeline.registered_version(MODEL, run2, stack_env["MLFLOW_TRACKING_URI"])
    assert mv2.version != mv1.version and mv2.tags["pipeline_run_id"] == run2
    assert float(mv2.tags["metric.classifier"]) < learned, mv2.tags
    assert champion.version == mv1.version
    assert "challenger" in mv2.aliases and "champion" not in mv2.aliases

    # the batch scan compares the dataset with the champion's lineage: unchanged now, changed after an upload
    from lora_datasets import subjects_to_train

    assert subjects_to_train(f"s3://{BUCKET}/datasets/", "lora-")[0] == []
    from lora_ops.shapes.world import Spec, write_images

    extra = write_images([Spec("ring", "red")], tmp_path / "more", seed=7, prefix="ring_new")
    demo_pipeline.upload_folder(extra, inputs["dataset_uri"])
    assert subjects_to_train(f"s3://{BUCKET}/datasets/", "lora-")[0] == ["ring"]
