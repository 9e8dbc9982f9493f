"""Helpers shared by the training tests: folders of random images and small DreamBooth and PTI configs."""

from __future__ import annotations

import shutil

import numpy as np
import torch
from PIL import Image

from lora_ops.training.config import DreamBoothConfig, PTIConfig


def random_images(folder, sizes, seed: int = 1, stem: str = "img"):
    """Random RGB images `<stem><i>.png` of the given (h, w) in `folder` (created); returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{stem}{i}.png")
    return folder


def _quiet_run(model, data, out) -> dict:
    """What every small training config of the tests shares: paths, 32 px, seed 0, no checkpoints or samples."""
    return dict(pretrained_model_name_or_path=str(model), instance_data_dir=str(data), output_dir=str(out),
                resolution=32, save_steps=1000, seed=0, progress=False, eval_noises=0)  # fmt: skip


def dreambooth_config(model, data, out, **kw) -> DreamBoothConfig:
    """A few quiet DreamBooth steps at 32 px on `model`; `kw` overrides any option."""
    base = dict(_quiet_run(model, data, out), instance_prompt="a photo of sks dog", max_train_steps=3)
    return DreamBoothConfig(**{**base, **kw})


def pti_config(model, data, out, **kw) -> PTIConfig:
    """Two quiet inversion and two LoRA steps at 32 px on `model`, tokens <s1>|<s2>; `kw` overrides any option."""
    base = dict(_quiet_run(model, data, out), use_template="object", placeholder_tokens="<s1>|<s2>",
                max_train_steps_ti=2, max_train_steps_tuning=2)  # fmt: skip
    return PTIConfig(**{**base, **kw})


class Stop(Exception):
    """Raised from a training callback to stand for a crash."""


def assert_resume_is_exact(make_config, tmp_path, stop_at: int = 3, train=None) -> dict:
    """Train uninterrupted, then crash at step `stop_at`, resume from the checkpoints in a fresh folder, and
    assert both LoRAs are bit-identical. `make_config(out, **kw)` builds the config, `train(config, callback=)`
    trains (default: DreamBooth); returns the tensors."""
    from lora_ops.lora_file import read_safetensors
    from lora_ops.training.dreambooth import train_dreambooth

    train_dreambooth = train or train_dreambooth
    full = train_dreambooth(make_config(tmp_path / "full"))

    def crash(step, metrics):
        if step == stop_at:
            raise Stop

    try:
        train_dreambooth(make_config(tmp_path / "part"), callback=crash)
    except Stop:
        pass
    else:
        raise AssertionError(f"the run did not reach step {stop_at}")
    shutil.copytree(tmp_path / "part" / "checkpoints", tmp_path / "retry" / "checkpoints")
    resumed = train_dreambooth(make_config(tmp_path / "retry", resume="auto"))
    a, b = read_safetensors(full.path)[0], read_safetensors(resumed.path)[0]
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    return a


def benchmark_module(name: str):
    """benchmarks/<name>.py as a module (registered in sys.modules, as its dataclasses need)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
