"""Format conversions: exact round trips, diffusers' own loaders on our exports, refused and unknown input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from surgery_utils import random_lora, run_pipe

from lora_ops import load_lora, load_pipeline, patch_pipeline, remove_lora, save_lora
from lora_ops.cli import main as cli
from lora_ops.convert import (
    convert_diffusers_to_native,
    convert_kohya_to_native,
    convert_native_to_diffusers,
    convert_native_to_kohya,
)
from lora_ops.diffusers_export import export_diffusers
from lora_ops.formats import detect_format, model_skeletons, module_names, read_any, write_any


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


@pytest.fixture(scope="module")
def lora(pipe):
    """UNet attention + resnet convs (extended), text encoder, two tokens."""
    return random_lora(pipe, seed=1, r=4, unet="unet-extended")


def _same(sd_a, sd_b):
    assert sorted(sd_a) == sorted(sd_b)
    for key in sd_a:
        assert torch.equal(sd_a[key], sd_b[key]), key


def _our_image(pipe, lora, name: str, prompt: str | None = None):
    """The image of `pipe` patched with `lora` (adapter `name`, removed afterwards)."""
    patch_pipeline(pipe, lora, adapter_name=name)
    try:
        return run_pipe(pipe) if prompt is None else run_pipe(pipe, prompt)
    finally:
        remove_lora(pipe, name)


def test_native_kohya_native_is_exact_with_conv(lora):
    native = lora.state_dict()
    kohya = convert_native_to_kohya(native)
    assert any(k.endswith("resnets_0_conv1.lora_down.weight") for k in kohya)
    assert kohya["bundle_emb.<s1>.string_to_param.*"].shape == (1, 32)
    _same(convert_kohya_to_native(kohya), native)  # names rebuilt without a model


def test_kohya_alpha_is_folded_into_lora_B(lora):
    kohya = convert_native_to_kohya(lora.state_dict(), include_tokens=False)
    key = next(k for k in kohya if k.endswith(".alpha"))
    base = key[: -len(".alpha")]
    r = kohya[base + ".lora_down.weight"].shape[0]
    kohya[key] = torch.tensor(2.0 * r)  # scale 2
    native = convert_kohya_to_native(kohya)
    comp = "unet" if base.startswith("lora_unet_") else "text_encoder"
    name = next(k for k in native if k.endswith(".lora_B.weight") and kohya_base(k, comp) == base)
    assert torch.allclose(native[name], 2.0 * kohya[base + ".lora_up.weight"])


def kohya_base(native_key: str, comp: str) -> str:
    from lora_ops.convert import kohya_name

    return kohya_name(comp, native_key[len(comp) + 1 : -len(".lora_B.weight")])


def test_native_diffusers_native_is_exact(lora):
    native = lora.state_dict()
    diff = convert_native_to_diffusers(native)
    assert not any(k.startswith("token_embeddings.") for k in diff)
    back = convert_diffusers_to_native(diff)
    _same(back, {k: v for k, v in native.items() if not k.startswith("token_embeddings.")})


def test_diffusers_alpha_metadata_is_folded():
    a, b = torch.randn(2, 8), torch.randn(8, 2)
    sd = {"unet.x.to_q.lora_A.weight": a, "unet.x.to_q.lora_B.weight": b}
    meta = {
        "lora_adapter_metadata": '{"unet.r": 2, "unet.lora_alpha": 8, "unet.rank_pattern": {}, "unet.alpha_pattern": {}}'
    }
    out = convert_diffusers_to_native(sd, meta)
    assert torch.allclose(out["unet.x.to_q.lora_B.weight"], 4 * b)


def test_diffusers_loads_our_exports_same_image(tiny_model, pipe, lora, tmp_path):
    """diffusers' own loaders on our exports give the image of our native patching (same seed).

    kohya: diffusers' kohya conversion, UNet attention + resnet convs and text encoder.
    diffusers export: load_lora_weights + load_textual_inversion for each token.
    """
    base = run_pipe(pipe, "a photo")
    no_tokens = type(lora)(unet=lora.unet, text_encoder=lora.text_encoder, metadata=lora.metadata)
    path = write_any(tmp_path / "k.safetensors", no_tokens, "kohya")
    theirs = load_pipeline(tiny_model)
    theirs.load_lora_weights(str(path))
    ours = _our_image(pipe, no_tokens, "kohya", "a photo")
    assert np.abs(ours - base).max() > 1e-3  # the LoRA changes the image
    np.testing.assert_allclose(run_pipe(theirs, "a photo"), ours, atol=1e-5)

    theirs.unload_lora_weights()
    paths = export_diffusers(lora, tmp_path / "out")
    theirs.load_lora_weights(str(tmp_path / "out"))
    for token in lora.tokens:
        theirs.load_textual_inversion(str(paths[token]), token=token)
    ours = _our_image(pipe, lora, "full")
    np.testing.assert_allclose(run_pipe(theirs), ours, atol=1e-5)


def test_native_file_is_rejected_by_load_lora_weights(tiny_model, lora, tmp_path):
    save_lora(tmp_path / "n.safetensors", lora)
    with pytest.raises(Exception):  # noqa: B017 - documenting diffusers' behaviour, whatever it raises
        load_pipeline(tiny_model).load_lora_weights(str(tmp_path / "n.safetensors"))


def test_kohya_with_model_names_is_exact_and_checked(pipe, lora):
    names = module_names(model_skeletons(pipe))
    kohya = convert_native_to_kohya(lora.state_dict())
    _same(convert_kohya_to_native(kohya, names), lora.state_dict())
    kohya["lora_unet_not_a_module.lora_down.weight"] = torch.zeros(1, 2)
    kohya["lora_unet_not_a_module.lora_up.weight"] = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="lora_unet_not_a_module"):
        convert_kohya_to_native(kohya, names)


def test_read_any_every_format_round_trip(pipe, lora, tmp_path):
    for fmt in ("native", "kohya"):
        back = read_any(write_any(tmp_path / f"{fmt}.safetensors", lora, fmt), base=pipe)
        _same(back.state_dict(), lora.state_dict())
        assert back.metadata.get("source_format", "native") == fmt
    back = read_any(write_any(tmp_path / "d.safetensors", lora, "diffusers"))
    assert set(back.unet) == set(lora.unet) and not back.tokens
    emb = write_any(tmp_path / "e.safetensors", lora, "a1111_embedding")
    tokens = read_any(emb, token="<x>").tokens
    assert list(tokens) == ["<x>", "<x>_1"]
    assert torch.equal(tokens["<x>_1"], lora.tokens["<s2>"])


def test_a1111_pt_embedding_read_with_weights_only(tmp_path):
    rows = torch.randn(2, 32)
    torch.save(
        {"string_to_param": {"*": rows}, "string_to_token": {"*": 265}, "name": "cat", "step": 5}, tmp_path / "cat.pt"
    )
    lora = read_any(tmp_path / "cat.pt")
    assert list(lora.tokens) == ["<cat>", "<cat>_1"]
    save_file({"<dog>": rows}, tmp_path / "learned.safetensors")  # diffusers' save_textual_inversion layout
    assert torch.equal(read_any(tmp_path / "learned.safetensors").tokens["<dog>_1"], rows[1])
    assert torch.equal(lora.tokens["<cat>_1"], rows[1])
    # .pt -> safetensors through the CLI
    assert cli(["convert", str(tmp_path / "cat.pt"), str(tmp_path / "cat.safetensors"), "--to", "a1111_embedding"]) == 0
    assert torch.equal(read_any(tmp_path / "cat.safetensors", token="<cat>").tokens["<cat>"], rows[0])


class Payload:
    """Any class outside torch's allow-list: unpickling it would run code."""


def test_pickle_needing_code_is_refused(tmp_path, capsys):
    torch.save({"string_to_param": {"*": torch.zeros(1, 4)}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused: this pickle needs arbitrary code"):
        read_any(tmp_path / "evil.pt")
    assert cli(["inspect", str(tmp_path / "evil.pt")]) == 2
    assert "refused" in capsys.readouterr().err


def test_unknown_layouts_say_what_was_detected(tmp_path):
    save_file({"model.foo.weight": torch.zeros(2)}, tmp_path / "u.safetensors")
    with pytest.raises(ValueError, match=r"unknown key layout.*model\.foo\.weight"):
        read_any(tmp_path / "u.safetensors")
    kohya = {"lora_unet_a_b.hada_w1_a": torch.zeros(2, 2), "lora_unet_a_b.alpha": torch.tensor(1.0)}
    assert detect_format(kohya) == "kohya"
    with pytest.raises(ValueError, match=r"detected kohya layout.*hada_w1_a"):
        convert_kohya_to_native(kohya)
    with pytest.raises(ValueError, match=r"detected diffusers/PEFT layout.*unet\.x\.weird"):
        convert_diffusers_to_native({"unet.x.weird": torch.zeros(1)})
    sdxl = {
        "lora_te1_text_model_x.lora_down.weight": torch.zeros(1),
        "lora_te1_text_model_x.lora_up.weight": torch.zeros(1),
    }
    assert detect_format(sdxl) == "kohya"  # SDXL's layout (tests/test_kohya_sdxl.py)
    save_file(sdxl, tmp_path / "xl.safetensors")
    with pytest.raises(ValueError, match=r"lora_te1_text_model_x: no module .*SDXL 1\.0.*--base"):
        read_any(tmp_path / "xl.safetensors")


def test_convert_cli_native_to_kohya_to_native(lora, pipe, tmp_path):
    save_lora(tmp_path / "a.safetensors", lora)
    assert cli(["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    assert cli(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "b.safetensors"), "--to", "native"]) == 0
    _same(load_lora(tmp_path / "b.safetensors").state_dict(), lora.state_dict())


def test_convert_to_one_diffusers_file_keeps_the_tokens_beside_it(tiny_model, pipe, lora, tmp_path, capsys):
    """`convert --to diffusers out.safetensors` writes the tokens as `out.<token>.safetensors` (never drops them),
    and diffusers' loaders on those files give our image."""
    native = save_lora(tmp_path / "n.safetensors", lora)
    out = tmp_path / "exp" / "my.safetensors"
    assert cli(["convert", str(native), str(out), "--to", "diffusers"]) == 0
    printed = capsys.readouterr().out
    assert sorted(p.name for p in out.parent.iterdir()) == ["my.s1.safetensors", "my.s2.safetensors", "my.safetensors"]
    assert all(f"token {t}:" in printed for t in lora.tokens)
    theirs = load_pipeline(tiny_model)
    theirs.load_lora_weights(str(out.parent), weight_name=out.name)
    for token in lora.tokens:
        theirs.load_textual_inversion(str(out.parent / f"my.{token.strip('<>')}.safetensors"), token=token)
    ours = _our_image(pipe, lora, "one-file")
    np.testing.assert_allclose(run_pipe(theirs), ours, atol=1e-5)


@pytest.mark.parametrize("mode", ["bundle", "separate", "none"])
def test_kohya_token_modes(tiny_model, pipe, lora, tmp_path, capsys, mode):
    """--tokens bundle keeps A1111's bundle_emb keys (diffusers refuses the file); separate writes one A1111
    embedding per token that diffusers' kohya path + load_textual_inversion turn into our image; none drops them."""
    from safetensors import safe_open

    native = save_lora(tmp_path / "n.safetensors", lora)
    out = tmp_path / "k" / "comfy.safetensors"
    assert cli(["convert", str(native), str(out), "--to", "kohya", "--tokens", mode]) == 0
    capsys.readouterr()
    with safe_open(str(out), "pt") as f:
        bundled = [k for k in f.keys() if k.startswith("bundle_emb.")]  # noqa: SIM118 - safe_open is no dict
    files = sorted(p.name for p in out.parent.iterdir())
    theirs = load_pipeline(tiny_model)
    if mode == "bundle":
        assert len(bundled) == 2 and files == ["comfy.safetensors"]
        with pytest.raises(Exception):  # noqa: B017 - diffusers' own refusal, whatever it raises
            theirs.load_lora_weights(str(out))
        return
    assert not bundled
    if mode == "none":
        assert files == ["comfy.safetensors"]
        return
    assert files == ["comfy.s1.safetensors", "comfy.s2.safetensors", "comfy.safetensors"]
    theirs.load_lora_weights(str(out))
    for token in lora.tokens:
        theirs.load_textual_inversion(str(out.parent / f"comfy.{token.strip('<>')}.safetensors"), token=token)
    ours = _our_image(pipe, lora, "kohya-separate")
    np.testing.assert_allclose(run_pipe(theirs), ours, atol=1e-5)


def _randomize_lora_b(model, seed: int) -> None:
    """peft starts lora_B at zero; give it values so the adapter changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _ours_matches(pipe, lora, theirs_image, base_image):
    # the prompt has no learned tokens: earlier tests leave theirs in the shared pipeline's tokenizer
    ours = _our_image(pipe, lora, "peft-read", "a photo")
    assert np.abs(theirs_image - base_image).max() > 1e-3  # the adapter changes the image
    np.testing.assert_allclose(ours, theirs_image, atol=1e-5)


def test_peft_adapter_folders_read_as_peft_applies_them(tiny_model, pipe, tmp_path):
    """PeftModel.save_pretrained folders (one per component, and a single one) give peft's own image.

    The UNet adapter has a rank and an alpha pattern; the text encoder's uses rsLoRA (alpha / sqrt(r)).
    """
    from peft import LoraConfig, get_peft_model

    base_image = run_pipe(pipe, "a photo")
    theirs = load_pipeline(tiny_model)
    unet_cfg = LoraConfig(
        r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in"],
        rank_pattern={"attn2.to_k": 2}, alpha_pattern={"attn2.to_k": 6},
    )  # fmt: skip
    text_cfg = LoraConfig(r=2, lora_alpha=3, use_rslora=True, target_modules=["q_proj", "v_proj"])
    unet = get_peft_model(theirs.unet, unet_cfg)  # injects into theirs.unet in place
    text = get_peft_model(theirs.text_encoder, text_cfg)
    _randomize_lora_b(unet, 1)
    _randomize_lora_b(text, 2)
    theirs_image = run_pipe(theirs, "a photo")
    unet.save_pretrained(tmp_path / "adapter" / "unet")
    text.save_pretrained(tmp_path / "adapter" / "text_encoder")

    lora = read_any(tmp_path / "adapter", base=pipe)
    assert lora.metadata["source_format"] == "peft"
    ranks = lora.ranks()
    assert ranks["unet"]["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"] == 2  # rank_pattern
    assert set(ranks["text_encoder"].values()) == {2} and len(ranks["unet"]) > 10
    _ours_matches(pipe, lora, theirs_image, base_image)
    # a single adapter folder: the component is told by the module names
    alone = read_any(tmp_path / "adapter" / "text_encoder", base=pipe)
    assert not alone.unet and alone.text_encoder.keys() == lora.text_encoder.keys()
    # and it converts like any other LoRA (diffusers' own loader reads the result)
    assert cli(["convert", str(tmp_path / "adapter"), str(tmp_path / "k.safetensors"), "--to", "kohya"]) == 0
    _same(read_any(tmp_path / "k.safetensors", base=pipe).state_dict(), lora.state_dict())


def test_save_lora_adapter_files_read_as_diffusers_applies_them(tiny_model, pipe, tmp_path):
    from peft import LoraConfig

    base_image = run_pipe(pipe, "a photo")
    theirs = load_pipeline(tiny_model)
    torch.manual_seed(0)  # peft draws lora_A at random: a fixed draw, and a scale (16 / 4) that shows
    theirs.unet.add_adapter(LoraConfig(r=4, lora_alpha=16, target_modules=["to_k", "to_v", "conv1"]))
    _randomize_lora_b(theirs.unet, 3)
    theirs_image = run_pipe(theirs, "a photo")
    theirs.unet.save_lora_adapter(tmp_path / "sla")
    written = tmp_path / "sla" / "pytorch_lora_weights.safetensors"
    for source in (written, tmp_path / "sla"):  # the file, and the folder it is in
        lora = read_any(source, base=pipe)
        assert lora.metadata["source_format"] == "peft" and lora.unet and not lora.text_encoder
        _ours_matches(pipe, lora, theirs_image, base_image)


def test_peft_adapters_a_lora_cannot_hold_are_refused(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    text = load_pipeline(tiny_model).text_encoder
    get_peft_model(text, LoraConfig(r=2, use_dora=True, target_modules=["q_proj"])).save_pretrained(tmp_path / "dora")
    with pytest.raises(ValueError, match="DoRA"):
        read_any(tmp_path / "dora")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: a folder, but not a LoRA.*adapter_config.json"):
        read_any(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"adapter_config.json: not valid JSON"):
        read_any(tmp_path / "bad")


def test_diffusers_folder_reads_back_with_its_tokens(pipe, lora, tmp_path):
    export_diffusers(lora, tmp_path / "out")
    back = read_any(tmp_path / "out", base=pipe)
    assert set(back.tokens) == set(lora.tokens) and back.tokens
    _same(back.state_dict(), lora.state_dict())
