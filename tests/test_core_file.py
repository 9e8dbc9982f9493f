"""The native file: round trips, dtypes, metadata, and clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from lora_ops import LoraFile, LoraModule, load_lora, save_lora
from lora_ops.lora_file import read_safetensors


def _lora(seed=0, conv=True):
    g = torch.Generator().manual_seed(seed)
    unet = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(
            torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
        )
    }
    if conv:
        unet["down_blocks.0.resnets.0.conv1"] = LoraModule(
            torch.randn(2, 32, 3, 3, generator=g), torch.randn(32, 2, 1, 1, generator=g)
        )
    te = {
        "text_model.encoder.layers.0.self_attn.q_proj": LoraModule(
            torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
        )
    }
    return LoraFile(
        unet,
        te,
        {"<s1>": torch.randn(32, generator=g)},
        {"base_model": "tiny", "training_config": {"lr": 1e-4}, "alphas": {"unet": 4}},
    )


def test_round_trip_fp32_is_exact(tmp_path):
    lora = _lora()
    back = load_lora(save_lora(tmp_path / "a.safetensors", lora))
    for comp in ("unet", "text_encoder"):
        assert back.component(comp).keys() == lora.component(comp).keys()
        for name, mod in lora.component(comp).items():
            assert torch.equal(back.component(comp)[name].lora_A, mod.lora_A)
            assert torch.equal(back.component(comp)[name].lora_B, mod.lora_B)
    assert torch.equal(back.tokens["<s1>"], lora.tokens["<s1>"])
    assert back.metadata["base_model"] == "tiny"
    assert back.metadata["training_config"] == {"lr": 1e-4}


def test_fp16_halves_the_size_and_keeps_values_close(tmp_path):
    lora = _lora()
    lora.unet["big"] = LoraModule(torch.randn(16, 1024), torch.randn(1024, 16))  # tensors, not the header, dominate
    p32 = save_lora(tmp_path / "a32.safetensors", lora, dtype="fp32")
    p16 = save_lora(tmp_path / "a16.safetensors", lora, dtype="fp16")
    assert p16.stat().st_size < 0.6 * p32.stat().st_size
    back = load_lora(p16)
    mod = back.unet["down_blocks.0.resnets.0.conv1"]
    assert mod.lora_A.dtype == torch.float16
    torch.testing.assert_close(mod.delta(), lora.unet["down_blocks.0.resnets.0.conv1"].delta(), rtol=2e-3, atol=2e-3)


def test_metadata_carries_provenance(tmp_path):
    _, meta = read_safetensors(save_lora(tmp_path / "a.safetensors", _lora()))
    assert meta["format"] == "lora_ops" and meta["format_version"] == "1"
    assert json.loads(meta["ranks"])["unet"]["down_blocks.0.resnets.0.conv1"] == 2
    assert json.loads(meta["tokens"]) == ["<s1>"]
    assert len(meta["config_hash"]) == 64


def test_conv_delta_matches_the_conv_composition():
    mod = _lora().unet["down_blocks.0.resnets.0.conv1"]
    x = torch.randn(1, 32, 8, 8)
    composed = torch.nn.functional.conv2d(torch.nn.functional.conv2d(x, mod.lora_A, padding=1), mod.lora_B)
    dense = torch.nn.functional.conv2d(x, mod.delta(), padding=1)
    torch.testing.assert_close(dense, composed, rtol=1e-4, atol=1e-4)


def test_not_safetensors_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"this is not a tensor file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_lora(bad)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = save_lora(tmp_path / "a.safetensors", _lora())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="truncated"):
        load_lora(path)


def test_foreign_safetensors_is_named(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 2)}, path)
    with pytest.raises(ValueError, match="not a native lora_ops file"):
        load_lora(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_lora(tmp_path / "nope.safetensors")


def test_non_finite_weights_are_refused_and_nothing_is_written(tmp_path):
    lora = _lora()
    lora.tokens["<s1>"][0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_lora(tmp_path / "a.safetensors", lora)
    assert list(tmp_path.iterdir()) == []


def test_rank_mismatch_between_factors():
    with pytest.raises(ValueError, match="disagree on the rank"):
        LoraModule(torch.zeros(4, 8), torch.zeros(8, 3))


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        path = save_lora(tmp_path / "a.safetensors", _lora())
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_resaving_a_loaded_file_records_its_current_tokens(tmp_path):
    lora = _lora()
    lora.tokens["<s2>"] = torch.randn(32)
    back = load_lora(save_lora(tmp_path / "a.safetensors", lora))
    del back.tokens["<s1>"]
    back.tokens["<s3>"] = torch.randn(32)
    _, meta = read_safetensors(save_lora(tmp_path / "b.safetensors", back))
    assert json.loads(meta["tokens"]) == ["<s2>", "<s3>"]
    assert json.loads(meta["ranks"])["unet"].keys() == lora.ranks()["unet"].keys()
