"""End to end: `lora_finetune` through Airflow (local executor) against real SeaweedFS and MLflow servers.

On the shapes world: run 1 (the demo's pivotal tuning of the new subject) registers the champion with its
lineage; run 2, a weaker candidate (a few steps only), scores lower on the world's classifier and is
registered as challenger while the champion stays; the batch scan then sees the subject as unchanged, and
as changed once its dataset changes. Then, through a running Airflow (scheduler, dag-processor, api-server), the
scheduled `lora_batch` run and an asset-triggered `lora_retrain` run each train the subject whose data changed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from lora_pipeline.devstack import free_ports

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


def finetune_env(stack_env, airflow_home, tmp_path) -> dict[str, str]:
    return {
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


@pytest.mark.slow
def test_finetune_registers_champion_and_keeps_it_against_a_weaker_run(stack_env, airflow_home, tmp_path):  # noqa: F811
    env = finetune_env(stack_env, airflow_home, tmp_path)
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
    assert learned >= 0.4, tags  # the demo's run of this recipe: 0.8 (4 of 5 colours; 0.6 on the 2400-step base)
    assert "metric.clip_i" in tags and "metric.dino" in tags
    from lora_pipeline.steps.scan import dataset_hash

    assert tags["lora_uri"].startswith(tags["run_prefix"])  # the lineage tags the batch scan and the demo read
    assert tags["source_dataset_sha256"] == dataset_hash(inputs["dataset_uri"])
    files = demo_pipeline.fetch_evaluation(tags["run_prefix"], tmp_path / "evaluation")
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
    from lora_pipeline.steps import scan

    def needing_a_run() -> list[str]:
        return [c["model_name"] for c in scan.run(["--datasets", f"s3://{BUCKET}/datasets/"])["confs"]]

    assert needing_a_run() == []
    from lora_ops.shapes.world import Spec, write_images

    extra = write_images([Spec("ring", "red")], tmp_path / "more", seed=7, prefix="ring_new")
    demo_pipeline.upload_folder(extra, inputs["dataset_uri"])
    assert needing_a_run() == ["lora-ring"]


@pytest.mark.slow
def test_finetune_runs_the_whole_dag_on_an_sdxl_base(stack_env, airflow_home, tmp_path):  # noqa: F811
    """A tiny SDXL base through every step of `lora_finetune`: tokens learned in both text encoders, LoRA tuned,
    distilled, evaluated and registered."""
    from lora_pipeline.steps.artifacts import Store, parse_uri

    from lora_ops.formats import lora_family
    from lora_ops.lora_file import load_lora
    from lora_ops.tiny import make_tiny_model

    env = finetune_env(stack_env, airflow_home, tmp_path)
    inputs = demo_pipeline.prepare_inputs(tmp_path / "inputs", BUCKET)
    xl = make_tiny_model(tmp_path / "tiny-sdxl", arch="sdxl-tiny")
    inputs["base_model"] = f"s3://{BUCKET}/models/tiny-sdxl/"
    demo_pipeline.upload_folder(xl, inputs["base_model"])
    demo_pipeline.airflow_setup(env)
    # a few steps: this checks the pipeline on SDXL, not what a tiny random SDXL learns; its 32 px images
    # bucket in steps of 8 (bucketing is on by default for SDXL)
    conf = demo_pipeline.demo_conf(inputs, "lora-ring-xl", invert_steps=2, tune_steps=2, bucket_reso_steps=8)
    run = demo_pipeline.run_finetune(conf, env, tmp_path / "xl.log")
    mv, champion = demo_pipeline.registered_version("lora-ring-xl", run, stack_env["MLFLOW_TRACKING_URI"])
    assert champion.version == mv.version and mv.tags["base_model"] == inputs["base_model"]
    assert mv.tags["tokens"] == "<s1>" and "metric.classifier" in mv.tags
    loc = parse_uri(mv.tags["lora_uri"], "lora_uri").as_prefix()
    store = Store.for_uri(loc)
    (name,) = [rel for rel, _ in store.list(loc) if rel.endswith(".safetensors")]
    store.get_file(loc.join(name), tmp_path / "registered.safetensors")
    lora = load_lora(tmp_path / "registered.safetensors")
    assert lora_family(lora) == "sdxl" and lora.unet
    assert list(lora.tokens) == list(lora.tokens_2) == ["<s1>"]  # the learned token, in both encoders
    assert lora.tokens_2["<s1>"].shape == (48,)


# ---------------------------------------------------------------------------------------------------------
# lora_batch (scheduled) and lora_retrain (asset-triggered) as whole DAG runs through a running Airflow

SCHEDULED_BUCKET = "lora-batch"


def seed_champion(client, name: str, dataset_sha256: str):
    """A champion version whose lineage names `dataset_sha256` (the `source_dataset_sha256` tag the change
    detection reads), standing in for an earlier pipeline run; it carries no metrics, so any new version wins."""
    client.create_registered_model(name)
    mv = client.create_model_version(name, source=f"s3://{SCHEDULED_BUCKET}/seed/{name}/",
                                     tags={"source_dataset_sha256": dataset_sha256})  # fmt: skip
    client.set_registered_model_alias(name, "champion", mv.version)
    return mv


@pytest.fixture(scope="module")
def scheduler(s3_server, mlflow_server, tmp_path_factory):  # noqa: F811
    """Airflow's servers (scheduler, dag-processor, api-server) over two subjects, star and striped, each with a
    champion trained on its current dataset; lora_finetune's defaults are the shapes world with a few steps."""
    work = tmp_path_factory.mktemp("airflow-scheduled")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {**s3_server.env, **mlflow_server.env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}.items():
            mp.setenv(key, value)
        import load_check
        from lora_pipeline.steps.scan import dataset_hash
        from mlflow import MlflowClient

        from lora_ops.shapes.world import write_concept_dataset

        inputs = demo_pipeline.prepare_inputs(work / "inputs", SCHEDULED_BUCKET, subject="star")
        striped = write_concept_dataset("striped", work / "inputs" / "dataset" / "striped")
        demo_pipeline.upload_folder(striped, f"s3://{SCHEDULED_BUCKET}/datasets/striped/")
        client = MlflowClient(mlflow_server.url)
        for subject in ("star", "striped"):
            seed_champion(client, f"lora-{subject}", dataset_hash(f"s3://{SCHEDULED_BUCKET}/datasets/{subject}/"))
        # the few-step shapes-world conf, with captions any subject matches (the tokens prepended)
        defaults = load_check.quick_conf(inputs, "lora-example")
        defaults.update(
            token_substitution="<s1>", classifier_model=None, classifier_target=None, promotion_metric="clip_i"
        )
        del defaults["dataset_uri"], defaults["model_name"]  # set per subject by the batch and retrain DAGs
        env = {
            **os.environ,
            "LORA_PIPELINE_BUCKET": SCHEDULED_BUCKET,
            "LORA_PIPELINE_CACHE": str(work / "cache"),
            "LORA_PIPELINE_EXECUTOR": "local",
            "LORA_PIPELINE_PYTHON": sys.executable,
            "LORA_PIPELINE_FINETUNE_DEFAULTS": json.dumps(defaults),
            "AIRFLOW_HOME": str(work / "home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
            "OMP_NUM_THREADS": "1",  # two fine-tunes share the cores
        }
        demo_pipeline.airflow_setup(env)
        with demo_pipeline.AirflowServices(env, free_ports(1)[0], work / "logs") as services:
            services.api(
                "PATCH",
                "/api/v2/pools/lora_gpu?update_mask=slots",
                {"pool": "lora_gpu", "slots": 2, "include_deferred": False},
            )  # two "GPUs": both runs progress at once
            yield services, client, work


def _new_run(services, dag_id: str, run_type: str, timeout: float = 120.0) -> dict:
    """The first run of `dag_id` of that type, once the scheduler has created it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = [r for r in services.runs(dag_id) if r["run_type"] == run_type]
        if runs:
            return runs[0]
        time.sleep(2)
    raise AssertionError(f"no {run_type} run of {dag_id} within {timeout:.0f}s\n{services.log_tail('scheduler')}")


def _wait_task(services, dag_id: str, run_id: str, task_id: str, timeout: float = 180.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        tis = [t for t in services.task_instances(dag_id, run_id) if t["task_id"] == task_id]
        if tis and tis[0]["state"] == "success":
            return tis[0]
        assert not tis or tis[0]["state"] not in ("failed", "upstream_failed"), services.failed_logs(dag_id, run_id)
        time.sleep(2)
    raise AssertionError(f"{dag_id}.{task_id} did not succeed within {timeout:.0f}s")


@pytest.mark.slow
def test_scheduled_batch_trains_the_changed_subject_and_a_dataset_event_retrains_another(scheduler, tmp_path):
    services, client, work = scheduler
    from lora_ops.shapes.world import Spec, write_images

    # striped's dataset changes (star's does not); the scheduled run of lora_batch starts when it is unpaused
    more = write_images([Spec("circle", "blue", "striped")], tmp_path / "striped", seed=5, prefix="striped_new")
    demo_pipeline.upload_folder(more, f"s3://{SCHEDULED_BUCKET}/datasets/striped/")
    services.unpause("lora_finetune", "lora_batch")
    batch = _new_run(services, "lora_batch", "scheduled")
    _wait_task(services, "lora_batch", batch["dag_run_id"], "scan")

    # then star's dataset changes and its producer records an event on the lora_datasets asset
    more = write_images([Spec("star", "yellow")], tmp_path / "star", seed=6, prefix="star_new")
    demo_pipeline.upload_folder(more, f"s3://{SCHEDULED_BUCKET}/datasets/star/")
    services.unpause("lora_retrain", "lora_dataset_updated")
    producer = services.trigger("lora_dataset_updated", {"subject": "star"})
    services.wait_for_run("lora_dataset_updated", producer, timeout=180)
    retrain = _new_run(services, "lora_retrain", "asset_triggered")

    # both runs wait for the lora_finetune runs they triggered
    services.wait_for_run("lora_batch", batch["dag_run_id"], timeout=600)
    services.wait_for_run("lora_retrain", retrain["dag_run_id"], timeout=600)
    for dag_run, model in ((batch, "lora-striped"), (retrain, "lora-star")):
        dag_id = "lora_batch" if dag_run is batch else "lora_retrain"
        triggers = [t for t in services.task_instances(dag_id, dag_run["dag_run_id"]) if t["task_id"] == "finetune"]
        assert [(t["rendered_map_index"], t["state"]) for t in triggers] == [(model, "success")], (dag_id, triggers)
    finetunes = {r["conf"]["model_name"]: r for r in services.runs("lora_finetune")}
    assert set(finetunes) == {"lora-striped", "lora-star"}  # star was unchanged at the batch scan: not trained
    for model, subject in (("lora-striped", "striped"), ("lora-star", "star")):
        run = finetunes[model]
        assert run["state"] == "success" and run["run_type"] == "operator_triggered", run
        assert run["conf"]["dataset_uri"] == f"s3://{SCHEDULED_BUCKET}/datasets/{subject}/"
        mv, champion = demo_pipeline.registered_version(model, run["dag_run_id"], client.tracking_uri)
        assert champion.version == mv.version and mv.tags["airflow_run_id"] == run["dag_run_id"]
    # the event named its subject, and the retrain run consumed it
    events = services.api("GET", "/api/v2/assets/events?limit=100")["asset_events"]
    assert [e["extra"].get("subject") for e in events] == ["star"]
    upstream = f"/api/v2/dags/lora_retrain/dagRuns/{retrain['dag_run_id']}/upstreamAssetEvents"
    assert [e["id"] for e in services.api("GET", upstream)["asset_events"]] == [e["id"] for e in events]
