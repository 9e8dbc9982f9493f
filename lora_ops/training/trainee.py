"""The model being trained: the base pipeline loaded frozen on its device, and how to run its parts.

`load_trainee` loads the base model (fp32, frozen, a DDPM noise scheduler for training); `encode_images`
and `PromptEncoder` turn pixels and prompts into what the UNet takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import devices
from ..models import load_pipeline
from ..precision import torch_dtype
from .config import TrainConfig


@dataclass
class Trainee:
    """The loaded base model (components shared with `pipe`) and how to run it."""

    pipe: object
    noise_scheduler: object
    device: torch.device
    autocast_dtype: torch.dtype | None
    config: TrainConfig

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def text_encoder(self):
        return self.pipe.text_encoder

    @property
    def tokenizer(self):
        return self.pipe.tokenizer

    @property
    def vae(self):
        return self.pipe.vae


def resolve_device(name: str) -> torch.device:
    device = torch.device(devices.resolve_device(name))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available on this machine")
    return device


def resolve_precision(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = fp32). Mixed precision is a CUDA feature: fp32 on CPU."""
    if mixed_precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if mixed_precision == "no":
        return None
    if device.type != "cuda":
        raise ValueError(f"mixed_precision={mixed_precision!r} needs a CUDA device; use 'no' or 'auto' on {device}")
    return torch_dtype(mixed_precision, "mixed_precision")


@torch.no_grad()
def cast_frozen_weights(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast the frozen weights and biases of `module`'s Linear and Conv layers to `dtype`; returns how many.

    Under autocast these layers compute in `dtype` anyway (autocast rounds fp32 weights to it on every
    call), so the result is the same while the per-call casts and the fp32 copies' bandwidth go away.
    Normalisation layers and embeddings, which autocast keeps in fp32, are left alone; so are trained
    parameters (LoRA, tokens).
    """
    count = 0
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            for p in (layer.weight, layer.bias):
                if p is not None and not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
                    p.data = p.data.to(dtype)
                    count += 1
    return count


def load_trainee(config: TrainConfig) -> Trainee:
    """Load the base model in fp32 on the configured device, frozen, with a DDPM noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler

    device = resolve_device(config.runtime.device)
    autocast_dtype = resolve_precision(config.compute.mixed_precision, device)
    kwargs = {"revision": config.revision} if config.revision else {}
    task = "inpaint" if config.data.train_inpainting else "text2img"
    pipe = load_pipeline(config.runtime.pretrained_model_name_or_path, task=task, device="cpu", **kwargs)
    if not config.data.train_inpainting and pipe.unet.config.in_channels != 4:
        raise ValueError(
            f"{config.runtime.pretrained_model_name_or_path} has a {pipe.unet.config.in_channels}-channel UNet: "
            "set train_inpainting for inpainting models"
        )
    if config.runtime.pretrained_vae_name_or_path:
        try:
            pipe.vae = AutoencoderKL.from_pretrained(config.runtime.pretrained_vae_name_or_path)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"pretrained_vae_name_or_path={config.runtime.pretrained_vae_name_or_path!r}: not a VAE folder "
                f"({str(exc).splitlines()[0]})"
            ) from None
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if config.data.resolution % factor:
        raise ValueError(f"resolution={config.data.resolution} must be a multiple of {factor} for this VAE")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.to(device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if config.compute.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return Trainee(pipe, noise_scheduler, device, autocast_dtype, config)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(b, model_max_length) token ids, padded and truncated like the pipelines do."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_images(
    vae: nn.Module, pixels: torch.Tensor, generator: torch.Generator | None, device: torch.device | None = None
) -> torch.Tensor:
    """VAE latents (b, 4, h, w), scaled; a sample of the latent distribution (its mean if generator is None)."""
    pixels = pixels.to(device or next(vae.parameters()).device, vae.dtype)
    dist = vae.encode(pixels).latent_dist
    if generator is None:
        latents = dist.mode()
    else:
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
    return latents * vae.config.scaling_factor


class PromptEncoder:
    """Text embeddings of prompts; cached per prompt while the text encoder is frozen."""

    def __init__(self, trainee: Trainee, cache: bool):
        self.trainee, self.cache = trainee, cache
        self.store: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: Sequence[str]) -> torch.Tensor:
        t = self.trainee
        if not self.cache:
            return t.text_encoder(tokenize(t.tokenizer, prompts).to(t.device))[0]
        missing = [p for p in dict.fromkeys(prompts) if p not in self.store]
        if missing:
            with torch.no_grad():
                embeds = t.text_encoder(tokenize(t.tokenizer, missing).to(t.device))[0].float()
            self.store.update(zip(missing, embeds, strict=True))
        return torch.stack([self.store[p] for p in prompts])
