"""Pivotal tuning on SDXL: new tokens in both text encoders (as diffusers' advanced SDXL script trains them),
their files (native, diffusers, kohya bundles, A1111/ComfyUI `clip_l`/`clip_g` embeddings) and the clients
that read them, exact resume, inpainting, merges and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from train_utils import assert_resume_is_exact, random_images
from train_utils import pti_config as shared_pti_config

from lora_ops import load_lora, load_pipeline, patch_pipeline
from lora_ops.formats import lora_family, read_any, write_any
from lora_ops.lora_file import LoraFile, read_safetensors, save_lora
from lora_ops.merge import add_to_pipeline, join_loras, merge_loras, split_parts
from lora_ops.tokens import apply_lora_tokens
from lora_ops.training.pti import train_pti

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "a photo of <s1><s2>"


def pti_config(model, data, out, **kw):
    base = dict(
        bucket_reso_steps=8,  # bucketing is on by default for SDXL; at 32 px its sides step by 8
        initializer_tokens="dog",
        max_train_steps_ti=4,
        max_train_steps_tuning=4,
        learning_rate_ti=5e-2,
        learning_rate_unet=1e-2,
    )
    return shared_pti_config(model, data, out, **{**base, **kw})


def _run(pipe, prompt=PROMPT):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=2, height=32, width=32, output_type="np", generator=g).images


def _rows(pipe, tokens=("<s1>", "<s2>")):
    """{encoder: (n, dim)} rows of `tokens` in both text encoders."""
    out = {}
    for name, tok, te in (("te1", pipe.tokenizer, pipe.text_encoder), ("te2", pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok.convert_tokens_to_ids(list(tokens))
        out[name] = te.get_input_embeddings().weight[ids].detach().clone()
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return random_images(tmp_path_factory.mktemp("sdxl-pti") / "data", ((40, 56), (64, 48), (48, 48)), stem="dog")


@pytest.fixture(scope="module")
def trained(tiny_sdxl_model, data, tmp_path_factory):
    config = pti_config(tiny_sdxl_model, data, tmp_path_factory.mktemp("sdxl-pti") / "out", train_text_encoder=True)
    return train_pti(config)


def test_tokens_train_in_both_text_encoders_and_nothing_else_moves(trained, tiny_sdxl_model):
    lora = load_lora(trained.path)
    assert list(lora.tokens) == ["<s1>", "<s2>"] and list(lora.tokens_2) == ["<s1>", "<s2>"]
    base = load_pipeline(tiny_sdxl_model)
    assert lora.tokens["<s1>"].shape == (base.text_encoder.config.hidden_size,)
    assert lora.tokens_2["<s1>"].shape == (base.text_encoder_2.config.hidden_size,)  # wider: 48 vs 32
    assert lora.unet and lora.text_encoder and lora.text_encoder_2 and lora_family(lora) == "sdxl"
    # each encoder's rows started from its own embedding of the initializer word and moved in phase 1
    for tok, te, table in (
        (base.tokenizer, base.text_encoder, lora.tokens),
        (base.tokenizer_2, base.text_encoder_2, lora.tokens_2),
    ):
        ids = tok("dog", add_special_tokens=False).input_ids
        start = te.get_input_embeddings().weight[ids].mean(0)
        for token, row in table.items():
            assert (row - start).abs().max() > 1e-3, f"{token} never trained in {type(te).__name__}"
    # the file's tensors: native keys for both tables, and the header lists the tokens once
    tensors, meta = read_safetensors(trained.path)
    assert {"token_embeddings.<s1>", "token_embeddings_2.<s1>"} <= set(tensors)
    assert meta["tokens"] == '["<s1>", "<s2>"]'
    # patched: the base vocabulary is untouched in both encoders, the tokens read back exactly
    patched = load_pipeline(tiny_sdxl_model)
    before = [te.get_input_embeddings().weight.detach().clone() for te in (base.text_encoder, base.text_encoder_2)]
    patch_pipeline(patched, trained.path)
    after = [te.get_input_embeddings().weight for te in (patched.text_encoder, patched.text_encoder_2)]
    for old, new in zip(before, after, strict=True):
        assert torch.equal(new[: old.shape[0]], old)
    rows = _rows(patched)
    assert torch.equal(rows["te1"], torch.stack(list(lora.tokens.values())))
    assert torch.equal(rows["te2"], torch.stack(list(lora.tokens_2.values())))
    assert np.abs(_run(patched) - _run(base)).max() > 1e-3


def test_inversion_alone_changes_only_the_new_rows(tiny_sdxl_model, data, tmp_path):
    result = train_pti(pti_config(tiny_sdxl_model, data, tmp_path / "ti", perform_tuning=False))
    lora = load_lora(result.path)
    assert not (lora.unet or lora.text_encoder or lora.text_encoder_2)
    assert set(lora.tokens) == set(lora.tokens_2) == {"<s1>", "<s2>"}
    # a tokens-only SDXL file is an SDXL embedding: both encoders' rows in one file
    emb = write_any(tmp_path / "emb.safetensors", lora, "a1111_embedding")
    assert set(load_file(emb)) == {"clip_l", "clip_g"}


def test_diffusers_loads_the_export_into_both_encoders_to_our_image(trained, tiny_sdxl_model, tmp_path):
    """`load_lora_weights` for the LoRA and `load_textual_inversion` of `clip_l` / `clip_g` into each encoder
    (the loading diffusers documents for its advanced SDXL script's embeddings) give our patched image."""
    ours = load_pipeline(tiny_sdxl_model)
    patch_pipeline(ours, trained.path)
    expected = _run(ours)
    paths = write_any(tmp_path / "export", load_lora(trained.path), "diffusers").parent
    theirs = load_pipeline(tiny_sdxl_model)
    theirs.load_lora_weights(str(paths))
    for token in ("<s1>", "<s2>"):
        state = load_file(paths / f"{token.strip('<>')}.safetensors")
        assert set(state) == {"clip_l", "clip_g"}
        theirs.load_textual_inversion(state["clip_l"], token=token, text_encoder=theirs.text_encoder,
                                      tokenizer=theirs.tokenizer)  # fmt: skip
        theirs.load_textual_inversion(state["clip_g"], token=token, text_encoder=theirs.text_encoder_2,
                                      tokenizer=theirs.tokenizer_2)  # fmt: skip
    np.testing.assert_allclose(_run(theirs), expected, atol=1e-5)
    # and our reader takes the folder back whole: LoRA and both tables
    back = read_any(paths)
    for table, want in ((back.tokens, ours.text_encoder), (back.tokens_2, ours.text_encoder_2)):
        assert set(table) == {"<s1>", "<s2>"}
        assert table["<s1>"].shape == (want.config.hidden_size,)


def test_embedding_files_as_peers_write_them_read_exactly(trained, tiny_sdxl_model, tmp_path):
    lora = load_lora(trained.path)
    # diffusers' advanced SDXL script / A1111 / ComfyUI: one file, clip_l (n, d1) and clip_g (n, d2)
    peer = tmp_path / "concept.safetensors"
    save_file({"clip_l": torch.stack(list(lora.tokens.values())), "clip_g": torch.stack(list(lora.tokens_2.values()))},
              str(peer))  # fmt: skip
    got = read_any(peer, token="<s1>")
    assert list(got.tokens) == list(got.tokens_2) == ["<s1>", "<s1>_1"]
    assert torch.equal(got.tokens["<s1>_1"], lora.tokens["<s2>"])
    assert torch.equal(got.tokens_2["<s1>_1"], lora.tokens_2["<s2>"])
    pipe = load_pipeline(tiny_sdxl_model)
    patch_pipeline(pipe, got)
    assert torch.equal(_rows(pipe, ["<s1>", "<s1>_1"])["te2"], torch.stack(list(lora.tokens_2.values())))
    # kohya bundles (A1111 / ComfyUI / OneTrainer spelling): bundle_emb.<token>.clip_l and .clip_g
    path = write_any(tmp_path / "k.safetensors", lora, "kohya", base=tiny_sdxl_model)
    keys = load_file(path)
    assert keys["bundle_emb.<s1>.clip_g"].shape == (1, lora.tokens_2["<s1>"].shape[0])
    assert not any("string_to_param" in k for k in keys)
    back = read_any(path, base=tiny_sdxl_model)
    for a, b in ((back.tokens, lora.tokens), (back.tokens_2, lora.tokens_2)):
        assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a)
    # kohya with separate embeddings beside the LoRA: one SDXL embedding per token
    write_any(tmp_path / "sep.safetensors", lora, "kohya", base=tiny_sdxl_model, tokens="separate")
    assert set(load_file(tmp_path / "sep.s1.safetensors")) == {"clip_l", "clip_g"}


def test_files_for_the_wrong_number_of_encoders_are_refused_before_anything_changes(
    trained, tiny_sdxl_model, tiny_model
):
    lora = load_lora(trained.path)
    one_table = LoraFile(tokens=dict(lora.tokens))  # an SD 1.x-style embedding on an SDXL model
    pipe = load_pipeline(tiny_sdxl_model)
    vocab = len(pipe.tokenizer)
    with pytest.raises(ValueError, match="rows for one text encoder; this SDXL model needs rows for both"):
        patch_pipeline(pipe, one_table)
    assert len(pipe.tokenizer) == vocab and len(pipe.tokenizer_2) == vocab
    width_2 = pipe.text_encoder_2.get_input_embeddings().weight.shape[1]
    for bad_row, message in [(torch.ones(width_2 + 1), "text_encoder_2 needs"), (torch.full((width_2,), float("nan")),
                             "non-finite embedding")]:  # fmt: skip
        rows_2 = {**lora.tokens_2, "<s2>": bad_row}  # the first encoder's rows are fine: nothing may be added there
        with pytest.raises(ValueError, match=message):
            apply_lora_tokens(pipe, LoraFile(tokens=dict(lora.tokens), tokens_2=rows_2))
        assert len(pipe.tokenizer) == vocab and len(pipe.tokenizer_2) == vocab
    sd1 = load_pipeline(tiny_model)
    with pytest.raises(ValueError, match="rows for both SDXL text encoders; this model has one text encoder"):
        patch_pipeline(sd1, LoraFile(tokens=dict(lora.tokens), tokens_2=dict(lora.tokens_2)))
    with pytest.raises(ValueError, match="differ between the text encoders"):
        save_lora(
            tiny_model.parent / "bad.safetensors", LoraFile(tokens=dict(lora.tokens), tokens_2={"<x>": torch.ones(48)})
        )
    assert not (tiny_model.parent / "bad.safetensors").exists()


def test_resume_is_bit_identical_in_both_phases(tiny_sdxl_model, data, tmp_path):
    kw = dict(save_steps=2, horizontal_flip=True, crop="random", continue_inversion=True, train_text_encoder=True)
    for stop_at in (3, 7):  # inside phase 1, inside phase 2
        tensors = assert_resume_is_exact(
            lambda out, **more: pti_config(tiny_sdxl_model, data, out, **kw, **more),
            tmp_path / str(stop_at),
            stop_at=stop_at,
            train=train_pti,
        )
    assert any(k.startswith("token_embeddings_2.") for k in tensors)


def test_inpainting_pti_on_an_sdxl_inpainting_model(tmp_path):
    from PIL import Image

    from lora_ops.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "xl-inpaint", arch="sdxl-tiny", inpainting=True)
    data = random_images(tmp_path / "data", ((40, 40), (48, 40)))
    for i in range(2):
        mask = np.zeros((40 + 8 * i, 40), np.uint8)
        mask[8:32, 8:32] = 255
        Image.fromarray(mask).save(data / f"img{i}.mask.png")
    config = pti_config(model, data, tmp_path / "out", train_inpainting=True, use_masks=True)
    result = train_pti(config)
    lora = load_lora(result.path)
    assert lora.unet and lora.tokens_2
    assert np.isfinite(result.metrics["tuning/loss"])
    pipe = load_pipeline(model, "inpaint")
    assert type(pipe).__name__ == "StableDiffusionXLInpaintPipeline"
    patch_pipeline(pipe, result.path)
    g = torch.Generator().manual_seed(0)
    image = Image.new("RGB", (32, 32), "red")
    mask = Image.new("L", (32, 32), 255)
    out = pipe(PROMPT, image=image, mask_image=mask, num_inference_steps=2, height=32, width=32, output_type="np",
               generator=g).images  # fmt: skip
    assert out.shape == (1, 32, 32, 3) and np.isfinite(out).all()


def test_merges_keep_both_tables(trained, tiny_sdxl_model, tmp_path):
    from surgery_utils import random_lora

    lora = load_lora(trained.path)
    other = random_lora(load_pipeline(tiny_sdxl_model), seed=9, r=2)
    other.metadata["base_model"] = lora.metadata["base_model"]
    other.tokens = {"<t1>": torch.randn(32)}
    other.tokens_2 = {"<t1>": torch.randn(48)}
    merged, _ = merge_loras([lora, other], [0.5, 0.5])
    assert list(merged.tokens) == list(merged.tokens_2) == ["<s1>", "<s2>", "<t1>"]
    joined = join_loras([lora, other], names=["a", "b"])
    parts = split_parts(joined)
    assert list(parts["b"].tokens_2) == ["<t1>"] and list(parts["a"].tokens_2) == ["<s1>", "<s2>"]
    # upl: merged into the weights, the tokens added to both vocabularies, the same image as patching
    patched = load_pipeline(tiny_sdxl_model)
    patch_pipeline(patched, trained.path)
    upl = load_pipeline(tiny_sdxl_model)
    add_to_pipeline(upl, lora)
    np.testing.assert_allclose(_run(upl), _run(patched), atol=1e-4)


def test_distill_of_a_tuned_sdxl_keeps_its_tokens_in_both_encoders(trained, tiny_sdxl_model):
    from lora_ops.distill import DistillConfig, distill

    lora = load_lora(trained.path)
    tuned = load_pipeline(tiny_sdxl_model)
    add_to_pipeline(tuned, lora)
    got, _ = distill(tuned, load_pipeline(tiny_sdxl_model), DistillConfig(rank=4, clamp_quantile=1.0), progress=False)
    for a, b in ((got.tokens, lora.tokens), (got.tokens_2, lora.tokens_2)):
        assert a.keys() == b.keys() and all(torch.equal(a[t], b[t]) for t in a)


def test_cli_trains_pti_on_sdxl_and_inspect_shows_both_rows(tiny_sdxl_model, data, tmp_path, capsys):
    import json

    from lora_ops.cli import main as cli

    out = tmp_path / "out"
    args = ["train", "pti", "--pretrained_model_name_or_path", str(tiny_sdxl_model), "--instance_data_dir", str(data)]
    args += ["--output_dir", str(out), "--resolution", "32", "--bucket_reso_steps", "8", "--use_template", "object"]
    args += ["--placeholder_tokens", "<s1>", "--max_train_steps_ti", "2", "--max_train_steps_tuning", "2"]
    args += ["--progress", "false"]
    assert cli(args) == 0
    capsys.readouterr()
    assert cli(["inspect", str(out / "final_lora.safetensors"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "sdxl"
    assert report["tokens"]["<s1>"]["dim"] == 32 and report["tokens"]["<s1>"]["dim_2"] == 48
