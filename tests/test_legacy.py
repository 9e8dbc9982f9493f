"""The original lora_diffusion format: the published disney file onto SD 1.5 shapes, write/read round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from surgery_utils import random_lora

from lora_ops import load_pipeline
from lora_ops.cli import main as cli
from lora_ops.diffusers_export import export_diffusers
from lora_ops.formats import read_any, read_raw, write_any
from lora_ops.legacy import legacy_module_names, write_legacy
from lora_ops.tiny import _ARCH_CONFIGS

DISNEY = Path(__file__).parent / "data" / "lora_disney.safetensors"


def _sd15_modules() -> dict:
    """An SD 1.5-shaped UNet and CLIP text encoder (meta device) from the configs of make_tiny_model(arch="sd15")."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = _ARCH_CONFIGS["sd15"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text"]))
    return {"unet": unet, "text_encoder": text_encoder}


def _materialize(module: torch.nn.Module) -> None:
    """Real zero storage for a meta module: its output is then exactly the LoRA's contribution."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.zero_()


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory):
    """A folder with only the SD 1.5 configs: enough for `--base` (modules are built on the meta device)."""
    models = _sd15_modules()
    path = tmp_path_factory.mktemp("sd15")
    models["unet"].save_config(path / "unet")
    models["text_encoder"].config.save_pretrained(path / "text_encoder")
    return path


def test_disney_maps_onto_sd15_every_tensor_and_token():
    models = _sd15_modules()
    lora = read_any(DISNEY, base=models)  # checks every module's shape against the model
    assert (len(lora.unet), len(lora.text_encoder)) == (144, 48)
    assert sorted(lora.tokens) == ["<s1>", "<s2>"] and lora.tokens["<s1>"].shape == (768,)
    # every tensor of the file is placed, unchanged, at the module its index names
    names, _ = legacy_module_names(models, read_raw(DISNEY)[2], order=lora.metadata["legacy_order"])
    with safe_open(DISNEY, "pt") as f:
        keys = list(f.keys())
        placed = 0
        for key in keys:
            if key.startswith("<"):
                assert torch.equal(lora.tokens[key], f.get_tensor(key))
                placed += 1
                continue
            comp, i, part = key.split(":")
            mod = lora.component(comp)[names[comp][int(i)]]
            assert torch.equal(mod.lora_A if part == "down" else mod.lora_B, f.get_tensor(key))
            placed += 1
    assert placed == len(keys) == 386
    # the file predates diffusers' reordering of transformer blocks: GEGLU comes right after attn1
    assert lora.metadata["legacy_order"] == "ff-before-attn2"
    assert names["unet"][4].endswith("transformer_blocks.0.ff.net.0.proj")


def test_disney_as_diffusers_changes_outputs_as_up_at_down(tmp_path):
    """Converted to diffusers format, the file loads with pipe.load_lora_weights onto SD 1.5 shapes and every
    LoRA'd layer's output changes by exactly x (up @ down)ᵀ. Only the targeted UNet layers get storage (the
    rest of the 860M-parameter UNet stays on the meta device); the text encoder is materialized whole."""
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from lora_ops.tiny import write_byte_level_tokenizer

    models = _sd15_modules()
    lora = read_any(DISNEY, base=models)
    for name in lora.unet:
        _materialize(models["unet"].get_submodule(name))
    _materialize(models["text_encoder"])
    paths = export_diffusers(lora, tmp_path / "disney")
    write_byte_level_tokenizer(tmp_path / "tok", 49408)
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=models["text_encoder"],
        tokenizer=CLIPTokenizer.from_pretrained(tmp_path / "tok"),
        unet=models["unet"],
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.load_lora_weights(str(tmp_path / "disney"))
    gen = torch.Generator().manual_seed(0)
    checked = 0
    with torch.no_grad():
        for comp in ("unet", "text_encoder"):
            for name, mod in lora.component(comp).items():
                layer = models[comp].get_submodule(name.removeprefix("text_model.") if comp == "text_encoder" else name)
                assert type(layer).__module__.startswith("peft"), name  # diffusers placed a LoRA layer here
                x = torch.randn(2, mod.in_features, generator=gen)
                expected = x.double() @ (mod.lora_B.double() @ mod.lora_A.double()).T  # base weights are zero
                got = layer(x).double()
                assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), name
                checked += 1
    assert checked == 192
    # the tokens travel as one diffusers/A1111 embedding file each (loaded by load_textual_inversion in
    # test_formats); here: each file holds exactly the file's vector
    for token, vector in lora.tokens.items():
        assert torch.equal(load_file(paths[token])["emb_params"][0], vector)


def test_legacy_write_read_round_trip_on_tiny(tiny_model, tmp_path):
    pipe = load_pipeline(tiny_model)
    for preset in ("unet", "unet-extended"):
        lora = random_lora(pipe, seed=3, r=2, unet=preset)
        path = write_legacy(
            tmp_path / f"{preset}.safetensors", lora, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        )
        fmt, tensors, meta = read_raw(path)
        assert fmt == "lora_diffusion" and meta["<s1>"] == "<embed>" and "unet:0:up" in tensors
        back = read_any(path, base=pipe)
        assert back.metadata["legacy_order"] == "model"
        for key, value in lora.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key


def test_legacy_cli_convert_and_errors(sd15_dir, tmp_path, capsys):
    out = tmp_path / "disney_kohya.safetensors"
    assert cli(["convert", str(DISNEY), str(out), "--to", "kohya", "--base", str(sd15_dir)]) == 0
    kohya = read_any(out, base=sd15_dir)
    assert len(kohya.unet) == 144 and sorted(kohya.tokens) == ["<s1>", "<s2>"]
    # without a base, the format is named and the base asked for
    with pytest.raises(ValueError, match="detected lora_diffusion layout.*needs the base model"):
        read_any(DISNEY)
    # on a model of another shape, both orders are tried and the misfit named
    with pytest.raises(ValueError, match="does not fit the model in any traversal order"):
        read_any(DISNEY, base=_tiny_skeleton())
    assert cli(["convert", str(DISNEY), str(tmp_path / "x.safetensors"), "--to", "native"]) == 2
    assert "needs the base model" in capsys.readouterr().err


def _tiny_skeleton():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = _ARCH_CONFIGS["tiny"]
    with torch.device("meta"):
        return {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text"])),
        }


def test_legacy_write_needs_a_whole_preset(tiny_model, tmp_path):
    pipe = load_pipeline(tiny_model)
    lora = random_lora(pipe, seed=4, r=2, every=2, tokens=False)
    with pytest.raises(ValueError, match="numbers every module of its target classes"):
        write_any(tmp_path / "l.safetensors", lora, "lora_diffusion", base=pipe)
