"""Tiny models, target presets, injection checks, and the generate / make-tiny-model commands."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from lora_ops import LoraConfig, describe, inject_lora, load_pipeline, preset_targets, resolve_targets
from lora_ops.generate import GenerateConfig, LoraUse, generate
from lora_ops.tiny import build_models


@pytest.fixture(scope="module")
def sd15_meta():
    with torch.device("meta"):
        models = build_models("sd15")
        return models["unet"], models["text_encoder"]


def test_sd15_presets_match_the_original_projects_counts(sd15_meta):
    unet, text_encoder = sd15_meta
    attn = preset_targets(unet, "unet")
    # 16 transformer blocks x (attn1 + attn2) x (q, k, v, out) + 16 GEGLU projections, as lora_disney.safetensors
    assert len(attn) == 144
    assert attn[:9] == [
        f"down_blocks.0.attentions.0.transformer_blocks.0.{m}"
        for m in (
            "attn1.to_q",
            "attn1.to_k",
            "attn1.to_v",
            "attn1.to_out.0",
            "attn2.to_q",
            "attn2.to_k",
            "attn2.to_v",
            "attn2.to_out.0",
            "ff.net.0.proj",
        )
    ]
    assert len(preset_targets(text_encoder, "text_encoder")) == 48
    extended = preset_targets(unet, "unet-extended")
    assert set(attn) < set(extended)
    assert any(n.endswith("resnets.0.conv1") for n in extended)
    assert any(isinstance(unet.get_submodule(n), torch.nn.Conv2d) for n in extended)


def test_unknown_target_lists_close_matches(tiny_model):
    pipe = load_pipeline(tiny_model)
    with pytest.raises(ValueError, match=r"'attn1\.to_qq'.*close matches"):
        resolve_targets(pipe.unet, ["attn1.to_qq"])
    with pytest.raises(ValueError, match="not one of"):
        preset_targets(pipe.unet, "everything")


def test_explicit_targets_patterns_and_per_module_rank(tiny_model):
    pipe = load_pipeline(tiny_model)
    params = inject_lora(
        pipe.unet,
        LoraConfig(target_modules=["to_q", r".*attn2\.to_v"], r=4, rank_pattern={"attn2.to_v": 2}, lora_alpha=8),
    )
    layers = {n: m for n, m in pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert layers and all(n.endswith(("to_q", "attn2.to_v")) for n in layers)
    ranks = {n: m.r["default"] for n, m in layers.items()}
    assert {r for n, r in ranks.items() if n.endswith("to_v")} == {2}
    assert {r for n, r in ranks.items() if n.endswith("to_q")} == {4}
    assert all(p.requires_grad for p in params)
    trainable = {id(p) for p in pipe.unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in params}


def test_rank_larger_than_the_layer_is_refused(tiny_model):
    pipe = load_pipeline(tiny_model)
    with pytest.raises(ValueError, match=r"rank 64 .* exceeds min\(in, out\)"):
        inject_lora(pipe.text_encoder, LoraConfig(target_modules="text_encoder", r=64))


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"lora_alpha": float("nan")}, {"lora_dropout": 1.5}, {"init": "zeros"}])
def test_config_validation(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LoraConfig(**kwargs)


def test_make_tiny_model_cli_and_model_description(tmp_path):
    out = tmp_path / "inpaint"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_ops", "make-tiny-model", str(out), "--inpainting"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(out) in proc.stdout
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    pipe = load_pipeline(out, task="inpaint")
    info = describe(pipe)
    assert info.inpainting and pipe.unet.config.in_channels == 9


def test_text2img_model_refuses_the_inpaint_task(tiny_model):
    with pytest.raises(ValueError, match="needs an inpainting model"):
        load_pipeline(tiny_model, task="inpaint")


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        load_pipeline(tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        load_pipeline(tmp_path / "missing" / "deeper")


def test_sd21_shapes_and_v_prediction():
    from lora_ops.tiny import arch_config

    cfg = arch_config("sd21")
    assert cfg["prediction_type"] == "v_prediction"
    with torch.device("meta"):
        models = build_models("sd21")
    unet, text_encoder = models["unet"], models["text_encoder"]
    assert unet.config.cross_attention_dim == 1024
    assert text_encoder.get_input_embeddings().weight.shape == (49408, 1024)
    assert describe(unet).family == "sd2"


def test_lora_use_parsing():
    assert LoraUse.parse("a.safetensors") == LoraUse("a.safetensors", 1.0, 1.0)
    assert LoraUse.parse("dir:x/a.safetensors:0.5:0.25") == LoraUse("dir:x/a.safetensors", 0.5, 0.25)


def test_generate_img2img_and_inpaint(tiny_model, tiny_inpaint_model, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    Image.new("L", (32, 32), 255).save(mask)
    common = dict(prompts=["a photo"], steps=3, height=32, width=32, init_image=str(init))
    img = generate(GenerateConfig(model=str(tiny_model), task="img2img", **common))
    assert img[0].size == (32, 32)
    inp = generate(GenerateConfig(model=str(tiny_inpaint_model), task="inpaint", mask_image=str(mask), **common))
    assert inp[0].size == (32, 32)
    with pytest.raises(ValueError, match="needs init_image"):
        GenerateConfig(model=str(tiny_model), prompts=["x"], task="img2img")


def test_generate_cli_with_a_lora(tiny_model, tmp_path):
    from lora_ops import LoraFile, extract_lora, save_lora

    pipe = load_pipeline(tiny_model)
    inject_lora(pipe.unet, LoraConfig(target_modules="unet", r=2, init="random"))
    lora = save_lora(tmp_path / "l.safetensors", LoraFile(unet=extract_lora(pipe.unet, "unet")))
    out = tmp_path / "gen"
    cmd = [
        sys.executable,
        "-m",
        "lora_ops",
        "generate",
        "--model",
        str(tiny_model),
        "--prompt",
        "a photo",
        "--seed",
        "1",
        "--seed",
        "2",
        "--steps",
        "2",
        "--height",
        "32",
        "--width",
        "32",
        "--out",
        str(out),
    ]
    subprocess.run(cmd + ["--lora", f"{lora}:0.0"], check=True, capture_output=True)
    zero = [np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))]
    assert len(zero) == 2 and (out / "grid.png").is_file()
    subprocess.run(cmd + ["--lora", f"{lora}:1.0"], check=True, capture_output=True)
    one = [np.asarray(Image.open(p)) for p in sorted(out.glob("0*.png"))]
    assert any(np.abs(a.astype(int) - b.astype(int)).max() > 0 for a, b in zip(zero, one))
    bad = subprocess.run(cmd + ["--lora", str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing.safetensors: no such file" in bad.stderr
    assert "Traceback" not in bad.stderr
