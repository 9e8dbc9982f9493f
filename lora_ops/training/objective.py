"""The training objective: the weighted diffusion loss of one micro-batch, and that loss measured on a dataset.

`train_step` is a pure function of tensors (no randomness, no host sync: the part worth compiling);
`measure_loss` evaluates it at fixed noises and timesteps so that numbers before and after training compare.
"""

from __future__ import annotations

import torch
from torch import nn

from ..dataset import ImageDataset, collate
from ..losses import min_snr_weights, per_sample_mse, prediction_target
from .trainee import encode_images, encode_prompts, sdxl_time_ids


def train_step(
    unet: nn.Module,
    noise_scheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    sample_weights: torch.Tensor,
    pixel_weights: torch.Tensor | None = None,
    inpaint_cond: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    added_cond_kwargs: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The weighted diffusion loss of one micro-batch (a scalar); no randomness, no host sync.

    latents, noise: (b, 4, h, w); encoder_hidden_states: (b, L, dim); timesteps: (b,) long;
    sample_weights: (b,) summing to the batch's weight (1/b each for a plain mean);
    pixel_weights: (b, 1, h, w) mask weights; inpaint_cond: (b, 5, h, w) mask + masked-image latents;
    added_cond_kwargs: SDXL's {"text_embeds": (b, dim) pooled, "time_ids": (b, 6)}.
    """
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    model_input = noisy if inpaint_cond is None else torch.cat([noisy, inpaint_cond], dim=1)
    pred = unet(model_input, timesteps, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs).sample
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    per_sample = per_sample_mse(pred, target, pixel_weights)  # (b,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return (per_sample * sample_weights).sum()


@torch.no_grad()
def measure_loss(pipe, dataset: ImageDataset, seed: int = 0, n_noises: int = 2, device=None) -> float:
    """Mean diffusion loss over every image × `n_noises` fixed (noise, timestep) pairs; no state changes.

    The same seed gives the same noises and timesteps, so numbers before and after training compare.
    `pipe` is anything with unet, vae, text encoder(s), tokenizer(s) and scheduler (a pipeline or a Trainee).
    """
    from diffusers import DDPMScheduler

    scheduler = getattr(pipe, "noise_scheduler", None) or DDPMScheduler.from_config(pipe.scheduler.config)
    device = device or next(pipe.unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    t_count = scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0.05 * t_count, 0.95 * t_count, max(n_noises, 1)).long()
    encoders = [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    modes = [m.training for m in (pipe.unet, *encoders)]
    for m in (pipe.unet, *encoders):
        m.eval()
    total, count = 0.0, 0
    for i in range(len(dataset)):
        sample = collate([dataset.sample(i, torch.Generator().manual_seed(seed + i))])
        latents = encode_images(pipe.vae, sample["pixel_values"], None, device)
        embeds, pooled = encode_prompts(pipe, sample["prompt"], device)
        added = None if pooled is None else {"text_embeds": pooled, "time_ids": sdxl_time_ids(sample).to(device)}
        cond = None
        if "inpaint_mask" in sample:
            masked = encode_images(pipe.vae, sample["masked_image"], None, device)
            hole = torch.nn.functional.interpolate(sample["inpaint_mask"], size=masked.shape[-2:]).to(masked)
            cond = torch.cat([hole, masked], dim=1)
        for k in range(n_noises):
            noise = torch.randn(latents.shape, generator=generator).to(latents)
            loss = train_step(
                pipe.unet,
                scheduler,
                latents,
                embeds,
                noise,
                timesteps[k : k + 1].to(device),
                torch.ones(1, device=device),
                None,
                cond,
                added_cond_kwargs=added,
            )
            total += loss.item()
            count += 1
    for m, mode in zip((pipe.unet, *encoders), modes, strict=True):
        m.train(mode)
    return total / max(count, 1)
