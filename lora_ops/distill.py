"""SVD distillation: a fully fine-tuned model as a LoRA against its base.

For every targeted Linear / Conv2d of the UNet and text encoder, ΔW = W_tuned - W_base (flattened to
(out, in·kh·kw)) is factored by SVD and truncated to rank r: lora_B = U_r S_r, lora_A = V_rᵀ. As in the
original tooling, the factors are then clamped to the `clamp_quantile` quantile of their values
(default 0.99), which trims rare outliers at a small cost in accuracy; clamp_quantile=1 keeps the exact
truncated SVD (error = √Σ discarded s²). Learned tokens the tuned tokenizer has and the base lacks
are carried over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from .devices import resolve_device
from .lora_file import LoraFile, LoraModule
from .models import components, is_single_file, load_pipeline
from .targets import canonical_name, resolve_targets


@dataclass
class DistillConfig:
    """What to distill and how.

    Args:
        rank: the LoRA rank r (capped per module at min(out, in·kh·kw)).
        unet_targets: preset ("unet", "unet-extended") or module names/regexes of the UNet; None: skip.
        text_encoder_targets: the same for the text encoder ("text_encoder"), both of SDXL's; None: skip.
        clamp_quantile: clamp the factors to this quantile of their values (1.0: no clamp).
        method: "full" (exact SVD) or "randomized" (torch.svd_lowrank; faster on large layers).
        oversample, niter: randomized SVD's extra columns and power iterations.
        device: "auto" (CUDA when available), "cpu", "cuda", ...
    """

    rank: int = 4
    unet_targets: str | list[str] | None = "unet"
    text_encoder_targets: str | list[str] | None = "text_encoder"
    clamp_quantile: float = 0.99
    method: Literal["full", "randomized"] = "full"
    oversample: int = 8
    niter: int = 4
    device: str = "auto"

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be a positive integer")
        if not 0.0 < self.clamp_quantile <= 1.0:
            raise ValueError(f"clamp_quantile={self.clamp_quantile!r} must be in (0, 1]")
        if self.method not in ("full", "randomized"):
            raise ValueError(f"method={self.method!r} is not one of full, randomized")
        if self.unet_targets is None and self.text_encoder_targets is None:
            raise ValueError("unet_targets and text_encoder_targets are both None: nothing to distill")


@dataclass
class DistillReport:
    """Per module: (rank, ‖ΔW‖_F, truncation error √Σ discarded s², actual error ‖ΔW - B A‖_F)."""

    modules: dict[str, tuple[int, float, float, float]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"{'module':<90} {'r':>4} {'|dW|':>10} {'svd err':>10} {'error':>10}"]
        for name, (r, norm, svd_err, err) in self.modules.items():
            lines.append(f"{name:<90} {r:>4} {norm:>10.3e} {svd_err:>10.3e} {err:>10.3e}")
        lines.append(f"{len(self.modules)} modules distilled, {len(self.unchanged)} unchanged (skipped)")
        return "\n".join(lines)


def _components(model: Any, model_config: Any = None) -> dict[str, Any]:
    """{"unet", "text_encoder", "text_encoder_2" (SDXL), "tokenizer"?, "tokenizer_2"?} of a pipeline, a dict, a diffusers folder or
    a one-file checkpoint (loaded; `model_config` as `load_pipeline`'s `config`)."""
    if isinstance(model, (str, Path)) and is_single_file(model):
        model = load_pipeline(model, config=model_config)
    if hasattr(model, "unet"):
        tokenizers = {name: getattr(model, name, None) for name in ("tokenizer", "tokenizer_2")}
        return {**components(model), **{k: v for k, v in tokenizers.items() if v is not None}}
    if isinstance(model, dict):
        return model
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = Path(model)
    if not (folder / "model_index.json").is_file():
        raise ValueError(f"{model}: not a diffusers model folder (no model_index.json)")
    out = {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet"),
        "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
    }
    if (folder / "text_encoder_2" / "config.json").is_file():
        out["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2")
        out["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2")
    return out


def _clamp_value(u: torch.Tensor, vh: torch.Tensor, q: float) -> float:
    """The q-quantile of all factor values (kthvalue: no size limit, unlike torch.quantile)."""
    values = torch.cat([u.flatten(), vh.flatten()])
    k = max(1, min(values.numel(), math.ceil(q * values.numel())))
    return values.kthvalue(k).values.item()


def distill_delta(delta: torch.Tensor, config: DistillConfig) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(U_r S_r (out, r), V_rᵀ (r, in'), truncation error) of a 2-D ΔW, clamped as configured."""
    r = min(config.rank, *delta.shape)
    if config.method == "randomized":
        q = min(r + config.oversample, *delta.shape)
        u, s, v = torch.svd_lowrank(delta, q=q, niter=config.niter)
        vh = v.T
        discarded_sq = max(delta.pow(2).sum().item() - s[:r].double().pow(2).sum().item(), 0.0)
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        discarded_sq = s[r:].double().pow(2).sum().item()
    u, vh = u[:, :r] * s[:r], vh[:r]
    if config.clamp_quantile < 1.0:
        hi = _clamp_value(u, vh, config.clamp_quantile)
        u, vh = u.clamp(-hi, hi), vh.clamp(-hi, hi)
    return u, vh, math.sqrt(discarded_sq)


@torch.no_grad()
def distill(
    tuned: Any, base: Any, config: DistillConfig | None = None, progress: bool = True, model_config: Any = None
) -> tuple[LoraFile, DistillReport]:
    """A LoRA approximating `tuned` - `base` (pipelines, {"unet", "text_encoder"} dicts, folders, or one-file
    checkpoints: a community fine-tune extracted as a LoRA against its base).

    Args:
        model_config: for one-file checkpoints: a diffusers folder or hub id of their architecture (configs,
            tokenizer), as `load_pipeline`'s `config`.

    Raises ValueError when the two models' targeted layers differ in shape (mismatched bases).
    """
    config = config or DistillConfig()
    device = resolve_device(config.device)
    tuned_c, base_c = _components(tuned, model_config), _components(base, model_config)
    lora, report = LoraFile(), DistillReport()
    jobs = []
    text_encoders = ["text_encoder"] + (["text_encoder_2"] if "text_encoder_2" in base_c else [])  # SDXL: both
    for comp, targets in [("unet", config.unet_targets)] + [(c, config.text_encoder_targets) for c in text_encoders]:
        if targets is None:
            continue
        if comp not in tuned_c:
            raise ValueError(f"mismatched bases: the base has a {comp}, the tuned model has none")
        names = resolve_targets(base_c[comp], targets)
        for name in names:
            jobs.append((comp, name))
    for comp, name in tqdm(jobs, desc="distill", disable=not progress):
        layer_b = base_c[comp].get_submodule(name)
        try:
            layer_t = tuned_c[comp].get_submodule(name)
        except AttributeError:
            raise ValueError(f"mismatched bases: the tuned {comp} has no module {name!r}") from None
        if not isinstance(layer_t, (nn.Linear, nn.Conv2d)) or layer_t.weight.shape != layer_b.weight.shape:
            raise ValueError(
                f"mismatched bases: {comp}.{name} is {tuple(layer_t.weight.shape)} in the tuned model and "
                f"{tuple(layer_b.weight.shape)} in the base"
            )
        w = layer_b.weight
        delta = (layer_t.weight.to(device, torch.float32) - w.to(device, torch.float32)).flatten(1)  # (out, in')
        key = canonical_name(comp, name)
        if not delta.any():
            report.unchanged.append(f"{comp}.{key}")
            continue
        u, vh, svd_err = distill_delta(delta, config)
        err = (delta - u @ vh).norm().item()
        lora_a = vh.reshape(vh.shape[0], *w.shape[1:]).cpu().contiguous()  # (r, in[, kh, kw])
        lora_b = u.reshape(w.shape[0], u.shape[1], *([1, 1] if w.ndim == 4 else [])).cpu().contiguous()
        lora.component(comp)[key] = LoraModule(lora_a, lora_b)
        report.modules[f"{comp}.{key}"] = (u.shape[1], delta.norm().item(), svd_err, err)
    tok_t, tok_b = tuned_c.get("tokenizer"), base_c.get("tokenizer")
    if tok_t is not None and tok_b is not None:
        from .tokens import read_token_embeddings

        new = [t for t in tok_t.get_added_vocab() if t not in tok_b.get_vocab() and t not in tok_t.all_special_tokens]
        if new:
            lora.tokens = read_token_embeddings(tok_t, tuned_c["text_encoder"], new)
            if (
                tuned_c.get("tokenizer_2") is not None and tuned_c.get("text_encoder_2") is not None
            ):  # SDXL: the same tokens' rows in the second encoder
                lora.tokens_2 = read_token_embeddings(tuned_c["tokenizer_2"], tuned_c["text_encoder_2"], new)
    lora.metadata = {
        "distill": {
            "rank": config.rank,
            "clamp_quantile": config.clamp_quantile,
            "method": config.method,
        },
        "targets": {"unet": config.unet_targets, "text_encoder": config.text_encoder_targets},
    }
    return lora, report
