"""`add upl-ckpt`: the single-file checkpoint loads back through diffusers' from_single_file (offline, local
config) and gives the image of the merged model; the tokens travel as an A1111 embedding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from surgery_utils import random_lora, run_pipe

from lora_ops import load_pipeline, save_lora
from lora_ops.cli import main as cli
from lora_ops.merge import add_to_pipeline
from lora_ops.single_file import save_single_file


def _from_single_file(path, config):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        str(path), config=str(config), local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_upl_ckpt_loads_back_with_from_single_file(tiny_model, tmp_path):
    pipe = load_pipeline(tiny_model)
    lora = random_lora(pipe, seed=21, r=4, unet="unet-extended")  # attention, resnet convs, text encoder, tokens
    base_image = run_pipe(pipe)
    save_lora(tmp_path / "l.safetensors", lora)
    ckpt = tmp_path / "out" / "merged.safetensors"
    assert (
        cli(
            [
                "add",
                "upl-ckpt",
                str(tmp_path / "l.safetensors"),
                "--base",
                str(tiny_model),
                "--alpha",
                "0.8",
                "--out",
                str(ckpt),
            ]
        )
        == 0
    )
    emb = tmp_path / "out" / "s1s2.safetensors"
    assert load_file(emb)["emb_params"].shape == (2, 32)
    keys = load_file(ckpt)
    assert any(k.startswith("model.diffusion_model.input_blocks.1.0.in_layers.2") for k in keys)
    assert any(k.startswith("first_stage_model.encoder.mid.attn_1.q") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.text_model.encoder.layers.0") for k in keys)

    merged = load_pipeline(tiny_model)
    add_to_pipeline(merged, lora, 0.8, 0.8)  # tokens added to the tokenizer, in memory
    expected = run_pipe(merged)
    assert np.abs(expected - base_image).max() > 1e-3
    loaded = _from_single_file(ckpt, tiny_model)
    # A1111 style: the trigger word stands for the token sequence <s1><s2>
    loaded.load_textual_inversion(str(emb), token="s1s2")
    np.testing.assert_allclose(run_pipe(loaded, "a photo of s1s2 on the beach"), expected, atol=1e-5)


def test_ckpt_on_request_and_bad_input(tiny_model, tmp_path):
    pipe = load_pipeline(tiny_model)
    path = save_single_file(pipe, tmp_path / "m.ckpt", half=True)
    state = torch.load(path, weights_only=True)["state_dict"]  # plain tensors only
    assert state["model.diffusion_model.out.2.weight"].dtype == torch.float16
    safet = load_file(save_single_file(pipe, tmp_path / "m.safetensors"))
    assert state.keys() == safet.keys()
    with pytest.raises(ValueError, match="must end in .safetensors or .ckpt"):
        save_single_file(pipe, tmp_path / "m.bin")
    lora = random_lora(pipe, seed=1, tokens=False)
    lora.unet["no.such.module"] = next(iter(lora.unet.values()))
    with pytest.raises(ValueError, match="no module 'no.such.module'"):
        add_to_pipeline(pipe, lora)
