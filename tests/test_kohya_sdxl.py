"""kohya's SDXL layout (the one A1111, ComfyUI, Forge and most shared SDXL LoRAs use): UNet modules named in the
original (sgm) block layout, `lora_te1_` / `lora_te2_` text encoders. Checked against diffusers' own kohya SDXL
loader, on the full-size SDXL layout (names) and on the tiny SDXL (the same image)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from diffusers.loaders.lora_conversion_utils import (
    _convert_non_diffusers_lora_to_diffusers,
    _maybe_map_sgm_blocks_to_diffusers,
)
from surgery_utils import random_module
from torch import nn

from lora_ops import add_to_pipeline, load_pipeline
from lora_ops.cli import main as cli
from lora_ops.convert import convert_kohya_to_native, convert_native_to_kohya, is_sdxl_kohya, kohya_name
from lora_ops.formats import module_names, read_any, sdxl_skeletons, write_any
from lora_ops.lora_file import LoraFile, LoraModule, read_safetensors
from lora_ops.targets import canonical_name, get_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# keys as they appear in SDXL LoRAs trained with kohya's sd-scripts (SDXL 1.0: layers_per_block=2)
KNOWN = {
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "down_blocks.2.attentions.1.proj_in": "lora_unet_input_blocks_8_1_proj_in",
    "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj": "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj",
    "up_blocks.0.attentions.2.transformer_blocks.3.attn2.to_out.0": "lora_unet_output_blocks_2_1_transformer_blocks_3_attn2_to_out_0",
    "up_blocks.1.attentions.0.proj_out": "lora_unet_output_blocks_3_1_proj_out",
    "down_blocks.0.resnets.1.conv1": "lora_unet_input_blocks_2_0_in_layers_2",
    "down_blocks.1.resnets.0.conv_shortcut": "lora_unet_input_blocks_4_0_skip_connection",
    "down_blocks.0.downsamplers.0.conv": "lora_unet_input_blocks_3_0_op",
    "mid_block.resnets.1.time_emb_proj": "lora_unet_middle_block_2_emb_layers_1",
    "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
    "up_blocks.2.resnets.2.conv2": "lora_unet_output_blocks_8_0_out_layers_3",
}


def _layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _diffusers_module(key: str) -> str:
    """A key of diffusers' kohya conversion -> the module it targets (its older attention-processor spelling)."""
    name = key.split(".", 1)[1].replace(".processor.", ".")
    name = re.sub(r"\.?_?lora\.(down|up)\.weight$", "", name)
    return name + ".0" if name.endswith("to_out") else name


def test_every_full_size_sdxl_unet_layer_gets_the_name_diffusers_maps_back():
    models = sdxl_skeletons()
    config = models["unet"].config
    for name, key in KNOWN.items():
        assert kohya_name("unet", name, config) == key
    names = _layers(models["unet"])
    assert len(names) > 700
    keys = {kohya_name("unet", n, config): n for n in names}
    assert len(keys) == len(names)  # one sgm name per layer
    state = {}
    for key in keys:
        state[f"{key}.lora_down.weight"] = torch.zeros(1)
        state[f"{key}.lora_up.weight"] = torch.zeros(1)
    assert is_sdxl_kohya(state)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(dict(state), config))
    assert {_diffusers_module(k) for k in converted} == set(names)
    # and ours inverts the names exactly, the text encoders' included
    te2 = "text_model.encoder.layers.31.mlp.fc2"
    assert kohya_name("text_encoder_2", te2, config) == "lora_te2_text_model_encoder_layers_31_mlp_fc2"
    assert kohya_name("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", config).startswith("lora_te1_")


def _random_lora(models: dict, r: int = 2, seed: int = 0) -> LoraFile:
    """Random factors on every layer of the UNet (convs included) and the attention of both text encoders."""
    g = torch.Generator().manual_seed(seed)
    lora = LoraFile(metadata={"base_model": "tiny-sdxl"})
    wanted = {
        "unet": _layers(models["unet"]),
        "text_encoder": [n for n in _layers(models["text_encoder"]) if "self_attn" in n],
        "text_encoder_2": [n for n in _layers(models["text_encoder_2"]) if "self_attn" in n or "fc1" in n],
    }
    for comp, names in wanted.items():
        for name in names:
            lora.component(comp)[canonical_name(comp, name)] = random_module(get_module(models[comp], name), r, g)
    return lora


def _run(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np", generator=g).images


def test_kohya_sdxl_file_loads_in_diffusers_to_the_same_image(tiny_sdxl_model, tmp_path):
    ours = load_pipeline(tiny_sdxl_model)
    lora = _random_lora({"unet": ours.unet, "text_encoder": ours.text_encoder, "text_encoder_2": ours.text_encoder_2})
    path = write_any(tmp_path / "k.safetensors", lora, "kohya", base=tiny_sdxl_model)
    tensors, meta = read_safetensors(path)
    assert meta["ss_network_module"] == "networks.lora"
    assert "lora_unet_input_blocks_2_0_op.lora_down.weight" in tensors  # tiny: layers_per_block=1
    assert "lora_unet_output_blocks_1_2_conv.lora_up.weight" in tensors
    assert any(k.startswith("lora_te1_") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    assert not any(k.startswith(("lora_unet_down_blocks", "lora_te_")) for k in tensors)
    assert add_to_pipeline(ours, lora) == len(lora.unet) + len(lora.text_encoder) + len(lora.text_encoder_2)
    expected = _run(ours)
    theirs = load_pipeline(tiny_sdxl_model)
    theirs.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    np.testing.assert_allclose(_run(theirs), expected, atol=1e-4)
    assert np.abs(_run(load_pipeline(tiny_sdxl_model)) - expected).max() > 1e-3  # the LoRA changes the image

    back = read_any(path, base=tiny_sdxl_model)
    assert back.metadata["source_format"] == "kohya"
    for comp in ("unet", "text_encoder", "text_encoder_2"):
        assert sorted(back.component(comp)) == sorted(lora.component(comp))
        for name, mod in lora.component(comp).items():
            assert torch.equal(back.component(comp)[name].lora_A, mod.lora_A), name
            assert torch.equal(back.component(comp)[name].lora_B, mod.lora_B), name


def test_diffusers_named_sdxl_kohya_keys_are_read_too(tiny_sdxl_model):
    """Some SDXL trainers write `lora_unet_down_blocks_…` with `lora_te1_`: diffusers and ComfyUI read those."""
    models = sdxl_skeletons()
    names = {"unet": _layers(models["unet"])[:40], "text_encoder": [], "text_encoder_2": []}
    native = {}
    for name in names["unet"]:
        native[f"unet.{name}.lora_A.weight"] = torch.ones(1, 1)
        native[f"unet.{name}.lora_B.weight"] = torch.ones(1, 1)
    kohya = convert_native_to_kohya(native)  # the SD 1.x spelling
    kohya["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"] = torch.ones(1, 1)
    kohya["lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"] = torch.ones(1, 1)
    back = convert_kohya_to_native(kohya, module_names(models), models["unet"].config)
    assert {k.rsplit(".lora_", 1)[0] for k in back} == {f"unet.{n}" for n in names["unet"]} | {
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"
    }


def test_sdxl_1_0_kohya_files_are_read_and_written_without_a_base(tmp_path):
    """Without a base, an SDXL kohya file is read against SDXL 1.0's layout (its factors must fit it)."""
    models = sdxl_skeletons()
    g = torch.Generator().manual_seed(0)
    lora = LoraFile()
    for name in KNOWN:
        lora.unet[name] = random_module(get_module(models["unet"], name), 2, g, scale=1.0)
    lora.text_encoder_2["text_model.encoder.layers.3.self_attn.k_proj"] = LoraModule(
        torch.randn(2, 1280, generator=g), torch.randn(1280, 2, generator=g)
    )
    path = write_any(tmp_path / "xl.safetensors", lora, "kohya")
    tensors, _ = read_safetensors(path)
    assert {k.split(".")[0] for k in tensors} == set(KNOWN.values()) | {
        "lora_te2_text_model_encoder_layers_3_self_attn_k_proj"
    }
    back = read_any(path)
    assert sorted(back.unet) == sorted(lora.unet) and sorted(back.text_encoder_2) == sorted(lora.text_encoder_2)
    for name, mod in lora.unet.items():
        assert torch.equal(back.unet[name].lora_B, mod.lora_B), name


def test_sdxl_kohya_misfits_are_refused_naming_what_to_do(tiny_sdxl_model, tiny_model, tmp_path):
    pipe = load_pipeline(tiny_sdxl_model)
    lora = _random_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2})
    path = write_any(tmp_path / "tiny-xl.safetensors", lora, "kohya", base=tiny_sdxl_model)
    # the tiny SDXL's blocks are not SDXL 1.0's: without its base the file cannot be placed
    with pytest.raises(ValueError, match="SDXL 1.0.*--base"):
        read_any(path)
    with pytest.raises(ValueError, match="SDXL 1.0.*--base"):
        write_any(tmp_path / "no-base.safetensors", lora, "kohya")
    assert not (tmp_path / "no-base.safetensors").exists()
    with pytest.raises(ValueError, match="for SDXL"):
        read_any(path, base=tiny_model)  # an SD 1.x base


def test_cli_converts_sdxl_loras_to_kohya_and_back(tiny_sdxl_model, tmp_path, capsys):
    pipe = load_pipeline(tiny_sdxl_model)
    lora = _random_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2})
    native = write_any(tmp_path / "in.safetensors", lora, "native")
    kohya = tmp_path / "out-kohya.safetensors"
    args = ["convert", str(native), str(kohya), "--to", "kohya", "--base", str(tiny_sdxl_model)]
    assert cli(args) == 0
    assert cli(["inspect", str(kohya), "--base", str(tiny_sdxl_model)]) == 0
    out = capsys.readouterr().out
    assert "kohya" in out and f"text_encoder_2 {len(lora.text_encoder_2)}" in out
    back = tmp_path / "back"
    assert cli(["convert", str(kohya), str(back), "--to", "diffusers", "--base", str(tiny_sdxl_model)]) == 0
    theirs = load_pipeline(tiny_sdxl_model)
    theirs.load_lora_weights(str(back))
    add_to_pipeline(pipe, lora)
    np.testing.assert_allclose(_run(theirs), _run(pipe), atol=1e-4)


def test_a_diffusers_file_of_the_second_text_encoder_alone_is_detected():
    from lora_ops.formats import detect_format

    only_te2 = {"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1, 48)}
    assert detect_format(only_te2) == "diffusers"
