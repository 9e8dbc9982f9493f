"""One-file checkpoints (`.safetensors` / `.ckpt` in the original layout, as community models are shared) as
base models: loading for every task, training, generating, and the errors when a file is not one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_ops import LoraFile, load_pipeline, patch_pipeline, save_lora
from lora_ops.cli import main as cli
from lora_ops.lora_file import read_safetensors
from lora_ops.models import source_is_sdxl
from lora_ops.single_file import save_single_file
from lora_ops.training.config import DreamBoothConfig
from lora_ops.training.dreambooth import train_dreambooth

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(pipe, prompt="a photo of sks dog"):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np", generator=g).images


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "community-model.safetensors"
    save_single_file(load_pipeline(tiny_model), path)
    return path


def test_a_one_file_checkpoint_loads_as_its_folder_does(checkpoint, tiny_model, tmp_path):
    folder = load_pipeline(tiny_model)
    single = load_pipeline(checkpoint, config=tiny_model)
    assert not source_is_sdxl(checkpoint)
    np.testing.assert_array_equal(_run(single), _run(folder))
    assert type(load_pipeline(checkpoint, "img2img", config=tiny_model)).__name__ == "StableDiffusionImg2ImgPipeline"
    ckpt = tmp_path / "model.ckpt"  # the older pickle form: {"state_dict": ...}, read with weights_only
    save_single_file(folder, ckpt)
    np.testing.assert_array_equal(_run(load_pipeline(ckpt, config=tiny_model)), _run(folder))


def test_training_and_generating_from_a_one_file_base(checkpoint, tiny_model, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"dog{i}.png")
    config = DreamBoothConfig(
        pretrained_model_name_or_path=str(checkpoint),
        single_file_config=str(tiny_model),
        instance_data_dir=str(data),
        output_dir=str(tmp_path / "out"),
        instance_prompt="a photo of sks dog",
        resolution=32,
        max_train_steps=3,
        learning_rate_unet=1e-2,
        seed=0,
        progress=False,
        eval_noises=0,
    )
    trained = train_dreambooth(config)
    assert read_safetensors(trained.path)[1]["base_model"] == str(checkpoint)
    # the LoRA's module names are the diffusers model's: it patches the folder form of the same model alike
    on_single = load_pipeline(checkpoint, config=tiny_model)
    on_folder = load_pipeline(tiny_model)
    patch_pipeline(on_single, trained.path)
    patch_pipeline(on_folder, trained.path)
    expected = _run(on_folder)
    np.testing.assert_allclose(_run(on_single), expected, atol=1e-6)
    assert np.abs(expected - _run(load_pipeline(tiny_model))).max() > 1e-4  # training changed something

    out = tmp_path / "g"
    args = ["generate", "--model", str(checkpoint), "--model-config", str(tiny_model), "--lora", str(trained.path)]
    args += ["--prompt", "a photo of sks dog", "--steps", "2", "--height", "32", "--width", "32", "--out", str(out)]
    assert cli(args) == 0
    assert (out / "grid.png").is_file()


def test_files_that_are_not_checkpoints_are_refused_by_name(checkpoint, tiny_model, tmp_path):
    lora = tmp_path / "a-lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(1, 1)}, lora)
    with pytest.raises(ValueError, match="not a one-file Stable Diffusion checkpoint .* A LoRA or an embedding"):
        load_pipeline(lora, config=tiny_model)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="broken.safetensors: not a readable safetensors file"):
        load_pipeline(broken, config=tiny_model)
    with pytest.raises(ValueError, match="missing.safetensors: no such checkpoint file"):
        load_pipeline(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load_pipeline(checkpoint, config=tmp_path)
    with pytest.raises(ValueError, match="config=.* is for one-file checkpoints"):
        load_pipeline(tiny_model, config=tiny_model)


def test_without_a_config_offline_the_error_says_what_to_pass(checkpoint, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"could not load the checkpoint .*pass config= \(--single_file_config\)"):
        load_pipeline(checkpoint)


def test_sdxl_one_file_checkpoints_round_trip_and_merge(tiny_sdxl_model, tmp_path):
    """SDXL in Stability's layout (conditioner.embedders.0 CLIP, .1 OpenCLIP with fused q/k/v): every tensor of
    diffusers' from_single_file is ours, and `add upl-ckpt` of an SDXL LoRA draws the merged model's image."""
    from safetensors.torch import load_file
    from surgery_utils import random_lora

    from lora_ops.merge import add_to_pipeline

    pipe = load_pipeline(tiny_sdxl_model)
    path = save_single_file(pipe, tmp_path / "xl.safetensors")
    keys = load_file(path)
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert source_is_sdxl(path)
    back = load_pipeline(path, config=tiny_sdxl_model)
    assert type(back).__name__ == "StableDiffusionXLPipeline"
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(pipe, name).state_dict(), getattr(back, name).state_dict()
        assert ours.keys() == theirs.keys(), name
        for key in ours:
            assert torch.equal(ours[key], theirs[key]), f"{name}.{key}"

    lora = random_lora(pipe, seed=3, r=2)  # with learned tokens: rows in both text encoders
    assert lora.text_encoder_2 and lora.tokens_2
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    ckpt = tmp_path / "merged.safetensors"
    args = ["add", "upl-ckpt", str(lora_path), "--base", str(tiny_sdxl_model), "--out", str(ckpt)]
    assert cli(args) == 0
    merged = load_pipeline(tiny_sdxl_model)
    add_to_pipeline(merged, lora)
    prompt = "a photo of <s1><s2> dog"
    expected = _run(merged, prompt)
    assert np.abs(expected - _run(pipe)).max() > 1e-4
    # the checkpoint plus its SDXL embedding (clip_l / clip_g), loaded the way diffusers documents it
    one_file = load_pipeline(ckpt, config=tiny_sdxl_model)
    embedding = load_file(tmp_path / "s1s2.safetensors")
    assert set(embedding) == {"clip_l", "clip_g"}
    for key, tok, te in (("clip_l", one_file.tokenizer, one_file.text_encoder),
                         ("clip_g", one_file.tokenizer_2, one_file.text_encoder_2)):  # fmt: skip
        one_file.load_textual_inversion(embedding[key], token=["<s1>", "<s2>"], text_encoder=te, tokenizer=tok)
    np.testing.assert_allclose(_run(one_file, prompt), expected, atol=1e-5)


def test_a_one_file_fine_tune_is_distilled_against_a_one_file_base(tiny_model, tmp_path):
    """kohya's "extract LoRA from models": both models as one-file checkpoints, through the CLI."""
    from surgery_utils import random_lora

    from lora_ops.lora_file import load_lora
    from lora_ops.merge import add_to_pipeline

    base = load_pipeline(tiny_model)
    lora = random_lora(base, seed=4, r=2, tokens=False)
    base_file = save_single_file(base, tmp_path / "base.safetensors")
    tuned = load_pipeline(tiny_model)
    add_to_pipeline(tuned, lora)
    tuned_file = save_single_file(tuned, tmp_path / "finetune.safetensors")
    out = tmp_path / "extracted.safetensors"
    args = ["distill", str(out), "--tuned", str(tuned_file), "--base", str(base_file), "--rank", "2"]
    assert cli([*args, "--model-config", str(tiny_model), "--clamp-quantile", "1"]) == 0
    got = load_lora(out)
    for comp in ("unet", "text_encoder"):
        assert sorted(got.component(comp)) == sorted(lora.component(comp)), comp
        for name, mod in lora.component(comp).items():
            torch.testing.assert_close(got.component(comp)[name].delta(), mod.delta(), atol=1e-5, rtol=1e-4)


def test_commands_that_take_a_base_take_a_one_file_checkpoint(checkpoint, tiny_model, tmp_path, capsys):
    """`add upl-ckpt` (a LoRA into a community checkpoint), `add upl` and `convert --base` with --model-config."""
    from surgery_utils import random_lora

    from lora_ops.merge import add_to_pipeline

    lora = random_lora(load_pipeline(tiny_model), seed=6, r=2)
    lora_path = save_lora(tmp_path / "l.safetensors", lora)
    base = ["--base", str(checkpoint), "--model-config", str(tiny_model)]
    merged = load_pipeline(tiny_model)
    add_to_pipeline(merged, lora)
    expected = _run(merged, "a photo of <s1><s2> dog")
    out = tmp_path / "merged.safetensors"
    assert cli(["add", "upl-ckpt", str(lora_path), *base, "--out", str(out)]) == 0
    again = load_pipeline(out, config=tiny_model)
    patch_pipeline(again, LoraFile(tokens=dict(lora.tokens)))  # the tokens travel as the embedding beside it
    np.testing.assert_allclose(_run(again, "a photo of <s1><s2> dog"), expected, atol=1e-5)
    assert cli(["add", "upl", str(lora_path), *base, "--out", str(tmp_path / "folder")]) == 0
    np.testing.assert_allclose(_run(load_pipeline(tmp_path / "folder"), "a photo of <s1><s2> dog"), expected, atol=1e-5)
    # the original project's format numbers modules in the base's order: the checkpoint's order is the folder's
    legacy = tmp_path / "legacy.safetensors"
    assert cli(["convert", str(lora_path), str(legacy), "--to", "lora_diffusion", *base]) == 0
    capsys.readouterr()
    back = tmp_path / "back.safetensors"
    assert cli(["convert", str(legacy), str(back), "--to", "native", "--base", str(tiny_model)]) == 0
    from lora_ops.lora_file import load_lora

    got = load_lora(back)
    assert sorted(got.unet) == sorted(lora.unet)
    capsys.readouterr()
    bad = ["convert", str(lora_path), str(tmp_path / "k.safetensors"), "--to", "kohya", "--base", str(tiny_model)]
    assert cli([*bad, "--model-config", "x"]) != 0
    assert "--model-config is for one-file checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "k.safetensors").exists()
