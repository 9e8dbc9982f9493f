"""The UNet and CLIP text encoder, trained together from scratch on the known concepts only; the saved pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ...losses import min_snr_weights, per_sample_mse, prediction_target
from ...tiny import write_byte_level_tokenizer
from ..world import caption, known_specs, render
from .config import SCHEDULER_CONFIG, TEXT_CONFIG, UNET_CONFIG, VOCAB_SIZE, PretrainConfig
from .data import cosine_lr, progress_bar, to_tensor


def make_tokenizer(directory: Path):
    """The world's byte-level CLIP tokenizer, written to `directory` and loaded from it."""
    from transformers import CLIPTokenizer

    write_byte_level_tokenizer(directory, VOCAB_SIZE)
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def train_unet(cfg: PretrainConfig, vae, tokenizer, rng: np.random.Generator, gen: torch.Generator):
    """UNet2DConditionModel + CLIPTextModel from scratch on the known concepts; returns (ema unet, text encoder)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    specs = known_specs()
    # per spec its caption; then per spec its shape alone ("a circle": any colour); last the empty caption
    captions = [caption(s) for s in specs] + [f"a {s.shape}" for s in specs] + [""]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    # cached latents: posterior mean and std of a fixed pool of renders
    n = cfg.latent_pool
    means, stds, labels = [], [], []
    with torch.no_grad():
        for _ in tqdm(range(0, n, 500), desc="encode latents", disable=not cfg.progress):
            picks = [int(rng.integers(len(specs))) for _ in range(500)]
            x = to_tensor([render(specs[k], rng) for k in picks])
            dist = vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            labels += picks
    means, stds, labels = torch.cat(means)[:n], torch.cat(stds)[:n], torch.tensor(labels)[:n]
    scale = vae.config.scaling_factor

    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    ema = UNet2DConditionModel(**UNET_CONFIG)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    params = [{"params": unet.parameters(), "lr": 6e-4}, {"params": text_encoder.parameters(), "lr": 3e-4}]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    base_lrs = [g["lr"] for g in opt.param_groups]
    total = cfg.steps("unet")
    unet.train()
    text_encoder.train()
    for step in (bar := progress_bar(total, "unet + text encoder", cfg.progress)):
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * cosine_lr(step, total, warmup=200)
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        cap = labels[idx].clone()
        u = torch.rand(cfg.batch_size, generator=gen)
        cap = torch.where(u < 0.2, cap + len(specs), cap)  # 20% without the colour
        cap[u > 0.9] = len(captions) - 1  # 10% unconditional, for classifier-free guidance
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids[cap])[0]
        pred = unet(noisy, t, hidden).sample
        target = prediction_target(noise_scheduler, latents, noise, t)
        loss = (min_snr_weights(noise_scheduler, t, 5.0) * per_sample_mse(pred, target)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval(), text_encoder.eval()


def save_pipeline(directory: Path, vae, unet, text_encoder, tokenizer) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    # a model loaded from disk (a partial rebuild) records where it came from: keep the folder portable
    for config in Path(directory).glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return directory
