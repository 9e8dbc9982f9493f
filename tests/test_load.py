"""Load check at CI scale: three concurrent `lora_finetune` runs through Airflow against one SeaweedFS and
one MLflow server (scripts/load_check.py runs more)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import demo_pipeline  # noqa: E402
import load_check  # noqa: E402

BUCKET = "lora-load"


@pytest.mark.slow
def test_three_concurrent_runs_complete_with_their_own_prefixes_and_one_version_each(stack_env, tmp_path):  # noqa: F811
    env = {
        **os.environ,
        **stack_env,
        "LORA_PIPELINE_BUCKET": BUCKET,
        "LORA_PIPELINE_CACHE": str(tmp_path / "cache"),
        "LORA_PIPELINE_EXECUTOR": "local",
        "LORA_PIPELINE_PYTHON": sys.executable,
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
        "OMP_NUM_THREADS": "1",  # three runs share the cores
    }
    inputs = demo_pipeline.prepare_inputs(tmp_path / "inputs", BUCKET)
    figures = load_check.load_check(3, env, inputs, tmp_path / "load", "load-ring")
    print(figures)
    assert figures["failures"] == {}, figures
    assert figures["succeeded"] == 3 and figures["versions"] == 3 and len(figures["champions"]) == 1
