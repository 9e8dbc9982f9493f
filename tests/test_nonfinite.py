"""Broken weights are never used or published: every reader refuses NaN/Inf, naming the tensor, and every
command exits 2 with one line and writes nothing. Also: malformed safetensors headers get a clear error."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from surgery_utils import random_lora

from lora_ops import LoraFile, LoraModule, load_lora, load_pipeline, save_lora
from lora_ops.cli import main as cli
from lora_ops.formats import read_any, write_any
from lora_ops.merge import add_to_pipeline


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


@pytest.fixture(scope="module")
def good(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    save_lora(path, random_lora(pipe, seed=3, r=2))
    return path


def _poison_safetensors(path, key_part: str):
    """Rewrite a safetensors file with NaN in the first tensor whose key contains `key_part`; returns the key."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    key = next(k for k in sorted(tensors) if key_part in k)
    tensors[key] = tensors[key].clone().fill_(float("nan"))
    save_file(tensors, str(path), metadata=meta)
    return key


@pytest.fixture(scope="module")
def broken(pipe, tiny_model, tmp_path_factory):
    """{format: (path, poisoned key)} for every format a LoRA or embedding is read from."""
    root = tmp_path_factory.mktemp("broken")
    lora = random_lora(pipe, seed=4, r=2)
    out = {}
    for fmt, name, part in (
        ("native", "native.safetensors", "lora_B"),
        ("kohya", "kohya.safetensors", ".alpha"),  # a kohya alpha of NaN
        ("diffusers", "diffusers.safetensors", "lora_A"),
        ("a1111_embedding", "emb.safetensors", ""),
    ):
        path = write_any(root / name, lora, fmt, base=tiny_model)
        out[fmt] = (path, _poison_safetensors(path, part))
    legacy = write_any(root / "legacy.safetensors", lora, "lora_diffusion", base=tiny_model)
    out["lora_diffusion"] = (legacy, _poison_safetensors(legacy, "up"))
    pt = root / "emb.pt"
    torch.save({"string_to_param": {"*": torch.tensor([[1.0, float("inf")] + [0.0] * 30])}, "name": "x"}, pt)
    out["a1111_pt"] = (pt, "string_to_param.*")
    return out


FORMATS = ["native", "kohya", "diffusers", "a1111_embedding", "lora_diffusion", "a1111_pt"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_reader_refuses_non_finite_weights_naming_the_tensor(broken, tiny_model, fmt):
    path, key = broken[fmt]
    with pytest.raises(ValueError, match=rf"non-finite values \(NaN/Inf\) in {key}"):
        read_any(path, base=tiny_model)
    if fmt == "native":
        with pytest.raises(ValueError, match="non-finite"):
            load_lora(path)


def _commands(path, good, tiny_model, out):
    return {
        "inspect": ["inspect", str(path), "--base", str(tiny_model)],
        "convert-kohya": ["convert", str(path), str(out / "x.safetensors"), "--to", "kohya", "--base", str(tiny_model)],
        "convert-native": ["convert", str(path), str(out / "y.safetensors"), "--to", "native", "--base", str(tiny_model)],
        "add-upl": ["add", "upl", str(path), "--base", str(tiny_model), "--out", str(out / "merged")],
        "add-upl-ckpt": ["add", "upl-ckpt", str(path), "--base", str(tiny_model), "--out", str(out / "m.safetensors")],
        "add-lpl": ["add", "lpl", str(path), str(good), "--base", str(tiny_model), "--out", str(out / "lpl.safetensors")],
        "resize": ["resize", str(path), str(out / "r.safetensors"), "--rank", "1", "--base", str(tiny_model)],
        "generate": ["generate", "--model", str(tiny_model), "--prompt", "a <s1>", "--lora", str(path),
                     "--steps", "1", "--height", "32", "--width", "32", "--out", str(out / "g.png")],
    }  # fmt: skip


COMMANDS = ["inspect", "convert-kohya", "convert-native", "add-upl", "add-upl-ckpt", "add-lpl", "resize"]
# generate reads native files (others are converted first), so it is checked on the native file
CASES = [(f, c) for f in ("native", "kohya", "lora_diffusion") for c in COMMANDS] + [("native", "generate")]


@pytest.mark.parametrize("fmt, command", CASES)
def test_every_command_refuses_a_broken_lora_and_writes_nothing(
    broken, good, tiny_model, tmp_path, capsys, fmt, command
):
    path, key = broken[fmt]
    out = tmp_path / "out"
    out.mkdir()
    argv = _commands(path, good, tiny_model, out)[command]
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite" in err and key in err and len(err.splitlines()) == 1, err
    assert not list(out.iterdir()), "a command wrote output from broken weights"


def test_merge_that_overflows_is_refused_before_any_weight_changes(pipe):
    lora = random_lora(pipe, seed=5, r=2, text=False, tokens=False)
    last = sorted(lora.unet)[-1]  # finite factors whose product overflows float32, in the last module merged
    lora.unet[last] = LoraModule(lora.unet[last].lora_A * 1e25, lora.unet[last].lora_B * 1e25)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match=r"after merging at scale 1.0: non-finite values \(NaN/Inf\);"):
        add_to_pipeline(pipe, lora)
    after = pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "a refused merge changed the model"


def test_writers_refuse_non_finite_in_memory_loras(tmp_path, tiny_model):
    bad = LoraFile(unet={"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": LoraModule(
        torch.full((2, 64), float("inf")), torch.zeros(64, 2))})  # fmt: skip
    for fmt in ("native", "kohya", "diffusers"):
        with pytest.raises(ValueError, match="non-finite"):
            write_any(tmp_path / f"{fmt}.safetensors", bad, fmt)
    assert not list(tmp_path.iterdir())


def _header_file(path, header: dict, data: bytes = b"\0" * 16):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"dtype": "F32", "shape": [2, 2]}, "missing data_offsets"),
        (7, "expected an object with dtype, shape and data_offsets, got int"),
        ({"dtype": "F32", "shape": [4], "data_offsets": [0]}, "data_offsets must be two non-negative integers"),
        ({"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}, "shape must be a list"),
    ],
)
@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_malformed_safetensors_header_names_the_file_and_entry(tmp_path, capsys, entry, message, command):
    path = _header_file(tmp_path / "bad.safetensors", {"unet.x.lora_A.weight": entry})
    argv = ["inspect", str(path)] if command == "inspect" else ["convert", str(path), str(tmp_path / "o.safetensors"),
                                                                 "--to", "kohya"]  # fmt: skip
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"{path}: bad safetensors header entry 'unet.x.lora_A.weight': {message}" in err, err
    assert len(err.splitlines()) == 1
