"""Diffusion training losses: prediction targets, mask weighting, min-SNR-γ, the token norm prior."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What the UNet should predict: the noise (epsilon models) or the velocity (v-prediction, SD 2.x)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type={kind!r} is not supported (epsilon or v_prediction)")


def mask_weights(mask: torch.Tensor, size: tuple[int, int], temperature: float) -> torch.Tensor:
    """Loss weights from image masks, as the original trainer: (mask + 0.01) ** temperature, max 1.

    mask: (b, 1, H, W) in [0, 1] at image resolution -> (b, 1, h, w) at latent resolution.
    """
    mask = F.interpolate(mask.float(), size=size, mode="nearest")
    mask = (mask + 0.01).pow(temperature)
    return mask / mask.amax(dim=(1, 2, 3), keepdim=True)


def min_snr_weights(noise_scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-sample min-SNR-γ weights (Hang et al. 2023): min(SNR, γ) / SNR, or / (SNR + 1) for v-prediction."""
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()  # (b,)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = torch.clamp(snr, max=gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return clipped / snr


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """(b,) mean squared error per sample, optionally weighted per pixel by `weights` (b, 1, h, w)."""
    if weights is not None:
        pred, target = pred * weights, target * weights
    return F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))


@torch.no_grad()
def clip_ti_decay_(rows: torch.Tensor, lr: float, target_norm: float = 0.4) -> None:
    """Pull each row's norm toward `target_norm` with strength min(1, 100·lr), in place.

    The original lora_diffusion `clip_ti_decay`: rows = normalize(rows) · (n + λ (target − n)).
    rows: (n_tokens, dim).
    """
    norm = rows.norm(dim=-1, keepdim=True)  # (n, 1)
    strength = min(1.0, 100.0 * lr)
    rows.copy_(F.normalize(rows, dim=-1) * (norm + strength * (target_norm - norm)))
