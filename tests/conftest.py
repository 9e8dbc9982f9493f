"""Shared fixtures: the tiny Stable Diffusion model, built once per test session."""

from __future__ import annotations

import os

import pytest

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
