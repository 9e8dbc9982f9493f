"""DreamBooth LoRA on the tiny model: prior preservation with generated class images, text-encoder LoRA."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from train_utils import dreambooth_config, random_images

from lora_ops.batching import BatchSampler
from lora_ops.dataset import DatasetConfig, ImageDataset
from lora_ops.lora_file import load_lora
from lora_ops.training.batches import Source, build_batch
from lora_ops.training.dreambooth import train_dreambooth
from lora_ops.training.trainee import load_trainee

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_images(folder, n=2, size=32):
    return random_images(folder, [(size, size)] * n, stem="dog")


def test_prior_preservation_generates_class_images_and_trains(tiny_model, tmp_path):
    data = make_images(tmp_path / "instance")
    classes = tmp_path / "class"
    make_images(classes, n=1)  # one class image given, one more needed
    config = dreambooth_config(
        tiny_model,
        data,
        tmp_path / "out",
        with_prior_preservation=True,
        class_prompt="a photo of dog",
        class_data_dir=str(classes),
        num_class_images=2,
        class_inference_steps=2,
        sample_batch_size=2,
        train_text_encoder=True,
        eval_noises=1,
    )
    result = train_dreambooth(config)
    assert result.metrics["class_images_generated"] == 1
    generated = Image.open(classes / "class-00001.png")
    assert generated.size == (32, 32) and generated.mode == "RGB"
    assert sorted(p.name for p in classes.iterdir()) == ["class-00001.png", "dog0.png"]  # no temporary leftovers
    lora = load_lora(result.path)
    assert lora.unet and lora.text_encoder and not lora.tokens
    assert all(m.lora_B.abs().max() > 0 for m in lora.unet.values())
    saved = lora.metadata["training_config"]
    assert saved["trainer"] == "dreambooth" and saved["prior_loss_weight"] == 1.0
    assert np.isfinite(result.metrics["dreambooth/loss"])
    assert result.checkpoints[-1].name == "dreambooth-000003"
    # a second run finds enough class images and generates none
    again = train_dreambooth(
        dreambooth_config(
            tiny_model,
            data,
            tmp_path / "out2",
            with_prior_preservation=True,
            class_prompt="a photo of dog",
            class_data_dir=str(classes),
            num_class_images=2,
            max_train_steps=1,
        )
    )
    assert again.metrics["class_images_generated"] == 0


def test_prior_loss_weight_weights_the_class_half_of_each_batch(tiny_model, tmp_path):
    data, classes = make_images(tmp_path / "instance"), make_images(tmp_path / "class", n=3)
    config = dreambooth_config(tiny_model, data, tmp_path / "out", train_batch_size=2)
    trainee = load_trainee(config)
    sources = [
        Source(ImageDataset(DatasetConfig(data, 32, prompt="a photo of sks dog")), 1.0, BatchSampler(2, 2, 0)),
        Source(ImageDataset(DatasetConfig(classes, 32, prompt="a photo of dog")), 0.25, BatchSampler(3, 2, 1)),
    ]
    (batch,) = build_batch(trainee, sources, 2, torch.Generator(), torch.Generator())  # one size: one batch
    assert batch["latents"].shape == (4, 4, 16, 16)
    assert batch["prompts"] == ["a photo of sks dog"] * 2 + ["a photo of dog"] * 2
    # loss = mean(instance losses) + prior_loss_weight * mean(class losses)
    assert batch["sample_weights"].tolist() == [0.5, 0.5, 0.125, 0.125]


def test_dreambooth_validation(tiny_model, tmp_path):
    data = make_images(tmp_path / "instance")
    with pytest.raises(ValueError, match="instance_prompt is required"):
        dreambooth_config(tiny_model, data, tmp_path, instance_prompt="")
    with pytest.raises(ValueError, match="needs class_prompt"):
        dreambooth_config(tiny_model, data, tmp_path, with_prior_preservation=True, class_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="prior_loss_weight=-1"):
        dreambooth_config(tiny_model, data, tmp_path, prior_loss_weight=-1)
    with pytest.raises(ValueError, match="is a 'tuning' checkpoint|not a complete checkpoint"):
        train_dreambooth(dreambooth_config(tiny_model, data, tmp_path / "o", resume=str(tmp_path / "tuning-000001")))


def test_dreambooth_cli(tiny_model, tmp_path, capsys):
    from lora_ops.cli import main

    data = make_images(tmp_path / "instance")
    code = main([
        "train", "dreambooth", f"--pretrained_model_name_or_path={tiny_model}", f"--instance_data_dir={data}",
        f"--output_dir={tmp_path / 'out'}", "--instance_prompt=a photo of sks dog", "--resolution=32",
        "--max_train_steps=2", "--lora_rank=2", "--progress=false", "--eval_noises=0", "--out_name=dog",
    ])  # fmt: skip
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["path"].endswith("dog.safetensors")
    lora = load_lora(report["path"])
    assert lora.unet and all(m.r == 2 for m in lora.unet.values())
    assert lora.metadata["training_config"]["instance_prompt"] == "a photo of sks dog"
