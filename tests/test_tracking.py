"""A step's MLflow run against a real MLflow server: how it ends, and what the trainers' callback logs."""

from __future__ import annotations

import os

import pytest
from lora_pipeline.steps.tracking import NullTracker, start_step


def _run(client, tracker):
    return client.get_run(tracker.run_id)


def test_a_step_run_ends_failed_when_an_exception_passes_and_finished_otherwise(stack_env):  # noqa: F811
    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    with start_step("tune", "tracking-ok", params={"rank": 4}) as tracker:
        callback = tracker.loss_callback(every=2)
        for step in range(1, 5):
            callback(step, {"loss": 1.0 / step, "lr": 1e-3, "phase": "tuning", "note": "not a number"})
    run = _run(client, tracker)
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(tracker.run_id, "tuning/loss")
    assert [(m.step, m.value) for m in history] == [(2, 0.5), (4, 0.25)]  # every 2nd step, named by phase
    assert "tuning/note" not in run.data.metrics

    with pytest.raises(KeyboardInterrupt), start_step("tune", "tracking-killed") as tracker:
        raise KeyboardInterrupt  # what a kill looks like inside the step
    assert _run(client, tracker).info.status == "FAILED"


def test_without_a_tracking_server_the_step_runs_untracked(monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with start_step("tune", "untracked") as tracker:
        tracker.loss_callback()(1, {"loss": 0.5})
    assert isinstance(tracker, NullTracker)
    assert "MLFLOW_TRACKING_URI is not set" in capsys.readouterr().err
