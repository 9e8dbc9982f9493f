"""Exact resume: a run stopped at step k and resumed ends with bit-identical weights; atomic checkpoints."""

from __future__ import annotations

import shutil

import pytest
import torch
from train_utils import Stop, pti_config, random_images

from lora_ops.lora_file import read_safetensors
from lora_ops.training.checkpoints import list_checkpoints, load_checkpoint, resolve_resume
from lora_ops.training.pti import train_pti

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_images(folder):
    return random_images(folder, [(40, 40)] * 3, seed=0)


def config(tiny_model, data, out, **kw):
    base = dict(
        max_train_steps_ti=4,
        max_train_steps_tuning=4,
        learning_rate_ti=1e-2,
        learning_rate_unet=1e-2,
        save_steps=2,
        seed=3,
        horizontal_flip=True,  # augmentation on: latents per step, generator state matters
        train_text_encoder=True,
        continue_inversion=True,
        lr_scheduler="linear",
        lr_scheduler_lora="cosine",
    )
    return pti_config(tiny_model, data, out, **{**base, **kw})


@pytest.mark.parametrize("stop_at", [3, 7])  # inside phase 1, inside phase 2
def test_stop_and_resume_is_bit_identical(tiny_model, tmp_path, stop_at):
    data = make_images(tmp_path / "data")
    full = train_pti(config(tiny_model, data, tmp_path / "full"))

    def crash(step, metrics):
        if step == stop_at:
            raise Stop

    with pytest.raises(Stop):
        train_pti(config(tiny_model, data, tmp_path / "part"), callback=crash)
    latest = resolve_resume("auto", tmp_path / "part")
    assert latest.name == ("inversion-000002" if stop_at == 3 else "tuning-000002")
    # a retried pipeline step gets the checkpoint and the images in new folders: paths may change
    shutil.copytree(tmp_path / "part" / "checkpoints", tmp_path / "retry" / "checkpoints")
    shutil.copytree(data, tmp_path / "data-again")
    resumed = train_pti(config(tiny_model, tmp_path / "data-again", tmp_path / "retry", resume="auto"))

    a, _ = read_safetensors(full.path)
    b, meta = read_safetensors(resumed.path)
    assert sorted(a) == sorted(b)
    assert any(k.startswith("unet.") for k in a) and any(k.startswith("text_encoder.") for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the resumed run wrote the remaining checkpoints only
    assert [p.name for p in resumed.checkpoints][-1] == "tuning-000004"
    assert "training_config" in meta


def test_checkpoint_contents_and_atomicity(tiny_model, tmp_path):
    data = make_images(tmp_path / "data")
    out = tmp_path / "out"
    (out / "checkpoints" / ".tmp-tuning-000009-deadbeef").mkdir(parents=True)  # a torn write
    result = train_pti(config(tiny_model, data, out, perform_tuning=False, max_train_steps_ti=2))
    names = [p.name for p in list_checkpoints(out)]
    assert names == ["inversion-000002"]  # the temporary folder is never picked up
    assert resolve_resume("auto", out).name == "inversion-000002"
    state = load_checkpoint(out / "checkpoints" / "inversion-000002")
    assert state["step"] == 2 and state["phase"] == "inversion"
    assert set(state) >= {"params", "optimizer", "lr_scheduler", "rng", "generators", "samplers"}
    assert set(state["rng"]) >= {"torch", "python", "numpy"}
    assert result.checkpoints == [out / "checkpoints" / "inversion-000002"]

    # resuming with a changed option is refused, naming it
    with pytest.raises(ValueError, match="learning_rate_ti"):
        train_pti(
            config(
                tiny_model, data, out, perform_tuning=False, max_train_steps_ti=3, learning_rate_ti=0.5, resume="auto"
            )
        )
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path), out)
