"""Re-rank a LoRA without forming the dense ΔW: QR of the factors, SVD of the small core.

For ΔW = B A with B (out, r) and A (r, in):

    B = Qb Rb,  Aᵀ = Qa Ra          (thin QR: Qb (out, r), Qa (in, r), Rb, Ra (r, r))
    ΔW = Qb (Rb Raᵀ) Qaᵀ = (Qb U) S (Qa V)ᵀ   with  Rb Raᵀ = U S Vᵀ  (an r × r SVD)

so the singular values of ΔW come from an r × r matrix, and the best rank-k approximation is
B' = Qb U_k √S_k, A' = √S_k V_kᵀ Qaᵀ. Q is never formed: B' = B (Rb⁻¹ U_k √S_k) and
A' = (√S_k V_kᵀ Ra⁻ᵀ) A. The cost is O((out + in) r²) per module instead of O(out · in · min(out, in)).
Conv2d factors are flattened to (r, in·kh·kw) and reshaped back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from tqdm.auto import tqdm

from .lora_file import COMPONENTS, LoraFile, LoraModule

Mode = Literal["rank", "energy", "frobenius"]


@dataclass
class ResizeConfig:
    """How to choose each module's new rank.

    Args:
        mode: "rank" (a fixed rank), "energy" (the smallest rank keeping `threshold` of Σ s²), or
            "frobenius" (the smallest rank with ‖ΔW_k‖_F / ‖ΔW‖_F ≥ `threshold`).
        rank: the fixed rank (mode "rank"), or the largest rank allowed (dynamic modes; None: no cap).
        threshold: kept fraction in (0, 1] for the dynamic modes.
        device: where the maths runs ("cpu", "cuda").
    """

    mode: Mode = "rank"
    rank: int | None = None
    threshold: float = 0.99
    device: str = "cpu"

    def __post_init__(self):
        if self.mode not in ("rank", "energy", "frobenius"):
            raise ValueError(f"mode={self.mode!r} is not one of rank, energy, frobenius")
        if self.rank is not None and (not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"rank={self.rank!r} must be a positive integer")
        if self.mode == "rank" and self.rank is None:
            raise ValueError("mode='rank' needs rank=")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold={self.threshold!r} must be in (0, 1]")


@dataclass
class ModuleReport:
    """One module's resize: ranks, kept energy fraction (Σ kept s² / Σ s²), Frobenius error ‖ΔW - ΔW'‖."""

    rank_before: int
    rank_after: int
    energy: float
    error: float
    norm: float


@dataclass
class ResizeReport:
    modules: dict[str, ModuleReport] = field(default_factory=dict)
    kept_sq: float = 0.0
    total_sq: float = 0.0

    @property
    def energy(self) -> float:
        """Kept fraction of Σ‖ΔW‖_F² over all modules."""
        return self.kept_sq / self.total_sq if self.total_sq > 0 else 1.0

    def table(self) -> str:
        lines = [f"{'module':<90} {'r':>4} {'->':>2} {'r':>4} {'energy':>8} {'error':>10}"]
        for name, m in self.modules.items():
            lines.append(f"{name:<90} {m.rank_before:>4} -> {m.rank_after:>4} {m.energy:>8.4f} {m.error:>10.3e}")
        lines.append(f"total kept energy: {self.energy:.6f} over {len(self.modules)} modules")
        return "\n".join(lines)


def _core(mod: LoraModule, device: str):
    """b (out, r), a (r, in'), the R factors of B and Aᵀ (r, r), and the SVD of the core Rb Raᵀ."""
    a = mod.lora_A.to(device, torch.float32).flatten(1)  # (r, in')
    b = mod.lora_B.to(device, torch.float32).flatten(1)  # (out, r)
    rb = torch.linalg.qr(b, mode="r").R  # (r, r); B = Qb Rb
    ra = torch.linalg.qr(a.T, mode="r").R  # (r, r); Aᵀ = Qa Ra
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # r × r core: ΔW = (Qb U) S (Qa Vhᵀ)ᵀ
    return b, a, rb, ra, u, s, vh


def _well_conditioned(r: torch.Tensor) -> bool:
    d = r.diagonal().abs()
    return bool(d.numel() and d.min() > 1e-6 * d.max())


def factor_svd(mod: LoraModule, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ΔW = U diag(S) Vh without the dense matrix: U (out, r), S (r,), Vh (r, in·kh·kw), float32."""
    a = mod.lora_A.to(device, torch.float32).flatten(1)  # (r, in')
    b = mod.lora_B.to(device, torch.float32).flatten(1)  # (out, r)
    qb, rb = torch.linalg.qr(b)  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(a.T)  # (in', r), (r, r)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    return qb @ u, s, vh @ qa.T


def choose_rank(s: torch.Tensor, config: ResizeConfig) -> int:
    """The kept rank for singular values `s` (descending) under `config` (at least 1)."""
    cap = len(s) if config.rank is None else min(config.rank, len(s))
    if config.mode == "rank":
        return cap
    sq = s.double() ** 2
    total = sq.sum().item()
    if total == 0:
        return 1
    kept = torch.cumsum(sq, 0) / total  # kept energy fraction at rank 1..r
    target = config.threshold if config.mode == "energy" else config.threshold**2
    k = int((kept < target - 1e-12).sum().item()) + 1
    return max(1, min(k, cap))


def _shaped(a: torch.Tensor, b: torch.Tensor, like: LoraModule) -> LoraModule:
    k = a.shape[0]
    a = a.reshape(k, *like.lora_A.shape[1:]).cpu().contiguous()
    b = b.reshape(like.lora_B.shape[0], k, *like.lora_B.shape[2:]).cpu().contiguous()
    return LoraModule(a, b)


def truncate(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, k: int, like: LoraModule) -> LoraModule:
    """The rank-k LoRA B' = U_k √S_k, A' = √S_k V_kᵀ, shaped like `like` (Linear or Conv2d)."""
    root = s[:k].sqrt()
    return _shaped(root[:, None] * vh[:k], u[:, :k] * root, like)


def resize_module(mod: LoraModule, config: ResizeConfig) -> tuple[LoraModule, ModuleReport]:
    """The best rank-k approximation of one module's ΔW, k chosen by `config`.

    Only the R factors are computed (QR without Q); the new factors are then
    B' = Qb U_k √S_k = B (Rb⁻¹ U_k √S_k) and A' = √S_k V_kᵀ Qaᵀ = (√S_k V_kᵀ Ra⁻ᵀ) A, two small triangular
    solves and two thin products. A rank-deficient factor (e.g. B = 0) takes the full-QR path instead.
    """
    b, a, rb, ra, u, s, vh = _core(mod, config.device)
    k = choose_rank(s, config)
    sq = s.double() ** 2
    total, kept = sq.sum().item(), sq[:k].sum().item()
    report = ModuleReport(
        rank_before=mod.r,
        rank_after=k,
        energy=kept / total if total > 0 else 1.0,
        error=math.sqrt(max(total - kept, 0.0)),
        norm=math.sqrt(total),
    )
    if not (_well_conditioned(rb) and _well_conditioned(ra)):
        return truncate(*factor_svd(mod, config.device), k, mod), report
    root = s[:k].sqrt()
    left = torch.linalg.solve_triangular(rb, u[:, :k] * root, upper=True)  # (r, k) = Rb⁻¹ U_k √S_k
    right = torch.linalg.solve_triangular(ra, vh[:k].T * root, upper=True)  # (r, k) = Ra⁻¹ V_k √S_k
    return _shaped(right.T @ a, b @ left, mod), report


def resize_lora(lora: LoraFile, config: ResizeConfig, progress: bool = True) -> tuple[LoraFile, ResizeReport]:
    """Every module of `lora` re-ranked by `config`; tokens and metadata are kept.

    A fixed rank above a module's current rank keeps that module's rank (padding adds nothing).
    """
    out = LoraFile(tokens=dict(lora.tokens), tokens_2=dict(lora.tokens_2), metadata=dict(lora.metadata))
    report = ResizeReport()
    items = [(c, n, m) for c in COMPONENTS for n, m in lora.component(c).items()]
    for comp, name, mod in tqdm(items, desc="resize", disable=not progress):
        new, rep = resize_module(mod, config)
        out.component(comp)[name] = new
        report.modules[f"{comp}.{name}"] = rep
        report.total_sq += rep.norm**2
        report.kept_sq += rep.norm**2 - rep.error**2
    out.metadata["resize"] = {"mode": config.mode, "rank": config.rank, "threshold": config.threshold}
    return out, report
