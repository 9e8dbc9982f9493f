"""The VAE (AutoencoderKL), trained on every concept, held-out ones included."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..world import all_specs, known_specs
from .config import VAE_CONFIG, PretrainConfig
from .data import cosine_lr, progress_bar, world_batch


def train_vae(cfg: PretrainConfig, rng: np.random.Generator, gen: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    total = cfg.steps("vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    specs = all_specs()
    for step in (bar := progress_bar(total, "vae", cfg.progress)):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * cosine_lr(step, total, warmup=50)
        x, _ = world_batch(rng, cfg.batch_size, specs, none_share=0.1)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 1e-7 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    # SD's convention: latents * scaling_factor have unit variance
    with torch.no_grad():
        x, _ = world_batch(rng, 512, known_specs())
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae
