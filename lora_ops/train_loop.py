"""The training loop shared by every trainer: models, batches, the loss step, optimisation, checkpoints.

`run_phase` trains one `Phase` (named parameter groups, a schedule, a number of steps) on one or more
`Source`s of images; it seeds its own generators, caches what does not change, writes resumable
checkpoints and resumes from one exactly. `train_step` is the pure loss computation of one micro-batch
(the part worth compiling). The trainers are `lora_ops.train` (pivotal tuning) and `lora_ops.dreambooth`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import devices
from .dataset import BatchSampler, ImageDataset, collate
from .inject import LoraConfig, extract_lora, inject_lora
from .lora_file import LoraFile
from .losses import clip_ti_decay_, mask_weights, min_snr_weights, per_sample_mse, prediction_target
from .models import load_pipeline
from .precision import torch_dtype
from .tokens import read_token_embeddings
from .train_checkpoint import (
    PHASES,
    global_rng_state,
    save_checkpoint,
    set_global_rng_state,
)
from .train_config import TrainConfig

Callback = Callable[[int, dict], None]
# options that may differ between a run and its resumption without changing the result (paths included: a
# retried pipeline step downloads the same model and images to a new temporary folder)
_RESUME_FREE = {
    "resume", "progress", "device", "save_steps", "out_name", "output_dir", "save_dtype", "eval_noises",
    "pretrained_model_name_or_path", "pretrained_vae_name_or_path", "instance_data_dir", "class_data_dir",
}  # fmt: skip


@dataclass
class TrainResult:
    """What a training run produced.

    Args:
        path: the native output file (None if the run wrote none).
        metrics: final numbers (`<phase>/loss`, `<phase>/eval_loss_before|after`, `<phase>/seconds`, ...).
        checkpoints: checkpoint folders written by this run, in order.
    """

    path: Path | None
    metrics: dict[str, float] = field(default_factory=dict)
    checkpoints: list[Path] = field(default_factory=list)


# ---- models ------------------------------------------------------------------------------------------


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


def resolve_compile(mode: str, device: torch.device) -> str:
    """The compile mode to use: "auto" is "reduce-overhead" (CUDA graphs) on CUDA and "none" elsewhere."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    return mode


def resolve_accumulation(config: TrainConfig) -> str:
    """ "batch" or "loop" (see `TrainConfig.accumulation`)."""
    if config.accumulation != "auto":
        return config.accumulation
    return "loop" if config.lora_dropout_p > 0 or config.gradient_checkpointing else "batch"


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


class CompiledUNet:
    """The UNet's forward under `torch.compile`, falling back to eager (with a warning) if compiling fails.

    `mode` is a `TrainConfig.compile` mode other than "auto"/"none"; "trace" uses the "aot_eager" backend
    (graphs captured through dynamo and AOTAutograd, kernels eager).
    """

    def __init__(self, unet: nn.Module, mode: str, device: torch.device):
        self.unet, self.mode, self.device = unet, mode, device
        self.failed: str | None = None
        kwargs = {"backend": "aot_eager"} if mode == "trace" else {"mode": mode}
        try:
            self.compiled = torch.compile(unet, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler problem means: run eager
            self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        import warnings

        self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.compiled = None
        warnings.warn(f"torch.compile(mode={self.mode!r}) failed, training eagerly: {self.failed}", stacklevel=2)

    def step_begin(self) -> None:
        if self.compiled is not None and self.mode == "reduce-overhead" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.unet(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if self.failed is not None or not _is_compile_error(exc):
                raise
            self._fall_back(exc)
            return self.unet(*args, **kwargs)


def _is_compile_error(exc: BaseException) -> bool:
    """An error of the compiler stack (dynamo, inductor, a missing C compiler or Triton), not of the model."""
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton")) or isinstance(
        exc, (ImportError, OSError, NotImplementedError)
    )


def load_trainee(config: TrainConfig) -> Trainee:
    """Load the base model in fp32 on the configured device, frozen, with a DDPM noise scheduler."""
    from diffusers import AutoencoderKL, DDPMScheduler

    device = resolve_device(config.device)
    autocast_dtype = resolve_precision(config.mixed_precision, device)
    kwargs = {"revision": config.revision} if config.revision else {}
    task = "inpaint" if config.train_inpainting else "text2img"
    pipe = load_pipeline(config.pretrained_model_name_or_path, task=task, device="cpu", **kwargs)
    if not config.train_inpainting and pipe.unet.config.in_channels != 4:
        raise ValueError(
            f"{config.pretrained_model_name_or_path} has a {pipe.unet.config.in_channels}-channel UNet: "
            "set train_inpainting for inpainting models"
        )
    if config.pretrained_vae_name_or_path:
        try:
            pipe.vae = AutoencoderKL.from_pretrained(config.pretrained_vae_name_or_path)
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"pretrained_vae_name_or_path={config.pretrained_vae_name_or_path!r}: not a VAE folder "
                f"({str(exc).splitlines()[0]})"
            ) from None
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if config.resolution % factor:
        raise ValueError(f"resolution={config.resolution} must be a multiple of {factor} for this VAE")
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    pipe.to(device)
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return Trainee(pipe, noise_scheduler, device, autocast_dtype, config)


def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """(b, model_max_length) token ids, padded and truncated like the pipelines do."""
    return tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ---- the loss of one micro-batch ------------------------------------------------------------------------


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
) -> torch.Tensor:
    """The weighted diffusion loss of one micro-batch (a scalar); no randomness, no host sync.

    latents, noise: (b, 4, h, w); encoder_hidden_states: (b, L, dim); timesteps: (b,) long;
    sample_weights: (b,) summing to the batch's weight (1/b each for a plain mean);
    pixel_weights: (b, 1, h, w) mask weights; inpaint_cond: (b, 5, h, w) mask + masked-image latents.
    """
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    model_input = noisy if inpaint_cond is None else torch.cat([noisy, inpaint_cond], dim=1)
    pred = unet(model_input, timesteps, encoder_hidden_states).sample
    target = prediction_target(noise_scheduler, latents, noise, timesteps)
    per_sample = per_sample_mse(pred, target, pixel_weights)  # (b,)
    if snr_gamma is not None:
        per_sample = per_sample * min_snr_weights(noise_scheduler, timesteps, snr_gamma)
    return (per_sample * sample_weights).sum()


# ---- data -------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One stream of training samples: a dataset, its sampler and the weight of its loss."""

    dataset: ImageDataset
    weight: float = 1.0
    sampler: BatchSampler | None = None
    latents: list[torch.Tensor] | None = None  # cached (1, 4, h, w) per image


@torch.no_grad()
def encode_images(trainee: Trainee, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """VAE latents (b, 4, h, w), scaled; a sample of the latent distribution (its mean if generator is None)."""
    vae = trainee.vae
    pixels = pixels.to(trainee.device, vae.dtype)
    dist = vae.encode(pixels).latent_dist
    if generator is None:
        latents = dist.mode()
    else:
        latents = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=generator).to(dist.mean)
    return latents * vae.config.scaling_factor


def cache_latents(trainee: Trainee, source: Source, seed: int) -> None:
    """Encode every image once (one latent sample each, from a generator seeded by `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    source.latents = [
        encode_images(trainee, source.dataset.sample(i)["pixel_values"][None], generator)
        for i in range(len(source.dataset))
    ]


def build_batch(trainee: Trainee, sources: list[Source], batch_size: int, aug: torch.Generator, noise_gen) -> dict:
    """Draw one micro-batch from every source: latents, prompts, weights, masks, inpainting inputs."""
    latents, prompts, weights, masks, inpaint = [], [], [], [], []
    for source in sources:
        idx = source.sampler.next()
        samples = [source.dataset.sample(i, aug) for i in idx]
        batch = collate(samples)
        if source.latents is not None:
            latents.append(torch.cat([source.latents[i] for i in idx]))
        else:
            latents.append(encode_images(trainee, batch["pixel_values"], noise_gen))
        prompts += batch["prompt"]
        weights += [source.weight / batch_size] * len(idx)
        masks.append(batch.get("mask", torch.ones(len(idx), 1, *batch["pixel_values"].shape[-2:])))
        if "inpaint_mask" in batch:
            masked = encode_images(trainee, batch["masked_image"], noise_gen)
            hole = torch.nn.functional.interpolate(batch["inpaint_mask"], size=masked.shape[-2:]).to(masked)
            inpaint.append(torch.cat([hole, masked], dim=1))
    out = {
        "latents": torch.cat(latents),
        "prompts": prompts,
        "sample_weights": torch.tensor(weights, device=trainee.device),
        "masks": torch.cat(masks) if any(s.dataset.config.use_masks for s in sources) else None,
        "inpaint_cond": torch.cat(inpaint) if inpaint else None,
    }
    return out


def join_batches(batches: list[dict], accum: int) -> dict:
    """The micro-batches of one optimizer step as one batch whose loss is the mean of theirs.

    Every loss term is per sample (GroupNorm and LayerNorm normalise within a sample), so the loss of the
    joined batch with sample weights divided by `accum` equals the sum of the micro-batch losses / accum,
    and so does its gradient.
    """

    def cat(key):
        values = [b[key] for b in batches]
        return None if values[0] is None else torch.cat(values)

    out = {key: cat(key) for key in ("latents", "noise", "timesteps", "masks", "pixel_weights", "inpaint_cond")}
    out["sample_weights"] = torch.cat([b["sample_weights"] for b in batches]) / accum
    out["prompts"] = [p for b in batches for p in b["prompts"]]
    return out


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


@torch.no_grad()
def measure_loss(pipe, dataset: ImageDataset, seed: int = 0, n_noises: int = 2, device=None) -> float:
    """Mean diffusion loss over every image × `n_noises` fixed (noise, timestep) pairs; no state changes.

    The same seed gives the same noises and timesteps, so numbers before and after training compare.
    `pipe` is anything with unet, vae, text_encoder, tokenizer and scheduler (a pipeline or a Trainee).
    """
    from diffusers import DDPMScheduler

    scheduler = getattr(pipe, "noise_scheduler", None) or DDPMScheduler.from_config(pipe.scheduler.config)
    device = device or next(pipe.unet.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    t_count = scheduler.config.num_train_timesteps
    timesteps = torch.linspace(0.05 * t_count, 0.95 * t_count, max(n_noises, 1)).long()
    modes = (pipe.unet.training, pipe.text_encoder.training)
    pipe.unet.eval()
    pipe.text_encoder.eval()
    total, count = 0.0, 0
    for i in range(len(dataset)):
        sample = collate([dataset.sample(i, torch.Generator().manual_seed(seed + i))])
        latents = encode_images(_Shim(pipe.vae, device), sample["pixel_values"], None)
        ids = tokenize(pipe.tokenizer, sample["prompt"]).to(device)
        embeds = pipe.text_encoder(ids)[0]
        cond = None
        if "inpaint_mask" in sample:
            masked = encode_images(_Shim(pipe.vae, device), sample["masked_image"], None)
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
            )
            total += loss.item()
            count += 1
    pipe.unet.train(modes[0])
    pipe.text_encoder.train(modes[1])
    return total / max(count, 1)


@dataclass
class _Shim:
    vae: nn.Module
    device: torch.device


# ---- the training loop ------------------------------------------------------------------------------------


@dataclass
class Phase:
    """One optimisation phase.

    Args:
        name: "inversion", "tuning" or "dreambooth" (the checkpoint folder prefix).
        steps: optimizer steps.
        groups: AdamW parameter groups: {"name": ..., "params": {param name: Parameter}, "lr", "weight_decay"}.
        lr_scheduler, warmup: the learning-rate schedule.
        text_trained: the text encoder's output depends on trained parameters (no embedding cache).
        unet_trained: the UNet has trained parameters (train mode).
        token_embedding: the wrapped token rows, when tokens are trained.
        ti_decay: apply the token norm prior after each step (phase 1, `clip_ti_decay`).
        step_offset: added to the step numbers given to the callback (phases follow each other).
    """

    name: str
    steps: int
    groups: list[dict]
    lr_scheduler: str
    warmup: int
    text_trained: bool
    unet_trained: bool
    token_embedding: nn.Module | None = None
    ti_decay: bool = False
    step_offset: int = 0

    def named_params(self) -> dict[str, nn.Parameter]:
        return {f"{g['name']}.{n}": p for g in self.groups for n, p in g["params"].items()}


def make_optimizer(groups: list[dict], use_8bit: bool, device: torch.device):
    torch_groups = [
        {"params": list(g["params"].values()), "lr": g["lr"], "weight_decay": g["weight_decay"]} for g in groups
    ]
    if use_8bit:
        if device.type != "cuda":
            raise ValueError(f"use_8bit_adam needs a CUDA device (device is {device}); turn it off on CPU")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ValueError("use_8bit_adam needs the bitsandbytes package: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(torch_groups)
    return torch.optim.AdamW(torch_groups, fused=device.type == "cuda")


def _resumable_config(config: TrainConfig) -> dict:
    return {k: v for k, v in config.to_dict().items() if k not in _RESUME_FREE}


def vocabulary_norm(weight: torch.Tensor, exclude: torch.Tensor) -> float:
    """Mean L2 norm of the embedding rows (vocab, dim) other than `exclude` (the new tokens)."""
    keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    keep[exclude] = False
    return float(weight.detach()[keep].float().norm(dim=-1).mean())


def run_phase(
    trainee: Trainee,
    phase: Phase,
    sources: list[Source],
    lora_snapshot: Callable[[], LoraFile],
    callback: Callback | None = None,
    state: dict | None = None,
    checkpoints: list[Path] | None = None,
) -> dict[str, float]:
    """Train one phase; resume from `state` (a checkpoint of this phase) if given; returns metrics."""
    config, device = trainee.config, trainee.device
    phase_index = PHASES.index(phase.name)
    checkpoints = checkpoints if checkpoints is not None else []
    accum, batch_size = config.gradient_accumulation_steps, config.train_batch_size

    # ---- seeds: every phase starts from its own seed, so a resumed later phase matches an uninterrupted one
    phase_seed = config.seed + 1000 * phase_index
    torch.manual_seed(phase_seed)
    random.seed(phase_seed)
    np.random.seed(phase_seed % 2**32)
    aug_gen = torch.Generator().manual_seed(phase_seed + 1)
    noise_gen = torch.Generator().manual_seed(phase_seed + 2)
    for k, source in enumerate(sources):
        source.sampler = BatchSampler(len(source.dataset), batch_size, phase_seed + 10 + k)

    # ---- the token norm prior's target: given, or the mean norm of the base vocabulary's rows
    ti_target = config.ti_target_norm if hasattr(config, "ti_target_norm") else None
    if phase.ti_decay and phase.token_embedding is not None and ti_target is None:
        ti_target = vocabulary_norm(phase.token_embedding.base.weight, phase.token_embedding.ids)

    # ---- optimizer, schedule, gradient scaler
    from diffusers.optimization import get_scheduler

    params = phase.named_params()
    if config.cast_base_weights and trainee.autocast_dtype is not None:
        # frozen weights in the compute dtype once; trained parameters fp32 (before the optimizer sees them)
        cast_frozen_weights(trainee.unet, trainee.autocast_dtype)
        cast_frozen_weights(trainee.text_encoder, trainee.autocast_dtype)
    with torch.no_grad():
        for p in params.values():
            if p.dtype != torch.float32:
                p.data = p.data.float()
    optimizer = make_optimizer(phase.groups, config.use_8bit_adam, device)
    lr_scheduler = get_scheduler(
        phase.lr_scheduler, optimizer, num_warmup_steps=phase.warmup, num_training_steps=max(phase.steps, 1)
    )
    scaler = torch.amp.GradScaler("cuda") if trainee.autocast_dtype == torch.float16 else None

    # ---- caches: VAE latents when every epoch sees the same pixels, text embeddings while the encoder is frozen
    for k, source in enumerate(sources):
        cacheable = not source.dataset.config.augments
        if config.cached_latents == "on" or (config.cached_latents == "auto" and cacheable):
            cache_latents(trainee, source, config.seed + k)
    encode = PromptEncoder(trainee, cache=config.cache_text_embeddings and not phase.text_trained)
    if config.gradient_checkpointing and phase.text_trained:
        # non-reentrant: gradients reach LoRA and token parameters although the inputs need none
        trainee.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- resume
    start = 0
    if state is not None:
        if state["phase"] != phase.name:
            raise ValueError(f"checkpoint is of phase {state['phase']!r}, not {phase.name!r}")
        saved, now = state.get("config", {}), _resumable_config(config)
        # an option added after the checkpoint was written counts as unchanged while it has its default
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k)) != now.get(k))
        if changed:
            raise ValueError(f"cannot resume exactly: options changed since the checkpoint: {changed}")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(state["params"][name].to(p))
        optimizer.load_state_dict(state["optimizer"])
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        set_global_rng_state(state["rng"])
        aug_gen.set_state(state["generators"]["aug"])
        noise_gen.set_state(state["generators"]["noise"])
        for source, sampler_state in zip(sources, state["samplers"], strict=True):
            source.sampler.load_state_dict(sampler_state)
        start = int(state["step"])

    def snapshot_state(step: int) -> dict:
        return {
            "params": {n: p.detach().cpu().clone() for n, p in params.items()},
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": global_rng_state(),
            "generators": {"aug": aug_gen.get_state(), "noise": noise_gen.get_state()},
            "samplers": [s.sampler.state_dict() for s in sources],
            "config": _resumable_config(config),
        }

    # ---- speed: channels-last, compiled UNet, accumulation as one batch
    unet = trainee.unet
    if config.channels_last:
        trainee.unet.to(memory_format=torch.channels_last)
    compile_mode = resolve_compile(config.compile, device)
    compiled = CompiledUNet(trainee.unet, compile_mode, device) if compile_mode != "none" else None
    if compiled is not None:
        unet = compiled
    as_batch = resolve_accumulation(config) == "batch" and accum > 1
    autocast = torch.autocast(
        device.type, dtype=trainee.autocast_dtype or torch.float32, enabled=trainee.autocast_dtype is not None
    )

    metrics: dict[str, float] = {}
    if config.eval_noises and start == 0:
        with autocast:
            metrics[f"{phase.name}/eval_loss_before"] = measure_loss(
                trainee, sources[0].dataset, config.seed, config.eval_noises, device
            )
    trainee.unet.train(phase.unet_trained)
    trainee.text_encoder.train(phase.text_trained)
    all_params = list(params.values())
    t_count = trainee.noise_scheduler.config.num_train_timesteps

    def draw() -> dict:
        """One micro-batch with its noise and timesteps (the generators advance in a fixed order)."""
        batch = build_batch(trainee, sources, batch_size, aug_gen, noise_gen)
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=noise_gen)
        if config.noise_offset:
            noise += config.noise_offset * torch.randn(*latents.shape[:2], 1, 1, generator=noise_gen)
        timesteps = torch.randint(0, t_count, (latents.shape[0],), generator=noise_gen)
        batch["noise"], batch["timesteps"] = noise.to(device), timesteps.to(device)
        batch["pixel_weights"] = None
        if batch["masks"] is not None:
            batch["pixel_weights"] = mask_weights(
                batch["masks"].to(device), latents.shape[-2:], config.mask_temperature
            )
        return batch

    losses: list[float] = []
    began = time.perf_counter()
    bar = tqdm(total=phase.steps, initial=start, desc=phase.name, disable=not config.progress, leave=False)
    for step in range(start, phase.steps):
        # ---- forward and backward over the micro-batches of one optimizer step (or over all of them at once)
        micro = [draw() for _ in range(accum)]
        if as_batch:
            micro, divisor = [join_batches(micro, accum)], 1
        else:
            divisor = accum
        step_loss = torch.zeros((), device=device)
        for batch in micro:
            if compiled is not None:
                compiled.step_begin()
            latents = batch["latents"]
            if config.channels_last:
                latents = latents.contiguous(memory_format=torch.channels_last)
            with autocast:
                embeds = encode(batch["prompts"])
                loss = train_step(
                    unet,
                    trainee.noise_scheduler,
                    latents,
                    embeds,
                    batch["noise"],
                    batch["timesteps"],
                    batch["sample_weights"],
                    batch["pixel_weights"],
                    batch["inpaint_cond"],
                    config.min_snr_gamma,
                )
            scaled = loss / divisor
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
            step_loss += loss.detach().float() / divisor

        # ---- stop on a non-finite loss, keeping the last good checkpoint
        loss_value = step_loss.item()
        if not math.isfinite(loss_value):
            last = checkpoints[-1] if checkpoints else "none written yet"
            raise RuntimeError(
                f"{phase.name} step {step + 1}: the loss is {loss_value}; training stopped "
                f"(last good checkpoint: {last}). Lower the learning rates or use bf16/fp32."
            )

        # ---- optimizer step: clip, step, schedule, token norm prior
        if scaler is not None:
            scaler.unscale_(optimizer)
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(all_params, config.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if phase.ti_decay and phase.token_embedding is not None:
            clip_ti_decay_(phase.token_embedding.rows, lr, ti_target)

        # ---- report
        losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if callback is not None:
            callback(phase.step_offset + step + 1, {"loss": loss_value, "lr": lr, "phase": phase.name})

        # ---- checkpoint
        done = step + 1
        if done % config.save_steps == 0 or done == phase.steps:
            checkpoints.append(
                save_checkpoint(config.output_dir, phase.name, done, lora_snapshot(), snapshot_state(done))
            )
    bar.close()

    trainee.unet.eval()
    trainee.text_encoder.eval()
    if losses:
        metrics[f"{phase.name}/loss"] = float(np.mean(losses[-max(1, len(losses) // 10) :]))
        metrics[f"{phase.name}/seconds"] = time.perf_counter() - began
        metrics[f"{phase.name}/steps_per_second"] = len(losses) / max(metrics[f"{phase.name}/seconds"], 1e-9)
    if compiled is not None:
        metrics[f"{phase.name}/compiled"] = float(compiled.compiled is not None)
    if config.eval_noises:
        with autocast:
            metrics[f"{phase.name}/eval_loss_after"] = measure_loss(
                trainee, sources[0].dataset, config.seed, config.eval_noises, device
            )
    return metrics


def lora_metadata(config: TrainConfig, trainer: str, phases: list[str]) -> dict:
    unet_targets = ("unet-extended" if config.use_extended_lora else "unet") if "lora" in phases else None
    te_targets = "text_encoder" if config.train_text_encoder and "lora" in phases else None
    alpha = config.lora_alpha if config.lora_alpha is not None else config.lora_rank
    training = {**config.to_dict(), "trainer": trainer}
    return {
        "base_model": config.pretrained_model_name_or_path,
        "targets": {"unet": unet_targets, "text_encoder": te_targets},
        "alphas": {"unet": alpha if unet_targets else None, "text_encoder": alpha if te_targets else None},
        "training_config": training,
    }


def current_lora(trainee: Trainee, tokens: list[str], token_embedding: nn.Module | None, meta: dict) -> LoraFile:
    """The native file of the current state: LoRA of both models, token rows, metadata."""
    if token_embedding is not None:
        token_rows = {t: token_embedding.rows[i].detach().float().cpu().clone() for i, t in enumerate(tokens)}
    else:
        token_rows = read_token_embeddings(trainee.tokenizer, trainee.text_encoder, tokens) if tokens else {}
    return LoraFile(
        unet=extract_lora(trainee.unet, "unet"),
        text_encoder=extract_lora(trainee.text_encoder, "text_encoder"),
        tokens=token_rows,
        metadata=meta,
    )


def inject_trainable_lora(trainee: Trainee, config: TrainConfig) -> list[dict]:
    """Add LoRA to the UNet (and text encoder); returns their AdamW parameter groups.

    The initial lora_A draws from the global torch RNG, seeded here so that the same seed gives the same
    start whether or not phase 1 ran in the same process.
    """
    torch.manual_seed(config.seed + 7)
    # a previous phase may have cast the frozen weights to bf16/fp16 (cast_base_weights); peft creates LoRA
    # weights in their layer's dtype, so make the layers fp32 again (exact: every bf16/fp16 value is an fp32
    # value) for fp32 LoRA weights; `run_phase` casts the frozen weights back
    cast_frozen_weights(trainee.unet, torch.float32)
    cast_frozen_weights(trainee.text_encoder, torch.float32)
    unet_cfg = LoraConfig(
        targets="unet-extended" if config.use_extended_lora else "unet",
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        dropout=config.lora_dropout_p,
    )
    inject_lora(trainee.unet, unet_cfg)
    groups = [
        {
            "name": "unet",
            "params": {n: p for n, p in trainee.unet.named_parameters() if p.requires_grad},
            "lr": config.scaled(config.learning_rate_unet),
            "weight_decay": config.weight_decay_lora,
        }
    ]
    if config.train_text_encoder:
        te_cfg = dataclasses.replace(unet_cfg, targets="text_encoder")
        inject_lora(trainee.text_encoder, te_cfg)
        groups.append(
            {
                "name": "text_encoder",
                "params": {n: p for n, p in trainee.text_encoder.named_parameters() if p.requires_grad},
                "lr": config.scaled(config.learning_rate_text),
                "weight_decay": config.weight_decay_lora,
            }
        )
    return groups
