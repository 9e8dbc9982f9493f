"""Combining LoRAs: exact lpl by concatenation, SVD compression error, ljl independent scales, upl into a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from surgery_utils import random_lora, run_pipe

from lora_ops import LoraFile, LoraModule, load_lora, load_pipeline, patch_pipeline, remove_lora, save_lora, set_scales
from lora_ops.cli import main as cli
from lora_ops.merge import add_to_pipeline, join_loras, load_joined, merge_loras, split_parts


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return load_pipeline(tiny_model)


@pytest.fixture(scope="module")
def loras(pipe):
    """Three LoRAs: different ranks, different module sets (a: every module incl. convs, b: every other
    module, c: text encoder only), different tokens."""
    a = random_lora(pipe, seed=10, r=4, unet="unet-extended")
    b = random_lora(pipe, seed=11, r=2, every=2, tokens=False)
    c = random_lora(pipe, seed=12, r=3, unet=None, tokens=False)
    c.tokens = {"<t>": torch.randn(32)}
    return a, b, c


def _expected(loras, weights, comp, name):
    return sum(
        w * lora.component(comp)[name].delta() for lora, w in zip(loras, weights) if name in lora.component(comp)
    )


def test_lpl_concat_reproduces_weighted_sum(loras):
    weights = [0.7, -0.3, 1.5]
    merged, report = merge_loras(loras, weights)
    assert report is None
    names = {c: set().union(*(lora.component(c) for lora in loras)) for c in ("unet", "text_encoder")}
    assert {c: set(merged.component(c)) for c in names} == names
    for comp in ("unet", "text_encoder"):
        for name, mod in merged.component(comp).items():
            expected = _expected(loras, weights, comp, name)
            assert mod.r == sum(lora.component(comp)[name].r for lora in loras if name in lora.component(comp))
            torch.testing.assert_close(mod.delta(), expected, rtol=1e-5, atol=1e-6)
    assert any(mod.is_conv for mod in merged.unet.values())
    assert sorted(merged.tokens) == ["<s1>", "<s2>", "<t>"]


def test_lpl_svd_reports_each_modules_error(loras):
    merged, report = merge_loras(loras[:2], [0.5, 0.5], mode="svd", rank=2)
    assert set(report.modules) == {f"{c}.{n}" for c in ("unet", "text_encoder") for n in merged.component(c)}
    for key, rep in list(report.modules.items())[::4]:
        comp, name = key.split(".", 1)
        mod = merged.component(comp)[name]
        exact = _expected(loras[:2], [0.5, 0.5], comp, name)
        assert mod.r == min(2, rep.rank_before)
        actual = (exact - mod.delta()).norm().item()
        assert actual == pytest.approx(rep.error, rel=1e-3, abs=1e-6)
        # the error is that of the best rank-2 approximation (Eckart–Young)
        s = torch.linalg.svdvals(exact.flatten(1).double())
        assert rep.error == pytest.approx(s[2:].pow(2).sum().sqrt().item(), rel=1e-3, abs=1e-6)
    assert 0 < report.energy < 1


def test_legacy_sum_factors_is_named_and_has_cross_terms(loras):
    a, b = loras[0], random_lora_like(loras[0], seed=5)
    merged, _ = merge_loras([a, b], [0.5, 0.5], mode="legacy-sum-factors")
    name = next(iter(a.unet))
    ma, mb = a.unet[name], b.unet[name]
    legacy = ((ma.lora_B + mb.lora_B) / 2).flatten(1) @ ((ma.lora_A + mb.lora_A) / 2).flatten(1)
    torch.testing.assert_close(merged.unet[name].delta().flatten(1), legacy)
    exact = 0.5 * ma.delta() + 0.5 * mb.delta()
    assert (merged.unet[name].delta() - exact).norm() > 1e-3 * exact.norm()


def random_lora_like(lora: LoraFile, seed: int) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    out = LoraFile(tokens=dict(lora.tokens))
    for comp in ("unet", "text_encoder"):
        for name, mod in lora.component(comp).items():
            out.component(comp)[name] = LoraModule(
                torch.randn(mod.lora_A.shape, generator=g) * 0.05, torch.randn(mod.lora_B.shape, generator=g) * 0.05
            )
    return out


def test_ljl_parts_scale_independently(pipe, loras):
    a, b, _ = loras
    joined = join_loras([a, b], names=["style", "subject"])
    parts = split_parts(joined)
    for part, original in zip(parts.values(), (a, b)):
        for key, value in original.state_dict().items():
            assert torch.equal(part.state_dict()[key], value), key
    # unscaled, the joined file is the plain sum: ΔW = ΔW_a + ΔW_b
    name = next(n for n in b.unet if n in a.unet)
    torch.testing.assert_close(joined.unet[name].delta(), a.unet[name].delta() + b.unet[name].delta())

    load_joined(pipe, joined, scales={"style": 1.0, "subject": 0.0})
    try:
        only_style = run_pipe(pipe)
        set_scales(pipe, "subject", unet=0.5, text_encoder=0.0)
        set_scales(pipe, "style", unet=0.0, text_encoder=1.0)
        mixed = run_pipe(pipe)
    finally:
        remove_lora(pipe, "style")
        remove_lora(pipe, "subject")
    patch_pipeline(pipe, a, adapter_name="a")
    try:
        reference = run_pipe(pipe)
        set_scales(pipe, "a", unet=0.0, text_encoder=1.0)
        patch_pipeline(pipe, b, adapter_name="b", unet_scale=0.5, text_encoder_scale=0.0)
        mixed_reference = run_pipe(pipe)
    finally:
        remove_lora(pipe, "a")
        remove_lora(pipe, "b")
    np.testing.assert_allclose(only_style, reference, atol=1e-5)
    np.testing.assert_allclose(mixed, mixed_reference, atol=1e-5)
    assert np.abs(only_style - mixed).max() > 1e-3


def test_upl_matches_patching_and_cli(tiny_model, pipe, loras, tmp_path):
    lora = loras[0]
    save_lora(tmp_path / "a.safetensors", lora)
    patch_pipeline(pipe, lora, adapter_name="a", unet_scale=0.6, text_encoder_scale=0.6)
    try:
        patched = run_pipe(pipe)
    finally:
        remove_lora(pipe, "a")
    out = tmp_path / "merged"
    assert (
        cli(
            [
                "add",
                "upl",
                str(tmp_path / "a.safetensors"),
                "--base",
                str(tiny_model),
                "--alpha",
                "0.6",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    merged = load_pipeline(out)
    np.testing.assert_allclose(run_pipe(merged), patched, atol=1e-4)
    # in memory too, and the number of modules changed is reported
    fresh = load_pipeline(tiny_model)
    assert add_to_pipeline(fresh, lora, 0.6, 0.6) == len(lora.unet) + len(lora.text_encoder)


def test_cli_lpl_and_ljl(loras, tmp_path):
    for i, lora in enumerate(loras[:2]):
        save_lora(tmp_path / f"{i}.safetensors", lora)
    ins = [str(tmp_path / "0.safetensors"), str(tmp_path / "1.safetensors")]
    assert cli(["add", "lpl", *ins, "--weights", "0.5", "0.25", "--out", str(tmp_path / "m.safetensors")]) == 0
    merged = load_lora(tmp_path / "m.safetensors")
    name = next(iter(loras[1].unet))
    torch.testing.assert_close(merged.unet[name].delta(), _expected(loras[:2], [0.5, 0.25], "unet", name))
    assert cli(["add", "ljl", *ins, "--names", "x", "y", "--out", str(tmp_path / "j.safetensors")]) == 0
    assert list(split_parts(load_lora(tmp_path / "j.safetensors"))) == ["x", "y"]


def test_bad_inputs(loras):
    a, b, _ = loras
    sd2 = LoraFile(
        unet={
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": LoraModule(
                torch.zeros(1, 1024), torch.zeros(64, 1)
            )
        }
    )
    sd1 = LoraFile(
        unet={
            "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k": LoraModule(
                torch.zeros(1, 768), torch.zeros(64, 1)
            )
        }
    )
    with pytest.raises(ValueError, match=r"mixed model families.*SD1 \(768\).*SD2 \(1024\)"):
        merge_loras([sd1, sd2])
    other = LoraFile(unet=b.unet, metadata={"base_model": "other/model"})
    with pytest.raises(ValueError, match="mismatched bases"):
        merge_loras([a, other])
    merge_loras([a, other], allow_mixed_bases=True)
    clash = LoraFile(unet=b.unet, tokens={"<s1>": torch.ones(32)})
    with pytest.raises(ValueError, match="token '<s1>' is in several inputs"):
        join_loras([a, clash])
    with pytest.raises(ValueError, match="weights="):
        merge_loras([a, b], [1.0])
    with pytest.raises(ValueError, match="needs rank="):
        merge_loras([a, b], mode="svd")


def test_upl_refuses_to_overwrite_the_base_model(tiny_model, tmp_path):
    import subprocess
    import sys

    lora = tmp_path / "l.safetensors"
    from lora_ops import LoraFile, save_lora

    save_lora(lora, LoraFile())
    cmd = [sys.executable, "-m", "lora_ops", "add", "upl", str(lora), "--base", str(tiny_model), "--out"]
    same = subprocess.run(cmd + [str(tiny_model)], capture_output=True, text=True)
    assert same.returncode == 2 and "base model's folder" in same.stderr
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    other = subprocess.run(cmd + [str(busy)], capture_output=True, text=True)
    assert other.returncode == 2 and "not an empty folder" in other.stderr
    assert (busy / "keep.txt").read_text() == "user data"
