"""Speed options of the trainer give the eager path's numbers; the training-speed benchmark runs.

Tolerances: the optimized paths compute the same sums in another order (one batch instead of a loop over
micro-batches, traced graphs, channels-last convolutions), so in fp32 the losses agree to float rounding
(~1e-7 relative per operation, rtol 1e-5 after a few steps) and the weights to well below one AdamW step.
AdamW moves every weight by about lr per step whatever the gradient's size, so where a gradient is tiny
(lora_A while lora_B is still near zero) rounding in it shows up amplified in the update: measured up to
2e-5 with lr 1e-3; the bound is atol 1e-4, a tenth of one step (a real error, a wrong weighting or
a missing sample, moves weights by whole steps and losses by far more than rtol 1e-5).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from train_utils import benchmark_module, pti_config, random_images

from lora_ops.inject import LoraConfig, inject_lora
from lora_ops.lora_file import read_safetensors
from lora_ops.models import load_pipeline
from lora_ops.tiny import build_models
from lora_ops.training.batches import join_batches
from lora_ops.training.compile import resolve_compile
from lora_ops.training.config import PTIConfig
from lora_ops.training.loop import resolve_accumulation
from lora_ops.training.lora import inject_trainable_lora
from lora_ops.training.pti import train_pti
from lora_ops.training.trainee import Trainee, cast_frozen_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_images(folder, n=3):
    return random_images(folder, [(40, 40)] * n, seed=0)


def run(tiny_model, data, out, **kw):
    """A short PTI run; returns (per-step losses, the output file's tensors, metrics)."""
    base = dict(
        max_train_steps_ti=3,
        max_train_steps_tuning=3,
        learning_rate_ti=1e-3,
        learning_rate_unet=1e-3,
        learning_rate_text=1e-3,
        seed=5,
        device="cpu",
    )
    losses = []
    config = pti_config(tiny_model, data, out, **{**base, **kw})
    result = train_pti(config, callback=lambda step, info: losses.append(info["loss"]))
    return np.array(losses), read_safetensors(result.path)[0], result.metrics


def assert_same_training(a, b):
    losses_a, tensors_a, _ = a
    losses_b, tensors_b, _ = b
    np.testing.assert_allclose(losses_a, losses_b, rtol=1e-5)
    assert sorted(tensors_a) == sorted(tensors_b)
    for key in tensors_a:
        torch.testing.assert_close(tensors_a[key], tensors_b[key], rtol=0, atol=1e-4, msg=key)


def test_accumulation_as_one_batch_and_channels_last_match_the_loop(tiny_model, tmp_path):
    """Two accumulated micro-batches run as one batch of two (channels-last UNet) = the eager loop."""
    data = make_images(tmp_path / "data")
    common = dict(
        gradient_accumulation_steps=2,
        horizontal_flip=True,  # latents encoded per step: the generators' order matters
        train_text_encoder=True,
        continue_inversion=True,
        min_snr_gamma=5.0,
        noise_offset=0.05,
    )
    eager = run(tiny_model, data, tmp_path / "loop", accumulation="loop", **common)
    fast = run(tiny_model, data, tmp_path / "batch", accumulation="batch", channels_last=True, **common)
    assert_same_training(eager, fast)
    # the comparison can fail: another seed trains to other numbers
    other = run(tiny_model, data, tmp_path / "other", accumulation="batch", seed=6, **common)
    assert np.abs(other[0] - eager[0]).max() > 1e-3


def test_compiled_unet_matches_eager(tiny_model, tmp_path):
    """torch.compile over the UNet (traced graphs; no C compiler needed) trains to the eager numbers."""
    data = make_images(tmp_path / "data", n=2)
    kw = dict(perform_inversion=False, max_train_steps_tuning=2)
    eager = run(tiny_model, data, tmp_path / "eager", compile="none", **kw)
    traced = run(tiny_model, data, tmp_path / "traced", compile="trace", **kw)
    assert traced[2]["tuning/compiled"] == 1.0  # it really ran compiled, no silent fallback
    assert_same_training(eager, traced)


def test_cast_frozen_weights_gives_the_autocast_result():
    """bf16 base weights cast once = autocast casting fp32 weights on every call (bit for bit)."""
    torch.manual_seed(0)
    unet = build_models("tiny")["unet"]
    unet.requires_grad_(False)
    inject_lora(unet, LoraConfig(target_modules="unet", r=4))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    x, t, e = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)

    def forward_and_grads():
        unet.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t, e).sample
        out.float().pow(2).mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}

    before, grads_before = forward_and_grads()
    assert cast_frozen_weights(unet, torch.bfloat16) > 20
    dtypes = {n: p.dtype for n, p in unet.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "norm" in n)
    assert dtypes["conv_in.weight"] == torch.bfloat16
    after, grads_after = forward_and_grads()
    assert torch.equal(before, after)
    for name in grads_before:
        assert torch.equal(grads_before[name], grads_after[name]), name


def test_lora_weights_are_fp32_after_a_phase_with_bf16_base_weights(tiny_model, tmp_path):
    """Phase 2 injects LoRA into layers that phase 1 cast to bf16: the new LoRA weights are still fp32."""
    pipe = load_pipeline(str(tiny_model), device="cpu")
    config = PTIConfig(
        pretrained_model_name_or_path=str(tiny_model),
        instance_data_dir=str(tmp_path),
        output_dir=str(tmp_path),
        train_text_encoder=True,
    )
    trainee = Trainee(pipe, None, torch.device("cpu"), torch.bfloat16, config)
    for module in (pipe.unet, pipe.text_encoder):
        module.requires_grad_(False)
        assert cast_frozen_weights(module, torch.bfloat16) > 0
    groups = inject_trainable_lora(trainee, config)
    trained = [p for g in groups for p in g["params"].values()]
    assert trained and all(p.dtype == torch.float32 for p in trained)


def test_join_batches_weights_each_sample_by_its_share():
    a = {"latents": torch.zeros(1, 4, 2, 2), "noise": torch.ones(1, 4, 2, 2), "timesteps": torch.tensor([3])}
    a |= {"masks": None, "pixel_weights": None, "inpaint_cond": None, "time_ids": None}
    a |= {"prompts": ["x"], "sample_weights": torch.ones(1)}
    b = {**a, "prompts": ["y"], "timesteps": torch.tensor([7])}
    joined = join_batches([a, b], 2)
    assert joined["latents"].shape == (2, 4, 2, 2) and joined["prompts"] == ["x", "y"]
    assert joined["timesteps"].tolist() == [3, 7] and joined["sample_weights"].tolist() == [0.5, 0.5]
    assert joined["masks"] is None


def test_speed_option_defaults_and_validation(tmp_path):
    base = dict(pretrained_model_name_or_path="m", instance_data_dir="d", output_dir=str(tmp_path))
    config = PTIConfig(**base)
    assert resolve_compile(config.compute.compile, torch.device("cpu")) == "none"
    assert resolve_compile(config.compute.compile, torch.device("cuda")) == "reduce-overhead"
    assert resolve_accumulation(config) == "batch"
    assert resolve_accumulation(PTIConfig(**base, lora_dropout_p=0.1)) == "loop"
    assert resolve_accumulation(PTIConfig(**base, gradient_checkpointing=True)) == "loop"
    with pytest.raises(ValueError, match="compile='fast'"):
        PTIConfig(**base, compile="fast")
    with pytest.raises(ValueError, match="accumulation='both'"):
        PTIConfig(**base, accumulation="both")


def test_benchmark_runs_and_reports(tmp_path):
    """`benchmarks/train_speed.py` on the tiny model: every variant, ratios, table, JSON, PTI end to end."""
    train_speed = benchmark_module("train_speed")
    out = tmp_path / "bench.json"
    args = ["--arch", "tiny", "--batch", "2", "--warmup", "1", "--repeats", "2", "--device", "cpu"]
    train_speed.main([*args, "--pti-e2e", "--steps", "2", "--json", str(out)])
    result = json.loads(out.read_text())
    variants = [r["variant"] for r in result["rows"]]
    assert variants == [
        "reference LoRA loop (a)",
        "full fine-tune (b)",
        "trainer: inversion (c)",
        "trainer: LoRA tuning (c)",
    ]
    for row in result["rows"]:
        assert row["ms_per_step"] > 0 and row["steps_timed"] == 2 and row["peak_gib"] is None
        assert row["samples_per_s"] == pytest.approx(2 / (row["ms_per_step"] / 1000))
        assert row["vs_reference"] > 0 and row["vs_full"] > 0
    assert result["rows"][0]["vs_reference"] == pytest.approx(1.0)
    assert "| trainer: LoRA tuning (c) |" in result["table"]
    e2e = result["pti_e2e"]
    assert e2e["steps_per_phase"] == 2 and e2e["effective_batch"] == 4
    assert 0 < e2e["inversion_loop_s"] < e2e["total_s"] and 0 < e2e["tuning_loop_s"] < e2e["total_s"]


def test_benchmark_runs_on_sdxl(tmp_path):
    """The SDXL variant of the benchmark (both text encoders, pooled embeddings, size conditioning) on the tiny
    SDXL: what a GPU run at 1024 px (`--arch sdxl`) measures speed and peak memory with."""
    train_speed = benchmark_module("train_speed")
    out = tmp_path / "bench.json"
    args = ["--arch", "sdxl-tiny", "--batch", "1", "--warmup", "1", "--repeats", "2", "--device", "cpu"]
    train_speed.main([*args, "--gradient-checkpointing", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["meta"]["arch"] == "sdxl-tiny" and result["meta"]["gradient_checkpointing"] is True
    assert [r["variant"] for r in result["rows"]][-1] == "trainer: LoRA tuning (c)"
    assert all(r["ms_per_step"] > 0 and r["steps_timed"] == 2 for r in result["rows"])
    assert "sdxl-tiny, batch 1, 32 px, rank 4" in result["table"] and "gradient checkpointing" in result["table"]
    args = train_speed.parse_args(["--arch", "sdxl"])
    assert args.resolution == 1024


@pytest.mark.gpu
def test_cuda_graphs_match_eager_on_cuda(tiny_model, tmp_path):
    """On CUDA the default (reduce-overhead: CUDA graphs, bf16 base weights) trains like eager bf16."""
    data = make_images(tmp_path / "data", n=2)
    kw = dict(device="cuda", mixed_precision="bf16", max_train_steps_ti=3, max_train_steps_tuning=3)
    eager = run(tiny_model, data, tmp_path / "eager", compile="none", cast_base_weights=False, **kw)
    fast = run(tiny_model, data, tmp_path / "fast", compile="auto", **kw)
    assert fast[2]["tuning/compiled"] == 1.0
    # bf16: losses agree to bf16 rounding of the activations (~1e-2 relative)
    np.testing.assert_allclose(eager[0], fast[0], rtol=2e-2)


def test_checkpoint_from_before_the_speed_options_resumes(tiny_model, tmp_path):
    """A checkpoint whose config lacks the speed options resumes while they have their defaults."""
    from lora_ops.training.checkpoints import list_checkpoints

    data = make_images(tmp_path / "data", n=2)
    kw = dict(perform_inversion=False, max_train_steps_tuning=2, save_steps=1)
    run(tiny_model, data, tmp_path / "out", **kw)
    first = list_checkpoints(tmp_path / "out")[0]
    state = torch.load(first / "state.pt", weights_only=True)
    for key in ("compile", "accumulation", "channels_last", "cast_base_weights"):
        del state["config"][key]
    torch.save(state, first / "state.pt")
    losses, _, _ = run(tiny_model, data, tmp_path / "out", resume=str(first), **kw)
    assert len(losses) == 1  # the second step only
    with pytest.raises(ValueError, match=r"options changed since the checkpoint: \['channels_last'\]"):
        run(tiny_model, data, tmp_path / "out", resume=str(first), channels_last=True, **kw)
