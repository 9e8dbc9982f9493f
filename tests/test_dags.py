"""The Airflow DAGs: they import cleanly and fast, without the ML stack; structure, params and step flags."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
# Airflow reads its configuration when first imported: a private home, no examples, this repo's DAGs
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="airflow-home-"))
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
os.environ.pop("LORA_PIPELINE_EXECUTOR", None)
os.environ.pop("LORA_PIPELINE_FINETUNE_DEFAULTS", None)
sys.path.insert(0, str(DAGS))

from airflow.dag_processing.dagbag import DagBag  # noqa: E402
from airflow.sdk.definitions.param import ParamValidationError  # noqa: E402
from lora_finetune import build_commands, run_key  # noqa: E402
from lora_pipeline_tasks import GPU_POOL, ExecutorConfig, LocalStepOperator, step_command  # noqa: E402

EXPECTED_DAGS = {"lora_finetune", "lora_batch", "lora_retrain", "lora_dataset_updated"}


@pytest.fixture(scope="module")
def dagbag():
    return DagBag(dag_folder=str(DAGS))


@pytest.fixture(scope="module")
def finetune(dagbag):
    return dagbag.dags["lora_finetune"]


@pytest.fixture(scope="module")
def served_params(finetune):
    """The params as the scheduler and API server see them (after DAG serialisation)."""
    from airflow.serialization.serialized_objects import DagSerialization

    return DagSerialization.from_dict(DagSerialization.to_dict(finetune)).params


def test_dagbag_imports_without_errors(dagbag):
    assert dagbag.import_errors == {}
    assert set(dagbag.dags) >= EXPECTED_DAGS


def test_house_rules_on_every_dag(dagbag):
    for dag_id in EXPECTED_DAGS:
        dag = dagbag.dags[dag_id]
        assert dag.catchup is False, dag_id
        assert dag.tags, dag_id
        assert dag.doc_md and dag.doc_md.strip().startswith("###"), dag_id
        for t in dag.tasks:
            if t.task_type == "TriggerDagRunOperator":  # a retry would start a second run of the triggered DAG
                assert t.retries == 0, f"{dag_id}.{t.task_id} has retries={t.retries}"
            else:
                assert t.retries >= 2, f"{dag_id}.{t.task_id} has retries={t.retries}"


def _empty(value) -> bool:
    return value is None or value in ("", [], {})


def test_every_form_field_is_optional_or_filled_and_has_a_description_and_section(dagbag):
    """The trigger form (Airflow 3 UI) marks a field required unless its type admits null: an empty default on a
    non-nullable field opens the form in error with Trigger disabled. Checked on the served (serialised) DAGs."""
    from airflow.serialization.serialized_objects import DagSerialization

    problems = []
    for dag_id in sorted(dagbag.dags):
        served = DagSerialization.from_dict(DagSerialization.to_dict(dagbag.dags[dag_id]))
        for name, param in served.params.items():
            param = served.params.get_param(name)
            types = param.schema.get("type", [])
            types = [types] if isinstance(types, str) else list(types)
            where = f"{dag_id}.{name}"
            if _empty(param.value) and "null" not in types:
                problems.append(f"{where}: empty default {param.value!r} but type {types} is not nullable")
            if not (param.description or "").strip():
                problems.append(f"{where}: no description")
            if not param.schema.get("section"):
                problems.append(f"{where}: no section")
        try:
            served.params.validate()  # the defaults themselves pass the schema (the form opens valid)
        except ParamValidationError as exc:
            problems.append(f"{dag_id}: defaults do not validate: {exc}")
    assert problems == []


def test_finetune_form_sections_group_related_fields(finetune):
    section = {name: finetune.params.get_param(name).schema["section"] for name in finetune.params}
    assert {section[n] for n in ("mask", "mask_phrases", "crop", "use_masks")} == {"Captions and masks"}
    assert section["executor_profile"] == "Execution"
    assert section["clip_model"] == section["promotion_metric"] == "Evaluation"
    # each section is one contiguous block of the form
    order = list(dict.fromkeys(section.values()))
    blocks = [s for i, s in enumerate(section.values()) if i == 0 or s != list(section.values())[i - 1]]
    assert blocks == order, blocks


def test_parsing_the_dags_imports_no_ml_stack_and_is_fast():
    code = (
        "import sys, time\n"
        "from airflow.dag_processing.dagbag import DagBag\n"
        "t = time.perf_counter(); b = DagBag(dag_folder=sys.argv[1]); dt = time.perf_counter() - t\n"
        "assert not b.import_errors, b.import_errors\n"
        "heavy = sorted(m for m in ('torch', 'diffusers', 'transformers', 'lora_ops', 'mlflow', 'minio') "
        "if m in sys.modules)\n"
        "print(heavy, len(b.dags), round(dt, 3))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORA_PIPELINE_")}
    out = subprocess.run([sys.executable, "-c", code, str(DAGS)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    heavy, count, seconds = out.stdout.strip().splitlines()[-1].rsplit(" ", 2)
    assert heavy == "[]", f"parsing the DAGs imported {heavy}"
    assert int(count) >= len(EXPECTED_DAGS)
    assert float(seconds) < 5.0  # the DAG files themselves; the scheduler re-parses them often


def test_finetune_structure(finetune):
    assert finetune.schedule is None
    ids = {t.task_id for t in finetune.tasks}
    assert ids == {"plan", "per_rank", "preprocess", "invert", "tune", "distill", "evaluate", "register", "finish",
                   "finish_failed"}  # fmt: skip
    chain = ["preprocess", "invert", "tune", "distill", "evaluate", "register"]
    for up, down in zip(chain, chain[1:], strict=False):
        assert finetune.get_task(down).upstream_task_ids >= {up}, f"{up} >> {down}"
    assert finetune.get_task("preprocess").upstream_task_ids >= {"plan", "per_rank"}
    # the MLflow runs end with the DAG run, whichever way it ends
    assert finetune.get_task("finish").upstream_task_ids >= {"register"}
    assert finetune.get_task("finish").trigger_rule == "all_success"
    failed = finetune.get_task("finish_failed")
    assert failed.trigger_rule == "one_failed" and failed.upstream_task_ids >= set(chain)
    for step in ("preprocess", "invert", "tune", "distill", "evaluate"):
        assert finetune.get_task(step).pool == GPU_POOL, step
    assert finetune.get_task("register").pool != GPU_POOL
    distill = finetune.get_task("distill")
    assert type(distill).__name__ == "MappedOperator"
    assert "--rank" in distill.map_index_template
    assert isinstance(finetune.get_task("tune"), LocalStepOperator)  # the default executor


def test_map_index_template_names_the_rank(finetune):
    from jinja2 import Environment

    template = finetune.get_task("distill").map_index_template

    class Task:
        arguments = ["--run-id", "r", "--lora", "s3://b/t/", "--rank", "4", "--out", "s3://b/d/r4/"]

    assert Environment().from_string(template).render(task=Task()) == "rank 4"


def _conf(**overrides):
    conf = {
        "dataset_uri": "s3://lora-pipeline/datasets/dog/",
        "model_name": "dog-lora",
        "ranks": [4, 2],
        "resolution": 64,
    }
    conf.update(overrides)
    return conf


def test_params_schema_accepts_the_defaults_and_a_good_conf(finetune, served_params):
    finetune.params.validate()
    resolved = served_params.deep_merge(_conf()).validate()
    assert resolved["ranks"] == [4, 2] and resolved["template"] == "object"
    schema = finetune.params.get_param("ranks").schema
    assert schema["type"] == "array" and schema["items"]["minimum"] == 1


@pytest.mark.parametrize(
    "bad",
    [
        {"dataset_uri": "http://example.com/dog"},
        {"dataset_uri": "relative/folder"},
        {"model_name": "has spaces"},
        {"placeholder_tokens": "s1|s2"},
        {"ranks": []},
        {"ranks": [0]},
        {"ranks": [4, 4]},
        {"resolution": 100},
        {"invert_steps": 0},
        {"tune_lr_unet": 0},
        {"promotion_metric": "loss"},
        {"template": "portrait"},
        {"executor_profile": "tpu"},
    ],
    ids=lambda bad: next(iter(bad)),
)
def test_invalid_trigger_conf_is_rejected(served_params, bad):
    # the same call Airflow makes when a run is created from the form, the API or the CLI
    with pytest.raises(ParamValidationError):
        served_params.deep_merge(_conf(**bad)).validate()


def _params(served_params, **overrides):
    return served_params.deep_merge(_conf(**overrides)).validate()


def test_build_commands_chains_step_outputs(served_params):
    run_id = "manual__2026-01-01T00:00:00+00:00"
    cmds = build_commands(run_id, _params(served_params, initializer_tokens="dog|photo", caption_model="none"), "bkt")
    root = f"s3://bkt/runs/{run_key(run_id)}"
    assert run_key(run_id) == "manual__2026-01-01T00-00-00-00-00"

    def flag(args, name):
        return [args[i + 1] for i, a in enumerate(args) if a == name]

    assert flag(cmds["preprocess"], "--dataset") == ["s3://lora-pipeline/datasets/dog/"]
    assert flag(cmds["preprocess"], "--caption-model") == ["none"]
    assert flag(cmds["invert"], "--dataset") == [f"{root}/preprocess/"]
    assert flag(cmds["invert"], "--initializer-tokens") == ["dog|photo"]
    assert flag(cmds["tune"], "--tokens") == [f"{root}/invert/"]
    assert [flag(a, "--rank") for a in cmds["distill"]] == [["4"], ["2"]]
    assert [flag(a, "--lora") for a in cmds["distill"]] == [[f"{root}/tune/"]] * 2
    assert flag(cmds["evaluate"], "--lora") == [f"{root}/distill/r4/", f"{root}/distill/r2/"]
    assert flag(cmds["register"], "--evaluation") == [f"{root}/evaluate/"]
    for step in ("preprocess", "invert", "tune", "evaluate", "register", *["distill"] * 2):
        args = cmds[step] if step != "distill" else cmds["distill"][0]
        assert flag(args, "--run-id") == [run_id], step
    assert "--device" not in cmds["register"]
    json.dumps(cmds)  # XCom-serialisable


def test_build_commands_parse_with_the_real_step_parsers(served_params):
    import importlib

    cmds = build_commands("manual__x", _params(served_params, caption_model="none"), "bkt")
    for step in ("preprocess", "invert", "tune", "distill", "evaluate", "register", "finish", "finish_failed"):
        module = importlib.import_module(f"lora_pipeline.steps.{step.removesuffix('_failed')}")
        for args in cmds[step] if step == "distill" else [cmds[step]]:
            module.build_parser().parse_args(args)  # argparse exits on an unknown or malformed flag


def test_optional_fields_left_empty_add_no_flags(served_params):
    # None (the form's empty optional field) and "" (older confs) both mean "the step's default"
    for empty in (None, ""):
        overrides = {k: empty for k in ("initializer_tokens", "caption_model", "token_substitution", "clip_model",
                                        "dino_model", "class_word", "classifier_model")}  # fmt: skip
        cmds = build_commands("r", _params(served_params, eval_prompts=None if empty is None else [], **overrides),
                              "bkt")  # fmt: skip
        flat = [a for step in ("preprocess", "invert", "evaluate") for a in cmds[step]]
        for flag in ("--initializer-tokens", "--caption-model", "--token-substitution", "--clip-model",
                     "--dino-model", "--class-word", "--classifier-model", "--prompts"):  # fmt: skip
            assert flag not in flat, (empty, flag)
        assert "None" not in flat


def test_deployment_form_defaults_replace_the_param_defaults():
    from lora_finetune import PARAMS, with_form_defaults

    params = with_form_defaults(PARAMS, json.dumps({"base_model": "s3://b/models/sd/", "eval_prompts": ["a {token}"]}))
    assert params["base_model"].value == "s3://b/models/sd/" and params["eval_prompts"].value == ["a {token}"]
    assert params["base_model"].schema == PARAMS["base_model"].schema
    assert params["base_model"].description == PARAMS["base_model"].description
    assert PARAMS["base_model"].value == "stable-diffusion-v1-5/stable-diffusion-v1-5"  # not modified in place
    assert with_form_defaults(PARAMS, "") is PARAMS
    for raw, message in (("{", "not valid JSON"), ("[1]", "JSON object"), ('{"rank": 4}', "unknown param"),
                         ('{"tune_rank": -1}', "tune_rank")):  # fmt: skip
        with pytest.raises(ValueError, match=f"LORA_PIPELINE_FINETUNE_DEFAULTS.*{message}"):
            with_form_defaults(PARAMS, raw)


def test_bad_form_defaults_are_an_import_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_FINETUNE_DEFAULTS", '{"ranks": [0]}')
    errors = DagBag(dag_folder=str(DAGS / "lora_finetune.py")).import_errors
    assert "LORA_PIPELINE_FINETUNE_DEFAULTS" in str(errors) and "ranks" in str(errors)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"ranks": [8], "tune_rank": 4}, "ranks"),
        ({"initializer_tokens": "dog"}, "initializer_tokens"),
    ],
)
def test_build_commands_rejects_inconsistent_forms(served_params, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_commands("r", _params(served_params, **overrides), "bkt")


def test_executor_config_from_env():
    cfg = ExecutorConfig.from_env({})
    assert cfg.executor == "local" and cfg.python == sys.executable and cfg.gpu_resource == "nvidia.com/gpu"
    cfg = ExecutorConfig.from_env(
        {
            "LORA_PIPELINE_EXECUTOR": "kubernetes",
            "LORA_PIPELINE_GPU_COUNT": "2",
            "LORA_PIPELINE_GPU_NODE_SELECTOR": '{"gpu": "h100"}',
            "LORA_PIPELINE_GPU_TOLERATIONS": '[{"key": "nvidia.com/gpu", "operator": "Exists"}]',
        }
    )
    assert cfg.gpu_count == 2 and cfg.gpu_node_selector == {"gpu": "h100"} and len(cfg.gpu_tolerations) == 1
    with pytest.raises(ValueError, match="LORA_PIPELINE_EXECUTOR"):
        ExecutorConfig.from_env({"LORA_PIPELINE_EXECUTOR": "slurm"})
    with pytest.raises(ValueError, match="LORA_PIPELINE_GPU_NODE_SELECTOR"):
        ExecutorConfig.from_env({"LORA_PIPELINE_GPU_NODE_SELECTOR": "{gpu: h100"})
    with pytest.raises(ValueError, match="LORA_PIPELINE_GPU_TOLERATIONS"):
        ExecutorConfig.from_env({"LORA_PIPELINE_GPU_TOLERATIONS": '{"key": "x"}'})
    with pytest.raises(ValueError, match="LORA_PIPELINE_GPU_COUNT"):
        ExecutorConfig.from_env({"LORA_PIPELINE_GPU_COUNT": "one"})
    with pytest.raises(ValueError, match="step"):
        step_command("train")


def test_a_dag_with_a_bad_executor_setting_is_an_import_error(monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_EXECUTOR", "slurm")
    errors = DagBag(dag_folder=str(DAGS / "lora_finetune.py")).import_errors
    assert "LORA_PIPELINE_EXECUTOR" in str(errors)


def test_local_operator_fails_without_retry_on_invalid_input():
    from airflow.sdk.exceptions import AirflowFailException

    op = LocalStepOperator(task_id="t", step="register", arguments=["--run-id", "r"], python=sys.executable,
                           env_vars={})  # fmt: skip
    with pytest.raises(AirflowFailException, match="exit 2"):
        op.execute({})  # argparse: --evaluation and --model-name are required -> exit 2


def test_the_dag_files_import_only_airflow_and_the_dag_folder():
    """The scheduler image carries no step code: every import of a DAG file is the standard library, Airflow,
    its providers' clients, or a module of the DAG folder itself."""
    import ast

    own = {p.stem for p in DAGS.glob("*.py")}
    allowed = {"airflow", "kubernetes", "docker", "pendulum", *own, *sys.stdlib_module_names}
    for path in sorted(DAGS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"


def test_batch_and_retrain_decide_in_the_scan_step(dagbag):
    from lora_datasets import SUBJECT_PATTERN, scan_arguments
    from lora_pipeline.steps import scan as scan_step
    from lora_pipeline_tasks import STEPS

    assert "scan" in STEPS and SUBJECT_PATTERN == scan_step.SUBJECT_PATTERN  # the form checks what the step does
    for dag_id in ("lora_batch", "lora_retrain"):
        dag = dagbag.dags[dag_id]
        scan = dag.get_task("scan")
        assert getattr(scan, "step", None) == "scan" or "lora_pipeline.steps.scan" in " ".join(
            getattr(scan, "cmds", []) or []
        )
        assert dag.get_task("finetune").partial_kwargs["retries"] == 0  # a retry would start a second fine-tune
        assert {t.task_id for t in scan.upstream_list} == {"scan_flags"}
        assert {t.task_id for t in scan.downstream_list} == {"finetune_confs"}
    args = scan_arguments("s3://b/datasets/", "lora-", {"tune_steps": 5}, ["owl", "dog"])
    parsed = scan_step.build_parser().parse_args(args)
    assert (parsed.datasets, parsed.model_prefix, parsed.subjects) == ("s3://b/datasets/", "lora-", "dog,owl")
    assert scan_step._overrides(parsed.finetune_conf) == {"tune_steps": 5}
    assert (
        scan_step._overrides(scan_step.build_parser().parse_args(scan_arguments("s3://b/d/", "", None)).finetune_conf)
        == {}
    )


def test_dataset_asset_links_producer_and_consumer(dagbag):
    from lora_datasets import DATASETS

    consumer = dagbag.dags["lora_retrain"]
    assert [a.uri for a in consumer.timetable.asset_condition.objects] == [DATASETS.uri]
    producer = dagbag.dags["lora_dataset_updated"].get_task("announce")
    assert [a.uri for a in producer.outlets] == [DATASETS.uri]
    batch = dagbag.dags["lora_batch"]
    assert batch.timetable.can_be_scheduled and batch.catchup is False
    for dag in (batch, consumer):
        trigger = dag.get_task("finetune")
        assert trigger.partial_kwargs["trigger_dag_id"] == "lora_finetune"
        assert trigger.partial_kwargs["max_active_tis_per_dagrun"] >= 1
