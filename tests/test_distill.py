"""SVD distillation on the tiny model: exact recovery of a known low-rank ΔW, truncation error, CLI."""

from __future__ import annotations

import copy

import pytest
import torch

from lora_ops import load_lora, load_pipeline
from lora_ops.cli import main as cli
from lora_ops.distill import DistillConfig, distill
from lora_ops.targets import canonical_name, resolve_targets


@pytest.fixture(scope="module")
def models(tiny_model):
    """(base, tuned, known ΔW per module): tuned = base + a rank-2 ΔW with known singular values on every
    targeted UNet layer (attention, GEGLU, resnet convs) and text-encoder attention layer."""
    pipe = load_pipeline(tiny_model)
    base = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    tuned = {k: copy.deepcopy(v) for k, v in base.items()}
    g = torch.Generator().manual_seed(0)
    deltas = {}
    with torch.no_grad():
        for comp, preset in (("unet", "unet-extended"), ("text_encoder", "text_encoder")):
            for name in resolve_targets(base[comp], preset):
                w = tuned[comp].get_submodule(name).weight
                flat = w.flatten(1)
                u, _ = torch.linalg.qr(torch.randn(flat.shape[0], 2, generator=g, dtype=torch.float64))
                v, _ = torch.linalg.qr(torch.randn(flat.shape[1], 2, generator=g, dtype=torch.float64))
                delta = ((u * torch.tensor([0.5, 0.2], dtype=torch.float64)) @ v.T).float().reshape(w.shape)
                w += delta
                # what the tuned model really holds, after float32 rounding of W + ΔW
                deltas[f"{comp}.{canonical_name(comp, name)}"] = (w - base[comp].get_submodule(name).weight).clone()
    return pipe, base, tuned, deltas


def test_known_rank_recovered_exactly(models):
    _, base, tuned, deltas = models
    config = DistillConfig(rank=2, unet_targets="unet-extended", clamp_quantile=1.0, device="cpu")
    lora, report = distill(tuned, base, config, progress=False)
    assert len(report.modules) == len(deltas) and not report.unchanged
    assert any(m.is_conv for m in lora.unet.values())
    for key, delta in deltas.items():
        comp, name = key.split(".", 1)
        torch.testing.assert_close(lora.component(comp)[name].delta(), delta, rtol=1e-4, atol=1e-6)


def test_truncation_error_is_the_discarded_singular_values(models):
    _, base, tuned, deltas = models
    config = DistillConfig(rank=1, unet_targets="unet-extended", clamp_quantile=1.0, device="cpu")
    lora, report = distill(tuned, base, config, progress=False)
    for key, (r, _norm, svd_err, err) in report.modules.items():
        assert r == 1
        s = torch.linalg.svdvals(deltas[key].flatten(1).double())
        assert svd_err == pytest.approx(s[1:].pow(2).sum().sqrt().item(), rel=1e-3)
        assert svd_err == pytest.approx(0.2, rel=1e-2)  # the second known singular value
        assert err == pytest.approx(svd_err, rel=1e-3)


def test_randomized_and_clamped(models):
    _, base, tuned, deltas = models
    lora, _ = distill(tuned, base, DistillConfig(rank=2, method="randomized", clamp_quantile=1.0), progress=False)
    key = next(k for k in deltas if k.endswith("attn2.to_k"))
    torch.testing.assert_close(lora.unet[key[5:]].delta(), deltas[key], rtol=1e-3, atol=1e-5)
    # the default clamp (0.99 quantile, as the original) trims outliers: close, not exact
    clamped, report = distill(tuned, base, DistillConfig(rank=2), progress=False)
    errs = [err / norm for _, norm, _, err in report.modules.values()]
    assert max(errs) > 1e-4 and max(errs) < 0.5
    assert clamped.unet[key[5:]].lora_B.abs().max() <= lora.unet[key[5:]].lora_B.abs().max() + 1e-6


def test_mismatched_bases(models, tiny_inpaint_model):
    _, base, tuned, _ = models
    inpaint = {"unet": load_pipeline(tiny_inpaint_model).unet, "text_encoder": tuned["text_encoder"]}
    with pytest.raises(ValueError, match=r"mismatched bases: unet\.conv_in is \(32, 9, 3, 3\)"):
        distill(inpaint, base, DistillConfig(rank=1, unet_targets=["conv_in"]), progress=False)
    with pytest.raises(ValueError, match="rank=0"):
        DistillConfig(rank=0)


def test_cli_distill(models, tiny_model, tmp_path, capsys):
    pipe, _, tuned, _ = models
    folder = tmp_path / "tuned"
    tuned_pipe = type(pipe)(**{**pipe.components, "unet": tuned["unet"], "text_encoder": tuned["text_encoder"]})
    tuned_pipe.save_pretrained(folder)
    out = tmp_path / "d.safetensors"
    args = ["distill", str(out), "--tuned", str(folder), "--base", str(tiny_model), "--rank", "2"]
    assert cli([*args, "--clamp-quantile", "1", "--device", "cpu"]) == 0
    assert "modules distilled" in capsys.readouterr().out
    lora = load_lora(out)
    assert lora.unet and lora.text_encoder and lora.metadata["base_model"] == str(tiny_model)
    assert cli([*args, "--rank", "0"]) == 2


@pytest.mark.gpu
def test_distill_and_resize_on_cuda_match_cpu(models):
    from lora_ops.resize import ResizeConfig, resize_lora

    if not torch.cuda.is_available():
        pytest.fail("the gpu marker needs a CUDA device; deselect it with -m 'not gpu'")
    _, base, tuned, _ = models
    config = dict(rank=2, clamp_quantile=1.0)
    cpu, _ = distill(tuned, base, DistillConfig(device="cpu", **config), progress=False)
    gpu, _ = distill(tuned, base, DistillConfig(device="cuda", **config), progress=False)
    for name, mod in cpu.unet.items():
        torch.testing.assert_close(gpu.unet[name].delta(), mod.delta(), rtol=1e-3, atol=1e-5)
    small_cpu, _ = resize_lora(cpu, ResizeConfig(rank=1), progress=False)
    small_gpu, _ = resize_lora(cpu, ResizeConfig(rank=1, device="cuda"), progress=False)
    for name, mod in small_cpu.unet.items():
        torch.testing.assert_close(small_gpu.unet[name].delta(), mod.delta(), rtol=1e-3, atol=1e-5)
