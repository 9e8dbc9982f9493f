"""Pivotal tuning on the tiny model: evidence that training works, phase isolation, options, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from train_utils import pti_config

from lora_ops.dataset import DatasetConfig, ImageDataset
from lora_ops.lora_file import load_lora
from lora_ops.losses import min_snr_weights, prediction_target
from lora_ops.models import load_pipeline
from lora_ops.runtime import patch_pipeline
from lora_ops.training.batches import Source
from lora_ops.training.config import PTIConfig
from lora_ops.training.loop import run_phase
from lora_ops.training.lora import current_lora
from lora_ops.training.objective import measure_loss
from lora_ops.training.pti import (
    _init_tokens,
    inversion_phase,
    run_inversion,
    run_tuning,
    train_pti,
)
from lora_ops.training.token_rows import unwrap_token_embedding
from lora_ops.training.trainee import load_trainee

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_images(folder, n=3, size=40, masks=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = np.full((size, size, 3), 30, np.uint8)
        arr[:, :, i % 3] = 220
        arr[8:32, 8:32] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"img{i}.png")
        if masks:
            mask = np.zeros((size, size), np.uint8)
            mask[8:32, 8:32] = 255
            Image.fromarray(mask).save(folder / f"img{i}.mask.png")
    return folder


@pytest.fixture(scope="module")
def evidence(tiny_model, tmp_path_factory):
    """A full tiny PTI run: 50 inversion + 50 tuning steps, with the loss measured before and after."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pti-evidence")
    data = make_images(root / "data")
    config = pti_config(
        tiny_model,
        data,
        root / "out",
        max_train_steps_ti=50,
        max_train_steps_tuning=50,
        learning_rate_ti=5e-2,
        learning_rate_unet=3e-2,
        lora_rank=4,
        eval_noises=4,
        save_steps=50,
    )
    events = []
    began = time.perf_counter()
    result = train_pti(config, callback=lambda step, m: events.append((step, m)))
    seconds = time.perf_counter() - began
    print(f"\ntiny PTI 50+50 steps: {seconds:.1f} s wall; metrics: {json.dumps(result.metrics, indent=1)}")
    return config, result, events, seconds


def test_training_lowers_the_loss_on_the_training_images(evidence, tiny_model):
    config, result, events, seconds = evidence
    m = result.metrics
    before, after = m["inversion/eval_loss_before"], m["tuning/eval_loss_after"]
    print(f"loss on fixed noises/timesteps: before {before:.4f} -> after {after:.4f} ({after / before - 1:+.1%})")
    assert after < 0.95 * before
    assert m["tuning/eval_loss_after"] < m["tuning/eval_loss_before"]
    # the saved file alone reproduces the trained model's loss (tokens + LoRA loaded into a fresh pipeline)
    pipe = load_pipeline(tiny_model)
    dataset = ImageDataset(DatasetConfig(config.runtime.instance_data_dir, 32, ["<s1>", "<s2>"], template="object"))
    patch_pipeline(pipe, result.path)
    assert measure_loss(pipe, dataset, config.seed, 4) == pytest.approx(after, rel=1e-4)
    # progress reports: one per step, both phases, with loss and lr
    assert [s for s, _ in events] == list(range(1, 101))
    assert {m["phase"] for _, m in events} == {"inversion", "tuning"}
    assert all(np.isfinite(m["loss"]) and m["lr"] > 0 for _, m in events)
    assert [p.name for p in result.checkpoints] == ["inversion-000050", "tuning-000050"]


def test_output_file_holds_tokens_lora_and_config(evidence):
    config, result, _, _ = evidence
    lora = load_lora(result.path)
    assert list(lora.tokens) == ["<s1>", "<s2>"]
    assert lora.unet and not lora.text_encoder
    # phase 2 moved the LoRA weights (lora_B starts at zero)
    assert all(m.lora_B.abs().max() > 0 for m in lora.unet.values())
    assert lora.metadata["base_model"] == str(config.runtime.pretrained_model_name_or_path)
    saved = lora.metadata["training_config"]
    assert saved["placeholder_tokens"] == "<s1>|<s2>" and saved["max_train_steps_ti"] == 50
    assert saved["trainer"] == "pti"


def test_scale_zero_reproduces_the_base_model(evidence, tiny_model):
    _, result, _, _ = evidence
    base = load_pipeline(tiny_model)
    patched = load_pipeline(tiny_model)
    patch_pipeline(patched, result.path, unet_scale=0.0, text_encoder_scale=0.0)
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        assert torch.equal(base.unet(x, t, e).sample, patched.unet(x, t, e).sample)
        patch_pipeline(base, result.path, adapter_name="one", unet_scale=1.0)
        assert not torch.allclose(base.unet(x, t, e).sample, patched.unet(x, t, e).sample)


def test_phase_one_moves_only_the_new_token_rows(tiny_model, tmp_path):
    data = make_images(tmp_path / "data")
    config = pti_config(tiny_model, data, tmp_path / "out", max_train_steps_ti=3, learning_rate_ti=1e-2)
    trainee = load_trainee(config)
    ids = _init_tokens(trainee, ["<s1>", "<s2>"], None, 0)
    assert list(ids) == ["text_encoder"]  # one text encoder (SDXL: both)
    table = trainee.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    unet_before = {k: v.clone() for k, v in trainee.unet.state_dict().items()}
    phase, wrappers = inversion_phase(trainee, ids)
    dataset = ImageDataset(DatasetConfig(data, 32, ["<s1>", "<s2>"], template="object"))
    run_phase(trainee, phase, [Source(dataset)], lambda: current_lora(trainee, ["<s1>", "<s2>"], wrappers, {}))
    unwrap_token_embedding(trainee.text_encoder)
    after = trainee.text_encoder.get_input_embeddings().weight.detach()
    changed = (after != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(ids["text_encoder"])  # the new rows moved; every other row is bit-identical
    assert all(torch.equal(v, trainee.unet.state_dict()[k]) for k, v in unet_before.items())


def test_run_inversion_then_run_tuning_from_its_file(tiny_model, tmp_path):
    data = make_images(tmp_path / "data")
    first = run_inversion(pti_config(tiny_model, data, tmp_path / "inv", learning_rate_ti=1e-2))
    inv = load_lora(first.path)
    assert list(inv.tokens) == ["<s1>", "<s2>"] and not inv.unet and not inv.text_encoder
    second = run_tuning(
        pti_config(tiny_model, data, tmp_path / "tune", train_text_encoder=True), tokens_from=first.path
    )
    tuned = load_lora(second.path)
    assert tuned.unet and tuned.text_encoder
    for token, vector in inv.tokens.items():  # tokens are carried over unchanged without continue_inversion
        assert torch.equal(tuned.tokens[token], vector)
    # the same seed gives the same result, also when phase 2 runs on its own
    third = run_tuning(pti_config(tiny_model, data, tmp_path / "again", train_text_encoder=True), first.path)
    repeat = load_lora(third.path)
    for name, module in tuned.unet.items():
        assert torch.equal(module.lora_A, repeat.unet[name].lora_A) and torch.equal(
            module.lora_B, repeat.unet[name].lora_B
        )
    with pytest.raises(ValueError, match="holds tokens"):
        run_tuning(pti_config(tiny_model, data, tmp_path / "bad", placeholder_tokens="<x>"), tokens_from=first.path)


def test_inpainting_masks_extended_lora_and_loss_options(tiny_inpaint_model, tmp_path):
    data = make_images(tmp_path / "data", n=2, masks=True)
    config = pti_config(
        tiny_inpaint_model,
        data,
        tmp_path / "out",
        perform_inversion=False,
        train_inpainting=True,
        use_masks=True,
        mask_temperature=0.5,
        use_extended_lora=True,
        min_snr_gamma=5.0,
        noise_offset=0.05,
        train_batch_size=2,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        initializer_tokens="<rand-0.017>|<zero>",
        horizontal_flip=True,
        train_text_encoder=True,
    )
    result = train_pti(config)
    lora = load_lora(result.path)
    assert any("resnets" in name and "conv1" in name for name in lora.unet)  # ResNet convolutions got LoRA
    assert lora.text_encoder and all(m.lora_B.abs().max() > 0 for m in lora.text_encoder.values())
    assert np.isfinite(result.metrics["tuning/loss"])
    with pytest.raises(ValueError, match="9-channel"):
        train_pti(pti_config(tiny_inpaint_model, data, tmp_path / "x", perform_inversion=False))


def test_v_prediction_targets_and_min_snr(tiny_model, tmp_path):
    from diffusers import DDPMScheduler

    eps = DDPMScheduler(prediction_type="epsilon")
    vpred = DDPMScheduler(prediction_type="v_prediction")
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([1, 900])
    assert torch.equal(prediction_target(eps, latents, noise, t), noise)
    assert torch.allclose(prediction_target(vpred, latents, noise, t), vpred.get_velocity(latents, noise, t))
    w = min_snr_weights(eps, t, 5.0)
    assert w[0] < 1.0 and w[1] == pytest.approx(1.0)  # low t: high SNR, clipped; high t: SNR < γ, weight 1
    assert torch.all(min_snr_weights(vpred, t, 5.0) < 1.0)
    # a v-prediction model (SD 2.x style) trains: the scheduler's prediction_type is read
    model = tmp_path / "vpred"
    shutil.copytree(tiny_model, model)
    sched = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "prediction_type": "v_prediction"}))
    data = make_images(tmp_path / "data", n=2)
    result = train_pti(pti_config(model, data, tmp_path / "out", max_train_steps_ti=1, max_train_steps_tuning=1))
    assert load_lora(result.path).unet


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
    data = make_images(tmp_path / "data", n=2)
    config = pti_config(
        tiny_model,
        data,
        tmp_path / "out",
        perform_inversion=False,
        max_train_steps_tuning=6,
        learning_rate_unet=1e36,
        max_grad_norm=None,
        save_steps=1,
        lr_scheduler_lora="constant",
    )
    with pytest.raises(RuntimeError, match=r"loss is (nan|inf).*last good checkpoint: .*tuning-0000\d\d"):
        train_pti(config)
    assert not (tmp_path / "out" / "final_lora.safetensors").exists()  # no output file from a failed run


def test_config_validation_names_the_bad_option(tiny_model, tmp_path):
    data = make_images(tmp_path / "data", n=1)
    ok = dict(pretrained_model_name_or_path=str(tiny_model), instance_data_dir=str(data), output_dir=str(tmp_path))
    for bad, match in [
        ({"lora_rank": 0}, "lora_rank=0"),
        ({"learning_rate_ti": -1.0}, "learning_rate_ti=-1.0"),
        ({"use_template": "portrait"}, "use_template='portrait'"),
        ({"lr_scheduler": "warmup"}, "lr_scheduler='warmup'"),
        ({"mixed_precision": "fp8"}, "mixed_precision='fp8'"),
        ({"placeholder_tokens": "<a>|<a>"}, "repeated"),
        ({"initializer_tokens": "a|b|c", "placeholder_tokens": "<a>|<b>"}, "initializer_tokens"),
        ({"cached_latents": "on", "horizontal_flip": True}, "cached_latents"),
        ({"perform_inversion": False, "perform_tuning": False}, "nothing to train"),
        ({"clip_ti_decay": "yes"}, "clip_ti_decay"),
        ({"output_dir": ""}, "output_dir is required"),
    ]:
        with pytest.raises(ValueError, match=match):
            PTIConfig(**{**ok, **bad})
    with pytest.raises(ValueError, match="unknown PTIConfig option"):
        PTIConfig.from_dict({**ok, "lora_rnak": 2})
    assert PTIConfig.from_dict({**ok, "use_face_segmentation_condition": True}).data.use_masks
    with pytest.raises(ValueError, match="needs a CUDA device"):
        train_pti(PTIConfig(**ok, mixed_precision="fp16", device="cpu", use_template="object"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use_8bit_adam needs a CUDA device"):
            train_pti(PTIConfig(**ok, use_8bit_adam=True, device="cpu", use_template="object", perform_inversion=False))
    with pytest.raises(ValueError, match="no training prompt contains the placeholder tokens"):
        train_pti(PTIConfig(**ok))  # captions from file names, no template: the tokens never appear


def test_cli_runs_the_original_readme_command(tiny_model, tmp_path):
    """The documented lora_pti command, flag for flag, with a config file underneath (flags override it)."""
    data = make_images(tmp_path / "data", n=2)
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        f"pretrained_model_name_or_path: {tiny_model}\nresolution: 32\nmax_train_steps_ti: 50\nprogress: false\n"
    )
    cmd = [
        sys.executable,
        "-m",
        "lora_ops",
        "train",
        "pti",
        "--config",
        str(cfg),
        f"--instance_data_dir={data}",
        f"--output_dir={tmp_path / 'out'}",
        "--train_text_encoder",
        "--resolution=32",
        "--train_batch_size=1",
        "--gradient_accumulation_steps=2",
        "--scale_lr",
        "--learning_rate_unet=1e-4",
        "--learning_rate_text=1e-5",
        "--learning_rate_ti=5e-4",
        "--color_jitter",
        "--lr_scheduler=linear",
        "--lr_warmup_steps=0",
        "--placeholder_tokens=<s1>|<s2>",
        "--use_template=style",
        "--save_steps=100",
        "--max_train_steps_ti=2",
        "--max_train_steps_tuning=2",
        "--perform_inversion=True",
        "--clip_ti_decay",
        "--weight_decay_ti=0.000",
        "--weight_decay_lora=0.001",
        "--continue_inversion",
        "--continue_inversion_lr=1e-4",
        "--device=cpu",
        "--lora_rank=1",
        "--eval_noises=0",
        "--enable_xformers_memory_efficient_attention",  # in the original README's command: accepted, noted
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scaled-dot-product attention (SDPA) is always used" in proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    lora = load_lora(report["path"])
    assert lora.unet and lora.text_encoder and list(lora.tokens) == ["<s1>", "<s2>"]
    saved = lora.metadata["training_config"]
    assert saved["max_train_steps_ti"] == 2  # the flag beat the file
    assert saved["lora"]["r"] == 1 and saved["use_template"] == "style" and saved["continue_inversion"] is True
    assert all(m.r == 1 for m in lora.unet.values())


def test_cli_reports_bad_options_in_one_line(tiny_model, tmp_path, capsys):
    from lora_ops.cli import main

    args = ["train", "pti", f"--pretrained_model_name_or_path={tiny_model}", f"--instance_data_dir={tmp_path}"]
    assert main(args + [f"--output_dir={tmp_path}", "--lora_rank=0"]) == 2
    assert "lora-ops train: error: --lora_rank=0 must be an integer >= 1" in capsys.readouterr().err
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"output_dir": str(tmp_path), "lora_rnak": 1}))
    assert main(args + ["--config", str(cfg)]) == 2
    assert "unknown PTIConfig option(s): ['lora_rnak']" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda(tiny_model, tmp_path, precision):
    """bf16 autocast and fp16 with a gradient scaler train on CUDA (deselected where no GPU is present)."""
    data = make_images(tmp_path / "data", n=2)
    config = pti_config(
        tiny_model,
        data,
        tmp_path / "out",
        device="cuda",
        mixed_precision=precision,
        train_text_encoder=True,
        continue_inversion=True,
        max_train_steps_ti=3,
        max_train_steps_tuning=3,
        eval_noises=1,
    )
    result = train_pti(config)
    lora = load_lora(result.path)
    assert lora.unet and lora.text_encoder and list(lora.tokens) == ["<s1>", "<s2>"]
    assert all(np.isfinite(v) for v in result.metrics.values())


def test_token_norm_prior_targets_the_vocabulary_norm_by_default(tiny_model, tmp_path):
    """clip_ti_decay with ti_target_norm=None pulls the new rows to the base vocabulary's mean norm."""
    from lora_ops.training.loop import vocabulary_norm

    weight = torch.tensor([[3.0, 4.0], [0.0, 1.0], [100.0, 0.0]])
    assert vocabulary_norm(weight, torch.tensor([2])) == pytest.approx(3.0)  # (5 + 1) / 2, row 2 excluded

    data = make_images(tmp_path / "data")
    # lr 1e-2: strength min(1, 100 lr) = 1, so after every step the rows have exactly the target norm
    config = pti_config(tiny_model, data, tmp_path / "out", max_train_steps_ti=2, learning_rate_ti=1e-2)
    assert config.ti_target_norm is None and config.clip_ti_decay
    trainee = load_trainee(config)
    ids = _init_tokens(trainee, ["<s1>", "<s2>"], None, 0)
    assert list(ids) == ["text_encoder"]  # one text encoder (SDXL: both)
    table = trainee.text_encoder.get_input_embeddings().weight
    expected = vocabulary_norm(table, torch.tensor(ids["text_encoder"]))
    phase, wrappers = inversion_phase(trainee, ids)
    dataset = ImageDataset(DatasetConfig(data, 32, ["<s1>", "<s2>"], template="object"))
    run_phase(trainee, phase, [Source(dataset)], lambda: current_lora(trainee, ["<s1>", "<s2>"], wrappers, {}))
    norms = wrappers[0].rows.detach().norm(dim=-1)
    assert torch.allclose(norms, torch.full_like(norms, expected), rtol=1e-4)
    assert abs(expected - 0.4) > 0.05  # the tiny model's vocabulary is not SD's: a fixed 0.4 would be wrong here
