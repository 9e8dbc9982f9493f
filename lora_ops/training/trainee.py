"""The model being trained: the base pipeline loaded frozen on its device, and how to run its parts.

`load_trainee` loads the base model (fp32, frozen, a DDPM noise scheduler for training); `encode_images`,
`encode_prompts` and `PromptEncoder` turn pixels and prompts into what the UNet takes. An SDXL UNet also
takes the pooled embedding of the second text encoder and six size numbers per sample (`sdxl_time_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .. import devices
from ..models import components, is_sdxl, load_pipeline
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

    @property
    def text_encoder_2(self):
        """SDXL's second text encoder (None for SD 1.x/2.x)."""
        return getattr(self.pipe, "text_encoder_2", None)

    @property
    def tokenizer_2(self):
        return getattr(self.pipe, "tokenizer_2", None)

    @property
    def sdxl(self) -> bool:
        return is_sdxl(self.pipe)

    @property
    def text_encoders(self) -> list[nn.Module]:
        """The text encoder(s): one, or SDXL's two."""
        return [m for name, m in components(self.pipe).items() if name != "unet"]


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
    if config.runtime.single_file_config:
        kwargs["config"] = config.runtime.single_file_config
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
    if config.data.bucketing(is_sdxl(pipe)):
        if config.data.enable_bucket is None:  # on by default for SDXL: say how to turn it off
            try:
                config.data.buckets(sdxl=True)
            except ValueError as exc:
                raise ValueError(
                    f"{exc} (aspect-ratio bucketing is on by default for SDXL bases: set bucket_reso_steps, "
                    "or enable_bucket false for square crops)"
                ) from None
        # every bucket side must survive the VAE and each of the UNet's halvings without rounding
        unet_factor = factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if config.data.bucket_reso_steps % unet_factor:
            raise ValueError(
                f"bucket_reso_steps={config.data.bucket_reso_steps} must be a multiple of {unet_factor} for this "
                f"model (the VAE's factor {factor} times the UNet's downsampling)"
            )
    for module in (pipe.vae, *components(pipe).values()):
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


def encode_prompts(model, prompts: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states (b, L, dim), pooled (b, dim) or None) of `prompts`, as the pipelines compute them.

    SD 1.x/2.x: the text encoder's last hidden states, no pooled embedding. SDXL: both encoders' penultimate
    hidden states side by side, and the second encoder's projected pooled output (`StableDiffusionXLPipeline.
    encode_prompt` without clip_skip). `model` is a pipeline or a Trainee.
    """
    if getattr(model, "text_encoder_2", None) is None:
        return model.text_encoder(tokenize(model.tokenizer, prompts).to(device))[0], None
    states, pooled = [], None
    for tokenizer, encoder in ((model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)):
        out = encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        pooled = out[0]  # the second encoder's (CLIPTextModelWithProjection) text_embeds is the one kept
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1), pooled


def sdxl_time_ids(batch: dict) -> torch.Tensor:
    """SDXL's micro-conditioning (b, 6) of a collated batch: original size, crop corner, target size.

    The original size (h, w) is the image's before resizing, the crop corner (top, left) is where the
    training crop starts in the resized image, as diffusers' SDXL training scripts compute them, and the
    target size is the crop's; at inference the pipelines pass (height, width), (0, 0), (height, width).
    """
    pixels = batch["pixel_values"]
    target = torch.tensor(pixels.shape[-2:]).expand(pixels.shape[0], 2)
    return torch.cat([batch["original_size"], batch["crop_top_left"], target], dim=1).float()


class PromptEncoder:
    """Text embeddings (and SDXL's pooled embeddings) of prompts; cached per prompt while the text encoders
    are frozen. Returns (hidden states, pooled or None)."""

    def __init__(self, trainee: Trainee, cache: bool):
        self.trainee, self.cache = trainee, cache
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def __call__(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = self.trainee
        if not self.cache:
            return encode_prompts(t, prompts, t.device)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.store]
        if missing:
            with torch.no_grad():
                states, pooled = encode_prompts(t, missing, t.device)
            pooled = [None] * len(missing) if pooled is None else pooled.float()
            self.store.update(zip(missing, zip(states.float(), pooled, strict=True), strict=True))
        states = torch.stack([self.store[p][0] for p in prompts])
        pooled = [self.store[p][1] for p in prompts]
        return states, None if pooled[0] is None else torch.stack(pooled)
