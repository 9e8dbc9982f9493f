"""`lora-ops inspect` on every supported format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lora_ops import LoraFile, LoraModule, save_lora
from lora_ops.cli import main as cli
from lora_ops.formats import write_any

DISNEY = Path(__file__).parent / "data" / "lora_disney.safetensors"


@pytest.fixture
def lora():
    g = torch.Generator().manual_seed(0)
    return LoraFile(
        unet={
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(
                torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g)
            ),
            "down_blocks.0.resnets.0.conv1": LoraModule(
                torch.randn(2, 32, 3, 3, generator=g), torch.randn(32, 2, 1, 1, generator=g)
            ),
        },
        text_encoder={
            "text_model.encoder.layers.0.self_attn.out_proj": LoraModule(
                torch.randn(2, 32, generator=g), torch.randn(32, 2, generator=g)
            )
        },
        tokens={"<s1>": torch.ones(32)},
        metadata={"base_model": "tiny/base", "alphas": {"unet": 8}},
    )


def _inspect(path, capsys, *extra):
    assert cli(["inspect", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_native_and_kohya(lora, tmp_path, capsys):
    info = _inspect(save_lora(tmp_path / "n.safetensors", lora), capsys)
    assert info["format"] == "native" and info["base_model"] == "tiny/base"
    assert info["modules"] == {"unet": 2, "text_encoder": 1} and info["ranks"] == [2, 4]
    assert info["targets"]["unet"] == ["conv1", "to_q"] and info["targets"]["text_encoder"] == ["out_proj"]
    assert info["tokens"]["<s1>"] == {"dim": 32, "norm": pytest.approx(32**0.5, rel=1e-5)}
    assert info["size_bytes"] == (tmp_path / "n.safetensors").stat().st_size
    for name, mod in [("unet.down_blocks.0.resnets.0.conv1", lora.unet["down_blocks.0.resnets.0.conv1"])]:
        assert info["per_module"][name]["kind"] == "conv"
        assert info["per_module"][name]["norm"] == pytest.approx(mod.delta().norm().item(), rel=1e-4)
    kohya = _inspect(write_any(tmp_path / "k.safetensors", lora, "kohya"), capsys)
    assert kohya["format"] == "kohya" and kohya["base_model"] == "tiny/base"
    assert len(kohya["alphas"]) == 3 and kohya["per_module"].keys() == info["per_module"].keys()
    for name, row in info["per_module"].items():  # the same ΔW; its norm to float32 rounding (summation order)
        assert {**kohya["per_module"][name], "norm": pytest.approx(row["norm"], rel=1e-5)} == row, name


def test_inspect_legacy_and_embedding(lora, tmp_path, capsys):
    info = _inspect(DISNEY, capsys)
    assert info["format"] == "lora_diffusion" and info["family"] == "sd1"
    assert info["modules"] == {"unet": 144, "text_encoder": 48} and info["ranks"] == [1]
    assert sorted(info["tokens"]) == ["<s1>", "<s2>"]
    emb = _inspect(write_any(tmp_path / "e.safetensors", lora, "a1111_embedding"), capsys)
    assert emb["format"] == "a1111_embedding" and list(emb["tokens"]) == ["<e>"]
    # the human-readable form
    assert cli(["inspect", str(DISNEY)]) == 0
    out = capsys.readouterr().out
    assert "format:      lora_diffusion" in out and "token:       <s1> dim 768" in out
    assert cli(["inspect", str(tmp_path / "missing.safetensors")]) == 2
