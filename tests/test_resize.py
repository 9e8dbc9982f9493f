"""Resize: QR + small SVD equals the dense truncated SVD; dynamic ranks by energy / Frobenius ratio; CLI."""

from __future__ import annotations

import pytest
import torch

from lora_ops import LoraFile, LoraModule, load_lora, save_lora
from lora_ops.cli import main as cli
from lora_ops.resize import ResizeConfig, resize_lora


def _known_spectrum(out: int, inp: int, s: list[float], seed: int, conv: bool = False) -> LoraModule:
    """A LoRA whose ΔW has singular values `s` exactly: B = U diag(s), A = Vᵀ with orthonormal U, V."""
    g = torch.Generator().manual_seed(seed)
    k = 3 * 3 if conv else 1
    u, _ = torch.linalg.qr(torch.randn(out, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp * k, len(s), generator=g, dtype=torch.float64))
    b = (u * torch.tensor(s, dtype=torch.float64)).float()
    a = v.T.float()
    if conv:
        return LoraModule(a.reshape(len(s), inp, 3, 3), b.reshape(out, len(s), 1, 1))
    return LoraModule(a, b)


@pytest.fixture
def lora():
    return LoraFile(
        unet={
            "lin": _known_spectrum(40, 24, [8, 4, 2, 1, 0.5, 0.25], seed=0),
            "conv": _known_spectrum(16, 8, [5, 5, 1, 0.1], seed=1, conv=True),
        },
        text_encoder={"text_model.q": _known_spectrum(32, 32, [3, 1e-3, 1e-4], seed=2)},
        tokens={"<s1>": torch.ones(32)},
    )


def test_fixed_rank_is_the_best_approximation(lora):
    out, report = resize_lora(lora, ResizeConfig(mode="rank", rank=2), progress=False)
    for comp in ("unet", "text_encoder"):
        for name, mod in lora.component(comp).items():
            dense = mod.delta().flatten(1).double()
            u, s, vh = torch.linalg.svd(dense, full_matrices=False)
            best = (u[:, :2] * s[:2]) @ vh[:2]
            new = out.component(comp)[name]
            assert new.r == 2 and new.lora_A.shape[1:] == mod.lora_A.shape[1:]
            torch.testing.assert_close(new.delta().flatten(1).double(), best, rtol=1e-4, atol=1e-5)
            rep = report.modules[f"{comp}.{name}"]
            assert rep.error == pytest.approx(s[2:].pow(2).sum().sqrt().item(), rel=1e-4, abs=1e-6)
    assert out.tokens.keys() == lora.tokens.keys()
    # total energy: kept Σ s² over all Σ s²
    total = 8**2 + 4**2 + 2**2 + 1 + 0.25 + 0.0625 + 25 + 25 + 1 + 0.01 + 9 + 1e-6 + 1e-8
    kept = 64 + 16 + 25 + 25 + 9 + 1e-6
    assert report.energy == pytest.approx(kept / total, rel=1e-5)


def test_dynamic_ranks_by_energy_and_frobenius(lora):
    out, report = resize_lora(lora, ResizeConfig(mode="energy", threshold=0.98), progress=False)
    # lin: s² = 64, 16, 4, 1, …: 64+16 = 80/85.31 = 0.938, +4 = 0.985 -> rank 3
    assert out.unet["lin"].r == 3 and out.unet["conv"].r == 2 and out.text_encoder["text_model.q"].r == 1
    assert all(rep.energy >= 0.98 for rep in report.modules.values())
    out, _ = resize_lora(lora, ResizeConfig(mode="frobenius", threshold=0.98), progress=False)
    # Frobenius ratio 0.98 = energy 0.9604: lin needs rank 3 (0.938 < 0.9604 ≤ 0.985)
    assert out.unet["lin"].r == 3
    out, _ = resize_lora(lora, ResizeConfig(mode="energy", threshold=0.999999, rank=2), progress=False)
    assert max(m.r for m in out.unet.values()) == 2  # rank caps the dynamic choice


def test_rank_deficient_factors(lora):
    """A zero lora_B (a fresh LoRA) or repeated factors (a concatenation) give finite, exact results."""
    mod = lora.unet["lin"]
    zero = LoraFile(unet={"z": LoraModule(mod.lora_A, torch.zeros_like(mod.lora_B))})
    out, report = resize_lora(zero, ResizeConfig(mode="rank", rank=2), progress=False)
    assert torch.equal(out.unet["z"].delta(), torch.zeros_like(mod.delta())) and report.energy == 1.0
    twice = LoraFile(
        unet={"t": LoraModule(torch.cat([mod.lora_A, mod.lora_A]), torch.cat([mod.lora_B, mod.lora_B], 1))}
    )
    out, _ = resize_lora(twice, ResizeConfig(mode="rank", rank=6), progress=False)
    torch.testing.assert_close(out.unet["t"].delta(), 2 * mod.delta(), rtol=1e-4, atol=1e-5)


def test_bad_config():
    with pytest.raises(ValueError, match="needs rank="):
        ResizeConfig(mode="rank")
    with pytest.raises(ValueError, match="threshold=1.5"):
        ResizeConfig(mode="energy", threshold=1.5)
    with pytest.raises(ValueError, match="mode='svd'"):
        ResizeConfig(mode="svd", rank=1)


def test_cli_resize(lora, tmp_path, capsys):
    save_lora(tmp_path / "in.safetensors", lora)
    assert cli(["resize", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), "--energy", "0.98"]) == 0
    printed = capsys.readouterr().out
    assert "total kept energy" in printed and "unet.lin" in printed
    assert load_lora(tmp_path / "out.safetensors").ranks()["unet"] == {"lin": 3, "conv": 2}
    assert cli(["resize", str(tmp_path / "in.safetensors"), str(tmp_path / "o2.safetensors")]) == 2
