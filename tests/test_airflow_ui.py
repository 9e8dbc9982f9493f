"""The Airflow 3 UI in a real browser: every DAG's trigger form opens valid, a bad value is refused with a
message, and `lora_finetune` triggered from its form with the local profile's defaults runs to success.

Airflow (api-server, scheduler, dag-processor; SQLite, LocalExecutor, the simple auth manager with every user
an admin, as `make airflow` runs it) against real SeaweedFS and MLflow servers; the browser is Debian's
`chromium` driven by Playwright. The form's defaults are the local profile's (`LORA_PIPELINE_FINETUNE_DEFAULTS`):
the shapes world, here with the load check's few training steps so that the run takes a minute or two on a CPU.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from lora_pipeline.devstack import free_ports

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import demo_pipeline  # noqa: E402
import load_check  # noqa: E402

BUCKET = "lora-ui"
MODEL = "ui-ring"
FINETUNE_SECTIONS = ["Data and model", "Tokens", "Captions and masks", "Training", "Evaluation", "Execution"]
DAG_IDS = ["lora_finetune", "lora_batch", "lora_retrain", "lora_dataset_updated"]
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def airflow(s3_server, mlflow_server, tmp_path_factory):  # noqa: F811
    """The local profile's Airflow servers on a free port, with lora_finetune's defaults set to the shapes world."""
    work = tmp_path_factory.mktemp("airflow-ui")
    client_env = {**s3_server.env, **mlflow_server.env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in client_env.items():
            mp.setenv(key, value)
        inputs = demo_pipeline.prepare_inputs(work / "inputs", BUCKET)
        env = {
            **os.environ,
            "LORA_PIPELINE_BUCKET": BUCKET,
            "LORA_PIPELINE_CACHE": str(work / "cache"),
            "LORA_PIPELINE_EXECUTOR": "local",
            "LORA_PIPELINE_PYTHON": sys.executable,
            "LORA_PIPELINE_FINETUNE_DEFAULTS": json.dumps(load_check.quick_conf(inputs, MODEL)),
            "AIRFLOW_HOME": str(work / "home"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
            "OMP_NUM_THREADS": "1",
        }
        demo_pipeline.airflow_setup(env)
        with demo_pipeline.AirflowServices(env, free_ports(1)[0], work / "logs") as services:
            yield services


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:  # `make test` installs it; a direct pytest run on a machine without it fails here
        pytest.fail("chromium is not installed: `make browser` (or apt-get install chromium) installs it")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(30_000)
    yield context.new_page()
    context.close()


def open_trigger_form(page, airflow, dag_id: str):
    """The DAG's page, then its Trigger dialog; returns (dialog, form)."""
    page.goto(f"{airflow.url}/dags/{dag_id}")
    page.get_by_role("button", name="Trigger").first.click()
    dialog = page.get_by_role("dialog")
    form = dialog.get_by_test_id("config-form")
    form.wait_for()
    return dialog, form


def sections(form) -> dict[str, object]:
    """{title: accordion item} of the form's sections, "Advanced Options" (the conf JSON, run id) included."""
    items = form.locator('[data-part="item"]')
    return {items.nth(i).locator('[data-part="item-trigger"]').inner_text().strip(): items.nth(i)
            for i in range(items.count())}  # fmt: skip


def section_errors(item) -> int:
    """The error marks on a section's title: the UI puts an alert icon there while a field inside is invalid
    or a required field is empty (the chevron is the item indicator, not counted)."""
    return item.locator('[data-part="item-trigger"] > :not([data-part="item-indicator"]) svg').count()


def open_section(page, item) -> None:
    trigger = item.locator('[data-part="item-trigger"]')
    if trigger.get_attribute("aria-expanded") != "true":
        trigger.click()
    page.wait_for_timeout(300)  # the accordion's animation


@pytest.mark.parametrize("dag_id", DAG_IDS)
def test_trigger_form_opens_without_errors_and_can_trigger(page, airflow, dag_id, tmp_path):
    dialog, form = open_trigger_form(page, airflow, dag_id)
    found = sections(form)
    assert "Advanced Options" in found
    if dag_id == "lora_finetune":
        assert [s for s in found if s != "Advanced Options"] == FINETUNE_SECTIONS
    problems = []
    for title, item in found.items():
        if section_errors(item):
            problems.append(f"section {title!r} is marked in error")
        if title == "Advanced Options":
            continue
        open_section(page, item)
        for field in item.locator("input[required]").all():
            if field.is_visible() and not field.input_value().strip():
                problems.append(f"{title}: required field {field.get_attribute('name')} is empty")
        page.screenshot(path=tmp_path / f"{dag_id}-{title.replace(' ', '_')}.png")
    assert problems == []
    assert dialog.get_by_role("button", name="Trigger").is_enabled()


def test_negative_rank_is_refused_with_a_message(page, airflow, tmp_path):
    before = len(airflow.runs("lora_finetune"))
    dialog, form = open_trigger_form(page, airflow, "lora_finetune")
    training = sections(form)["Training"]
    open_section(page, training)
    # the number field does not take a rank below its minimum: it falls back to the minimum when left
    tune_rank = training.locator("input[name=element_tune_rank]")
    tune_rank.fill("-3")
    tune_rank.press("Tab")
    assert tune_rank.input_value() == "1"
    # the ranks list (a JSON editor): -1 goes to the server, which refuses the run and says why
    ranks = training.locator('[role="group"]').filter(has=page.locator("label", has_text="Ranks to distill"))
    ranks.locator(".view-lines span span", has_text="1").last.dblclick()
    page.keyboard.insert_text("-1")
    assert json.loads(ranks.locator(".view-lines").inner_text().replace("\u00a0", " ")) == [-1]
    dialog.get_by_role("button", name="Trigger").click()
    message = dialog.get_by_text("Invalid input for param ranks")
    message.wait_for()
    assert "-1 is less than the minimum of 1" in dialog.inner_text()
    message.scroll_into_view_if_needed()
    page.screenshot(path=tmp_path / "negative-rank.png")
    assert len(airflow.runs("lora_finetune")) == before  # no run was created


def test_defaults_trigger_a_run_that_registers_a_version(page, airflow, mlflow_server, tmp_path):  # noqa: F811
    dialog, form = open_trigger_form(page, airflow, "lora_finetune")
    data = sections(form)["Data and model"]
    open_section(page, data)
    assert data.locator("input[name=element_dataset_uri]").input_value() == f"s3://{BUCKET}/datasets/ring/"
    assert data.locator("input[name=element_model_name]").input_value() == MODEL
    page.screenshot(path=tmp_path / "finetune-form.png")
    # a paused DAG's dialog offers "Unpause lora_finetune on trigger", checked; the refused trigger above unpaused it
    unpause = dialog.get_by_text("Unpause lora_finetune on trigger")
    assert unpause.count() == 0 or dialog.get_by_role("checkbox").is_checked()
    before = {r["dag_run_id"] for r in airflow.runs("lora_finetune")}
    dialog.get_by_role("button", name="Trigger").click()
    dialog.wait_for(state="hidden")
    assert airflow.api("GET", "/api/v2/dags/lora_finetune")["is_paused"] is False
    (run,) = [r for r in airflow.runs("lora_finetune") if r["dag_run_id"] not in before]
    assert run["run_type"] == "manual" and run["conf"]["model_name"] == MODEL

    done = airflow.wait_for_run("lora_finetune", run["dag_run_id"], timeout=600)
    assert done["state"] == "success"
    states = {
        (t["task_id"], t["map_index"]): t["state"] for t in airflow.task_instances("lora_finetune", run["dag_run_id"])
    }
    assert states[("register", -1)] == "success" and states[("finish_failed", -1)] == "skipped", states
    # the run page in the UI says so too
    page.goto(f"{airflow.url}/dags/lora_finetune/runs/{run['dag_run_id']}")
    page.get_by_text("success").first.wait_for()
    page.screenshot(path=tmp_path / "finetune-run.png")
    mv, _champion = demo_pipeline.registered_version(MODEL, run["dag_run_id"], mlflow_server.url)
    assert mv.tags["airflow_run_id"] == run["dag_run_id"] and "champion" in mv.aliases
