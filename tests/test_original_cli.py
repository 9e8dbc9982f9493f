"""The original lora_diffusion README's commands, typed as written, through the installed console scripts.

Every command line below is the README's (lora_diffusion 0.1.7), with only the example paths replaced by
the tiny model and LoRAs made here, the removed hub id `runwayml/stable-diffusion-v1-5` by the local tiny
model, and the training steps and resolution made CPU-sized.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from surgery_utils import random_lora

from lora_ops import load_lora, load_pipeline, save_lora
from lora_ops.original_cli import UsageError, translate_add, translate_distill, translate_pti
from lora_ops.targets import get_module

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(command: str, cwd: Path, **variables) -> subprocess.CompletedProcess:
    """A README command line (shell syntax: quotes, `\\` line joins, `#` comments, $VARS) run as typed."""
    text = command.replace("\\\n", " ")
    for name, value in variables.items():
        text = text.replace(f"${name}", shlex.quote(str(value)))
    argv = shlex.split(text, comments=True)
    script = BIN / argv[0]
    assert script.is_file(), f"console script {argv[0]} is not installed (pip install -e .)"
    proc = subprocess.run([str(script), *argv[1:]], cwd=cwd, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def work(tiny_model, tmp_path_factory):
    """A folder laid out as the README's examples: ./example_loras/*.safetensors, and the tiny model."""
    root = tmp_path_factory.mktemp("original-readme")
    pipe = load_pipeline(tiny_model)
    (root / "example_loras").mkdir()
    krk = random_lora(pipe, seed=1, r=2, unet="unet-extended")  # with tokens, like lora_krk
    analog = random_lora(pipe, seed=2, r=2, unet="unet-extended", tokens=False)
    save_lora(root / "example_loras" / "lora_krk.safetensors", krk)
    save_lora(root / "example_loras" / "analog_svd_rank4.safetensors", analog)
    return root, tiny_model, pipe, krk, analog


def _weight(model, name):
    return get_module(model, name).weight.detach().float()


@pytest.fixture(scope="module")
def merged(work):
    """`lora_add runwayml/stable-diffusion-v1-5 ./example_loras/lora_krk.safetensors ./output_merged 0.8 --mode upl`"""
    root, tiny, *_ = work
    line = "lora_add runwayml/stable-diffusion-v1-5 ./example_loras/lora_krk.safetensors ./output_merged 0.8 --mode upl"
    run(line.replace("runwayml/stable-diffusion-v1-5", str(tiny)), root)
    return root / "output_merged"


def test_lora_add_upl_merges_w_plus_alpha_delta(work, merged):
    _, _, pipe, krk, _ = work
    out = load_pipeline(merged)
    for comp in ("unet", "text_encoder"):
        for name, mod in list(krk.component(comp).items())[:6]:
            expected = _weight(getattr(pipe, comp), name) + 0.8 * mod.delta().reshape(
                _weight(getattr(pipe, comp), name).shape
            )
            torch.testing.assert_close(_weight(getattr(out, comp), name), expected, atol=1e-5, rtol=1e-5)
    # the learned tokens went into the merged tokenizer and text encoder
    assert out.tokenizer.convert_tokens_to_ids("<s1>") != out.tokenizer.unk_token_id


def test_lora_add_upl_ckpt_v2_writes_an_fp16_checkpoint_and_the_embedding(work):
    root, tiny, *_ = work
    line = "lora_add runwayml/stable-diffusion-v1-5 ./example_loras/lora_krk.safetensors ./output_merged.ckpt 0.7 --mode upl-ckpt-v2"
    proc = run(line.replace("runwayml/stable-diffusion-v1-5", str(tiny)), root)
    ckpt = torch.load(root / "output_merged.ckpt", weights_only=True)["state_dict"]
    assert len(ckpt) > 100 and {t.dtype for t in ckpt.values() if t.is_floating_point()} == {torch.float16}
    assert "lora-ops add upl-ckpt" in proc.stderr and "--half" in proc.stderr
    assert re.search(r"embedding: .*\.safetensors", proc.stdout), proc.stdout


def test_lora_add_lora_plus_lora_follows_the_documented_formula(work):
    """ΔW = (α₁ A₁ + α₂ A₂)(α₁ B₁ + α₂ B₂)ᵀ, the README's formula (lora-ops' legacy-sum-factors mode)."""
    root, _, _, krk, analog = work
    run("lora_add ./example_loras/analog_svd_rank4.safetensors ./example_loras/lora_krk.safetensors ./krk_analog.safetensors 2.0 0.7", root)  # fmt: skip
    out = load_lora(root / "krk_analog.safetensors")
    for comp in ("unet", "text_encoder"):
        assert set(out.component(comp)) == set(krk.component(comp))
        for name, mod in list(out.component(comp).items())[:8]:
            a1, a2 = analog.component(comp)[name], krk.component(comp)[name]
            b = 2.0 * a1.lora_B + 0.7 * a2.lora_B
            a = 2.0 * a1.lora_A + 0.7 * a2.lora_A
            expected = (b.flatten(1) @ a.flatten(1)).reshape(mod.delta().shape)
            torch.testing.assert_close(mod.delta(), expected, atol=1e-5, rtol=1e-5)


def test_lora_add_join_has_rank_r1_plus_r2(work):
    root, _, _, krk, analog = work
    run("lora_add ./example_loras/lora_krk.safetensors ./example_loras/analog_svd_rank4.safetensors ./joined.safetensors --mode=ljl", root)  # fmt: skip
    out = load_lora(root / "joined.safetensors")
    for comp in ("unet", "text_encoder"):
        for name, mod in out.component(comp).items():
            assert mod.r == krk.component(comp)[name].r + analog.component(comp)[name].r
    name = next(iter(krk.unet))
    torch.testing.assert_close(out.unet[name].delta(), krk.unet[name].delta() + analog.unet[name].delta(), atol=1e-5, rtol=1e-5)  # fmt: skip


def test_lora_distill_recovers_the_merged_lora(work, merged):
    """The original SVD distillation CLI on a model that is base + 0.8 ΔW: rank 2, no clamping, gives 0.8 ΔW."""
    root, tiny, _, krk, _ = work
    run(f"lora_distill ./output_merged {tiny} --rank 2 --clamp_quantile=1.0 --device cpu --save_path ./distilled.safetensors", root)  # fmt: skip
    out = load_lora(root / "distilled.safetensors")
    conv = [n for n, m in krk.unet.items() if m.is_conv]
    assert conv and set(conv) <= set(out.unet)  # the original's extended targets: ResNet convolutions too
    for comp in ("unet", "text_encoder"):
        for name in list(krk.component(comp))[:6] + conv[:2]:
            if name in out.component(comp):
                torch.testing.assert_close(
                    out.component(comp)[name].delta(), 0.8 * krk.component(comp)[name].delta(), atol=2e-4, rtol=1e-3
                )


README_PTI = """
export MODEL_NAME="runwayml/stable-diffusion-v1-5"
export INSTANCE_DIR="./data/data_disney"
export OUTPUT_DIR="./exps/output_dsn"

lora_pti \\
  --pretrained_model_name_or_path=$MODEL_NAME  \\
  --instance_data_dir=$INSTANCE_DIR \\
  --output_dir=$OUTPUT_DIR \\
  --train_text_encoder \\
  --resolution=512 \\
  --train_batch_size=1 \\
  --gradient_accumulation_steps=4 \\
  --scale_lr \\
  --learning_rate_unet=1e-4 \\
  --learning_rate_text=1e-5 \\
  --learning_rate_ti=5e-4 \\
  --color_jitter \\
  --lr_scheduler="linear" \\
  --lr_warmup_steps=0 \\
  --placeholder_tokens="<s1>|<s2>" \\
  --use_template="style"\\
  --save_steps=100 \\
  --max_train_steps_ti=1000 \\
  --max_train_steps_tuning=1000 \\
  --perform_inversion=True \\
  --clip_ti_decay \\
  --weight_decay_ti=0.000 \\
  --weight_decay_lora=0.001\\
  --continue_inversion \\
  --continue_inversion_lr=1e-4 \\
  --device="cuda:0" \\
  --lora_rank=1 \\
#  --use_face_segmentation_condition\\
"""


def test_lora_pti_runs_the_readme_command(work):
    from test_train_pti import make_images

    root, tiny, *_ = work
    make_images(root / "data" / "data_disney", n=2)
    command = README_PTI.split("lora_pti", 1)[1]
    # CPU-sized: 32 px, 2 + 2 steps (the only changes besides the paths); the device where there is no GPU
    command = command.replace("--resolution=512", "--resolution=32").replace("=1000", "=2")
    if not torch.cuda.is_available():
        command = command.replace('--device="cuda:0"', "--device=cpu")
    # --enable_xformers_memory_efficient_attention: the original's training scripts pass it (accepted, noted)
    command = "lora_pti --enable_xformers_memory_efficient_attention --eval_noises=0 --progress=false" + command
    proc = run(command, root, MODEL_NAME=tiny, INSTANCE_DIR="./data/data_disney", OUTPUT_DIR="./exps/output_dsn")
    assert "scaled-dot-product attention (SDPA) is always used" in proc.stderr
    assert "lora_pti: running: lora-ops train pti" in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (root / report["path"]).resolve() == (root / "exps" / "output_dsn" / "final_lora.safetensors").resolve()
    lora = load_lora(root / report["path"])
    assert lora.unet and lora.text_encoder and list(lora.tokens) == ["<s1>", "<s2>"]
    assert all(m.r == 1 for m in lora.unet.values())
    saved = lora.metadata["training_config"]
    assert saved["use_template"] == "style" and saved["continue_inversion"] is True
    assert saved["continue_inversion_lr"] == 1e-4 and saved["optim"]["scale_lr"] and saved["data"]["color_jitter"]
    assert saved["optim"]["gradient_accumulation_steps"] == 4 and saved["optim"]["lr_scheduler"] == "linear"


# ----------------------------------------------------------------------------- the translations, flag by flag


def test_lora_add_fire_forms_and_original_defaults():
    assert translate_add(["a.safetensors", "b.safetensors", "o.safetensors"]) == [
        "add", "lpl", "a.safetensors", "b.safetensors", "--out", "o.safetensors", "--weights", "0.5", "0.5",
        "--merge-mode", "legacy-sum-factors",
    ]  # fmt: skip
    spelled = [
        ["m", "l.safetensors", "out", "0.8", "--mode", "upl"],
        ["m", "l.safetensors", "out", "--alpha", "0.8", "--mode=upl"],
        ["m", "l.safetensors", "out", "--alpha_1=0.8", "--mode", "upl", "--with_text_lora"],
        ["--path_1", "m", "--path-2=l.safetensors", "out", "--alpha=0.8", "--mode=upl", "--nowith_text_lora"],
    ]
    for argv in spelled:
        assert translate_add(argv) == ["add", "upl", "l.safetensors", "--base", "m", "--out", "out", "--alpha", "0.8"]
    assert translate_add(["a", "b", "o.ckpt", "0.7", "--mode", "upl-ckpt-v2"])[:2] == ["add", "upl-ckpt"]
    assert translate_add(["a", "b", "o", "2.0", "0.7"])[6:9] == ["--weights", "2.0", "0.7"]
    assert translate_add(["a", "b", "o", "--mode=ljl"]) == ["add", "ljl", "a", "b", "--out", "o"]
    for bad, match in [
        (["a", "b"], "missing OUTPUT_PATH"),
        (["a", "b", "o", "--mode", "upl-ckpt"], "--mode='upl-ckpt' is not one of"),
        (["a", "b", "o", "fast"], "--alpha_1='fast' is not a number"),
        (["a", "b", "o", "--alpah", "1"], "unknown flag --alpah"),
    ]:
        with pytest.raises(UsageError, match=match):
            translate_add(bad)


def test_removed_hub_ids_become_the_maintained_ones(capsys):
    args = translate_add(["runwayml/stable-diffusion-v1-5", "l.safetensors", "out", "--mode", "upl"])
    assert args[args.index("--base") + 1] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert "runwayml/stable-diffusion-v1-5 was removed from the hub" in capsys.readouterr().err
    pti = translate_pti(["--pretrained_model_name_or_path=runwayml/stable-diffusion-inpainting"])
    assert "--pretrained_model_name_or_path=stable-diffusion-v1-5/stable-diffusion-inpainting" in pti


def test_lora_pti_original_defaults_and_flags(capsys):
    args = translate_pti(["./data", "sd", "./out"])  # python-fire fills the original train()'s order
    assert args[:2] == ["train", "pti"]
    assert {"--instance_data_dir=./data", "--pretrained_model_name_or_path=sd", "--output_dir=./out"} <= set(args)
    assert {"--train_text_encoder=true", "--color_jitter=true", "--gradient_accumulation_steps=4",
            "--save_steps=100", "--lr_scheduler=linear"} <= set(args)  # fmt: skip
    given = translate_pti(
        ["--color_jitter=False", "--nocolor_jitter", "--save_steps", "7", "--cached_latents", "False"]
    )
    assert "--color_jitter=false" in given and "--save_steps=7" in given and "--cached_latents=off" in given
    assert "--color_jitter=true" not in given
    assert not any(a.startswith("--color_jitter") for a in translate_pti(["--config", "c.yaml"]))
    ext = translate_pti(["--lora_unet_target_modules={'CrossAttention','Attention','GEGLU','ResnetBlock2D'}"])
    assert "--use_extended_lora=true" in ext
    assert "--horizontal_flip" in translate_pti(["--horizontal_flip"])  # lora-ops' own flags pass through
    translate_pti(["--sample_batch_size=4", "--wandb_entity", "me"])
    assert "--sample_batch_size has no effect" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--log_wandb is not supported"):
        translate_pti(["--log_wandb"])


def test_lora_distill_maps_onto_distill_with_the_original_targets():
    args = translate_distill(["tuned", "base"])
    assert args == [
        "distill", "svd_distill.safetensors", "--tuned", "tuned", "--base", "base", "--rank", "4",
        "--clamp-quantile", "0.99", "--device", "auto", "--unet-targets", "unet-extended",
        "--text-encoder-targets", "text_encoder",
    ]  # fmt: skip
    assert translate_distill(["t", "b", "8", "--save_path=x.safetensors"])[1:8:6] == ["x.safetensors", "8"]
    with pytest.raises(UsageError, match="missing BASE_MODEL"):
        translate_distill(["t"])


def test_entry_points_are_declared_and_documented():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    import lora_ops.original_cli as original

    for name in ("lora_add", "lora_pti", "lora_distill"):
        module, _, func = scripts[name].partition(":")
        assert module == "lora_ops.original_cli" and callable(getattr(original, func)), name
    readme = (ROOT / "README.md").read_text()
    training = (ROOT / "docs" / "training.md").read_text()
    surgery = (ROOT / "docs" / "surgery.md").read_text()
    for name in ("lora_add", "lora_pti", "lora_distill"):
        assert re.search(rf"`{name}`[^\n]*runs? as written", readme), f"README.md: {name} is not said to run"
    assert "lora_pti \\" in training and "runs as written" in training
    for line in ("lora_add PATH_1 PATH_2 OUTPUT_PATH", "--mode=ljl", "lora_distill"):
        assert line in surgery, line


def test_help_of_the_entry_points():
    for name, words in (("lora_add", "legacy-sum-factors"), ("lora_pti", "lora-ops train pti"), ("lora_distill", "cli_svd")):  # fmt: skip
        proc = subprocess.run([str(BIN / name), "--help"], capture_output=True, text=True, env=ENV, timeout=60)
        assert proc.returncode == 0 and words in proc.stdout, (name, proc.stdout)
