"""Patching pipelines: parity with diffusers' own loaders, scales, several adapters, fuse/unfuse, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_ops import (
    LoraConfig,
    LoraFile,
    adapter_names,
    add_tokens,
    enable_lora,
    extract_lora,
    fuse_lora,
    init_token_embeddings,
    inject_lora,
    load_lora,
    load_pipeline,
    patch_pipeline,
    read_token_embeddings,
    remove_lora,
    save_lora,
    set_scales,
    unfuse_lora,
)

PROMPT = "a photo of <s1><s2> on the beach"


def _run(pipe, prompt=PROMPT):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np", generator=g).images


def _trained_lora(model_dir, seed, unet="unet", text=True, tokens=True, r=4) -> LoraFile:
    """A LoRA with non-zero weights (random init of both factors), as if trained."""
    pipe = load_pipeline(model_dir)
    torch.manual_seed(seed)
    inject_lora(pipe.unet, LoraConfig(target_modules=unet, r=r, lora_alpha=2 * r, init="random"))
    lora = LoraFile(unet=extract_lora(pipe.unet, "unet"), metadata={"base_model": str(model_dir)})
    if text:
        inject_lora(pipe.text_encoder, LoraConfig(target_modules="text_encoder", r=2, init="random"))
        lora.text_encoder = extract_lora(pipe.text_encoder, "text_encoder")
    if tokens:
        names = ["<s1>", "<s2>"]
        add_tokens(pipe.tokenizer, pipe.text_encoder, names)
        init_token_embeddings(
            pipe.tokenizer, pipe.text_encoder, names, None, generator=torch.Generator().manual_seed(seed)
        )
        lora.tokens = read_token_embeddings(pipe.tokenizer, pipe.text_encoder, names)
    return lora


@pytest.fixture(scope="module")
def lora_path(tiny_model, tmp_path_factory):
    return save_lora(tmp_path_factory.mktemp("lora") / "a.safetensors", _trained_lora(tiny_model, 1))


@pytest.fixture(scope="module")
def base_images(tiny_model):
    return _run(load_pipeline(tiny_model), "a photo of on the beach")


def _diffusers_loaded(model_dir, lora: LoraFile, tmp_path):
    """The pipeline as a diffusers user loads our file: load_lora_weights + load_textual_inversion."""
    pipe = load_pipeline(model_dir)
    state = {k: v for k, v in lora.state_dict().items() if not k.startswith("token_embeddings.")}
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors")
    pipe.load_lora_weights(tmp_path, weight_name="pytorch_lora_weights.safetensors")
    for token, vector in lora.tokens.items():
        pipe.load_textual_inversion(vector[None], token=token, tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    return pipe


@pytest.mark.parametrize(
    "text,tokens", [(False, False), (True, False), (True, True)], ids=["unet", "unet+te", "tokens"]
)
def test_parity_with_diffusers_loaders(tiny_model, tmp_path, text, tokens):
    lora = _trained_lora(tiny_model, 2, text=text, tokens=tokens)
    path = save_lora(tmp_path / "l.safetensors", lora)
    ours = load_pipeline(tiny_model)
    patch_pipeline(ours, path)
    theirs = _diffusers_loaded(tiny_model, load_lora(path), tmp_path)
    base = _run(load_pipeline(tiny_model))
    out_ours, out_theirs = _run(ours), _run(theirs)
    assert np.abs(out_ours - base).max() > 1e-3, "the LoRA must change the output for the comparison to mean anything"
    np.testing.assert_allclose(out_ours, out_theirs, atol=1e-5)


def test_extended_conv_lora_round_trips_exactly(tiny_model, tmp_path):
    pipe = load_pipeline(tiny_model)
    torch.manual_seed(3)
    inject_lora(pipe.unet, LoraConfig(target_modules="unet-extended", r=4, init="random"))
    lora = LoraFile(unet=extract_lora(pipe.unet, "unet"))
    assert any(m.is_conv for m in lora.unet.values())
    reloaded = load_pipeline(tiny_model)
    patch_pipeline(reloaded, save_lora(tmp_path / "ext.safetensors", lora))
    np.testing.assert_array_equal(_run(reloaded, "a photo"), _run(pipe, "a photo"))


def test_scale_zero_and_disable_reproduce_the_base(tiny_model, lora_path, base_images):
    pipe = load_pipeline(tiny_model)
    patch_pipeline(pipe, lora_path)
    with_lora = _run(pipe, "a photo of on the beach")
    assert np.abs(with_lora - base_images).max() > 1e-3
    set_scales(pipe, unet=0.0, text_encoder=0.0)
    np.testing.assert_allclose(_run(pipe, "a photo of on the beach"), base_images, atol=1e-6)
    set_scales(pipe, unet=1.0, text_encoder=1.0)
    enable_lora(pipe, False)
    np.testing.assert_allclose(_run(pipe, "a photo of on the beach"), base_images, atol=1e-6)
    enable_lora(pipe, True)
    np.testing.assert_allclose(_run(pipe, "a photo of on the beach"), with_lora, atol=1e-6)


def test_separate_unet_and_text_encoder_scales(tiny_model, lora_path):
    pipe = load_pipeline(tiny_model)
    patch_pipeline(pipe, lora_path, unet_scale=0.0, text_encoder_scale=1.0)
    te_only = _run(pipe)
    set_scales(pipe, unet=1.0, text_encoder=0.0)
    unet_only = _run(pipe)
    set_scales(pipe, unet=1.0, text_encoder=1.0)
    both = _run(pipe)
    assert np.abs(te_only - unet_only).max() > 1e-3
    assert np.abs(both - unet_only).max() > 1e-3


def test_two_adapters_with_independent_weights(tiny_model, tmp_path, lora_path):
    second = save_lora(tmp_path / "b.safetensors", _trained_lora(tiny_model, 5, tokens=False))
    pipe = load_pipeline(tiny_model)
    patch_pipeline(pipe, lora_path, "a")
    patch_pipeline(pipe, second, "b", unet_scale=0.0, text_encoder_scale=0.0)
    assert adapter_names(pipe) == ["a", "b"]
    only_a = load_pipeline(tiny_model)
    patch_pipeline(only_a, lora_path)
    np.testing.assert_allclose(_run(pipe), _run(only_a), atol=1e-6)
    set_scales(pipe, "b", unet=0.7, text_encoder=0.7)
    assert np.abs(_run(pipe) - _run(only_a)).max() > 1e-4
    remove_lora(pipe, "b")
    assert adapter_names(pipe) == ["a"]
    np.testing.assert_allclose(_run(pipe), _run(only_a), atol=1e-6)


def test_fuse_matches_unfused_and_unfuse_restores(tiny_model, lora_path):
    pipe = load_pipeline(tiny_model)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    patch_pipeline(pipe, lora_path, unet_scale=0.6, text_encoder_scale=0.9)
    unfused = _run(pipe)
    fuse_lora(pipe)
    np.testing.assert_allclose(_run(pipe), unfused, atol=1e-4)
    with pytest.raises(ValueError, match="unfuse"):
        set_scales(pipe, unet=1.0)
    unfuse_lora(pipe)
    np.testing.assert_allclose(_run(pipe), unfused, atol=1e-4)
    after = {k.replace(".base_layer.", "."): v for k, v in pipe.unet.state_dict().items() if ".lora_" not in k}
    assert after.keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-5, rtol=0)


def test_fuse_refuses_non_finite_results(tiny_model, tmp_path):
    lora = _trained_lora(tiny_model, 7, text=False, tokens=False)
    first, last = list(lora.unet)[0], list(lora.unet)[-1]
    lora.unet[last].lora_A.fill_(1.0)
    lora.unet[last].lora_B.fill_(3e38)  # finite in the file, overflows to inf when merged
    pipe = load_pipeline(tiny_model)
    patch_pipeline(pipe, lora)
    weights = {n: pipe.unet.get_submodule(n).base_layer.weight.clone() for n in (first, last)}
    with pytest.raises(ValueError, match=f"fusing {last}"):
        fuse_lora(pipe)
    for n, w in weights.items():  # nothing fused: the layers merged before the failure were restored
        torch.testing.assert_close(pipe.unet.get_submodule(n).base_layer.weight, w, atol=1e-6, rtol=0)
        assert not pipe.unet.get_submodule(n).merged


def test_tokens_are_applied_idempotently(tiny_model, lora_path):
    pipe = load_pipeline(tiny_model)
    n = len(pipe.tokenizer)
    lora = load_lora(lora_path)
    patch_pipeline(pipe, lora, "a")
    patch_pipeline(pipe, lora, "b")
    assert len(pipe.tokenizer) == n + 2
    torch.testing.assert_close(
        read_token_embeddings(pipe.tokenizer, pipe.text_encoder, ["<s1>"])["<s1>"], lora.tokens["<s1>"]
    )


def test_token_already_in_vocabulary_is_refused(tiny_model):
    pipe = load_pipeline(tiny_model)
    with pytest.raises(ValueError, match="already in the tokenizer's vocabulary"):
        add_tokens(pipe.tokenizer, pipe.text_encoder, ["a"])


def test_lora_for_another_architecture_names_module_and_shapes(tiny_model, tmp_path):
    lora = _trained_lora(tiny_model, 1, text=False, tokens=False)
    name = next(iter(lora.unet))
    mod = lora.unet[name]
    mod.lora_A = torch.zeros(mod.r, mod.in_features * 2)
    pipe = load_pipeline(tiny_model)
    with pytest.raises(ValueError, match=rf"unet\.{name}.*another architecture"):
        patch_pipeline(pipe, lora)
    assert adapter_names(pipe) == []
    lora2 = LoraFile(unet={"down_blocks.9.nothing": lora.unet[name]})
    with pytest.raises(ValueError, match="has no module 'down_blocks.9.nothing'"):
        patch_pipeline(pipe, lora2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scale_is_refused(tiny_model, lora_path, bad):
    pipe = load_pipeline(tiny_model)
    with pytest.raises(ValueError, match="finite"):
        patch_pipeline(pipe, lora_path, unet_scale=bad)
    patch_pipeline(pipe, lora_path)
    with pytest.raises(ValueError, match="finite"):
        set_scales(pipe, text_encoder=bad)


def test_a_bad_file_leaves_the_pipeline_unchanged(tiny_model):
    lora = _trained_lora(tiny_model, 4)  # valid UNet and tokens ...
    lora.text_encoder["text_model.encoder.layers.9.self_attn.q_proj"] = next(iter(lora.text_encoder.values()))
    pipe = load_pipeline(tiny_model)  # ... and one text-encoder module this model lacks
    n_tokens = len(pipe.tokenizer)
    with pytest.raises(ValueError, match="text_encoder has no module"):
        patch_pipeline(pipe, lora, "a")
    assert adapter_names(pipe) == [] and len(pipe.tokenizer) == n_tokens
    del lora.text_encoder["text_model.encoder.layers.9.self_attn.q_proj"]
    patch_pipeline(pipe, lora, "a")  # the corrected file loads under the same name
    assert adapter_names(pipe) == ["a"]
