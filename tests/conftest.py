"""Shared fixtures: the tiny Stable Diffusion model, built once per test session, and the real servers of the
local stack (SeaweedFS, MLflow: `lora_pipeline.devstack`), started once per session by the tests that need them."""

from __future__ import annotations

import os

import pytest

from lora_pipeline.devstack import start_mlflow, start_seaweedfs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Path of a tiny SD 1.x-style diffusers folder (random weights, CPU-sized)."""
    from lora_ops.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", arch="tiny")


@pytest.fixture(scope="session")
def tiny_inpaint_model(tmp_path_factory):
    """Path of a tiny inpainting model (9-channel UNet)."""
    from lora_ops.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-inpaint", arch="tiny", inpainting=True)


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory):
    """Path of a tiny SDXL diffusers folder: two text encoders, text-time UNet (random weights, CPU-sized)."""
    from lora_ops.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", arch="sdxl-tiny")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tiny models on one torch thread (faster than two for models this small); restored after.

    Use with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------
# pytest fixtures


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A SeaweedFS S3 server for the test session (its env: S3_ENDPOINT_URL and credentials)."""
    server = start_seaweedfs(tmp_path_factory.mktemp("seaweedfs") / "data")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """An MLflow tracking server (SQLite) whose artifacts live on `s3_server`."""
    server = start_mlflow(tmp_path_factory.mktemp("mlflow"), s3_server)
    yield server
    server.stop()


@pytest.fixture
def stack_env(s3_server, mlflow_server, monkeypatch):
    """Both servers, with this process's environment pointing at them (as a step's pod would see it)."""
    env = {
        **s3_server.env,
        **mlflow_server.env,
        "LORA_PIPELINE_S3_ATTEMPTS": "6",
        # fail fast in tests instead of MLflow's two-minute default retry budget
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
