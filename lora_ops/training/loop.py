"""The optimisation loop shared by every trainer: one `Phase` of named parameter groups trained on `Source`s.

`run_phase` seeds its own generators, caches what does not change, writes resumable checkpoints and
resumes from one exactly (the options of `TrainConfig.runtime` may change on resume; nothing else may).
The trainers are `lora_ops.training.pti` (pivotal tuning) and `lora_ops.training.dreambooth`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..lora_file import LoraFile
from ..losses import clip_ti_decay_, mask_weights
from .batches import Source, build_batch, cache_latents, join_by_size
from .checkpoints import PHASES, global_rng_state, save_checkpoint, set_global_rng_state
from .compile import CompiledUNet, resolve_compile
from .config import TrainConfig
from .objective import measure_loss, train_step
from .options import resumable_config, resume_changes
from .trainee import PromptEncoder, Trainee, cast_frozen_weights

Callback = Callable[[int, dict], None]


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
        token_embeddings: the wrapped token rows of each text encoder, when tokens are trained.
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
    token_embeddings: list[nn.Module] = field(default_factory=list)
    ti_decay: bool = False
    step_offset: int = 0

    def named_params(self) -> dict[str, nn.Parameter]:
        return {f"{g['name']}.{n}": p for g in self.groups for n, p in g["params"].items()}


def resolve_accumulation(config: TrainConfig) -> str:
    """ "batch" or "loop" (see `ComputeSection.accumulation`)."""
    if config.compute.accumulation != "auto":
        return config.compute.accumulation
    return "loop" if config.lora.lora_dropout > 0 or config.compute.gradient_checkpointing else "batch"


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
    accum, batch_size = config.optim.gradient_accumulation_steps, config.optim.train_batch_size

    # ---- seeds: every phase starts from its own seed, so a resumed later phase matches an uninterrupted one
    phase_seed = config.seed + 1000 * phase_index
    torch.manual_seed(phase_seed)
    random.seed(phase_seed)
    np.random.seed(phase_seed % 2**32)
    aug_gen = torch.Generator().manual_seed(phase_seed + 1)
    noise_gen = torch.Generator().manual_seed(phase_seed + 2)
    for k, source in enumerate(sources):
        source.sampler = source.dataset.batch_sampler(batch_size, phase_seed + 10 + k)

    # ---- the token norm prior's target: given, or the mean norm of the base vocabulary's rows
    # (per text encoder: SDXL's two vocabularies have different norms)
    given = config.ti_target_norm if hasattr(config, "ti_target_norm") else None
    ti_targets = [given if given is not None else vocabulary_norm(w.base.weight, w.ids) for w in phase.token_embeddings]

    # ---- optimizer, schedule, gradient scaler
    from diffusers.optimization import get_scheduler

    params = phase.named_params()
    if config.compute.cast_base_weights and trainee.autocast_dtype is not None:
        # frozen weights in the compute dtype once; trained parameters fp32 (before the optimizer sees them)
        for model in (trainee.unet, *trainee.text_encoders):
            cast_frozen_weights(model, trainee.autocast_dtype)
    with torch.no_grad():
        for p in params.values():
            if p.dtype != torch.float32:
                p.data = p.data.float()
    optimizer = make_optimizer(phase.groups, config.optim.use_8bit_adam, device)
    lr_scheduler = get_scheduler(
        phase.lr_scheduler, optimizer, num_warmup_steps=phase.warmup, num_training_steps=max(phase.steps, 1)
    )
    scaler = torch.amp.GradScaler("cuda") if trainee.autocast_dtype == torch.float16 else None

    # ---- caches: VAE latents when every epoch sees the same pixels, text embeddings while the encoder is frozen
    for k, source in enumerate(sources):
        cacheable = not source.dataset.config.augments
        if config.data.cached_latents == "on" or (config.data.cached_latents == "auto" and cacheable):
            cache_latents(trainee, source, config.seed + k)
    encode = PromptEncoder(trainee, cache=config.data.cache_text_embeddings and not phase.text_trained)
    if config.compute.gradient_checkpointing and phase.text_trained:
        # non-reentrant: gradients reach LoRA and token parameters although the inputs need none
        for encoder in trainee.text_encoders:
            encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    # ---- resume
    start = 0
    if state is not None:
        if state["phase"] != phase.name:
            raise ValueError(f"checkpoint is of phase {state['phase']!r}, not {phase.name!r}")
        changed = resume_changes(state.get("config", {}), config)
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
            "config": resumable_config(config),
        }

    # ---- speed: channels-last, compiled UNet, accumulation as one batch
    unet = trainee.unet
    if config.compute.channels_last:
        trainee.unet.to(memory_format=torch.channels_last)
    compile_mode = resolve_compile(config.compute.compile, device)
    compiled = CompiledUNet(trainee.unet, compile_mode, device) if compile_mode != "none" else None
    if compiled is not None:
        unet = compiled
    as_batch = resolve_accumulation(config) == "batch" and accum > 1
    autocast = torch.autocast(
        device.type, dtype=trainee.autocast_dtype or torch.float32, enabled=trainee.autocast_dtype is not None
    )

    metrics: dict[str, float] = {}
    if config.runtime.eval_noises and start == 0:
        with autocast:
            metrics[f"{phase.name}/eval_loss_before"] = measure_loss(
                trainee, sources[0].dataset, config.seed, config.runtime.eval_noises, device
            )
    trainee.unet.train(phase.unet_trained)
    for encoder in trainee.text_encoders:
        encoder.train(phase.text_trained)
    all_params = list(params.values())
    t_count = trainee.noise_scheduler.config.num_train_timesteps

    def draw() -> list[dict]:
        """One micro-batch (one batch per image size) with its noise and timesteps (the generators advance in
        a fixed order)."""
        batches = build_batch(trainee, sources, batch_size, aug_gen, noise_gen)
        for batch in batches:
            latents = batch["latents"]
            noise = torch.randn(latents.shape, generator=noise_gen)
            if config.optim.noise_offset:
                noise += config.optim.noise_offset * torch.randn(*latents.shape[:2], 1, 1, generator=noise_gen)
            timesteps = torch.randint(0, t_count, (latents.shape[0],), generator=noise_gen)
            batch["noise"], batch["timesteps"] = noise.to(device), timesteps.to(device)
            batch["pixel_weights"] = None
            if batch["masks"] is not None:
                batch["pixel_weights"] = mask_weights(
                    batch["masks"].to(device), latents.shape[-2:], config.data.mask_temperature
                )
        return batches

    losses: list[float] = []
    began = time.perf_counter()
    bar = tqdm(total=phase.steps, initial=start, desc=phase.name, disable=not config.runtime.progress, leave=False)
    for step in range(start, phase.steps):
        # ---- forward and backward over the micro-batches of one optimizer step (or over all of them at once)
        micro = [batch for _ in range(accum) for batch in draw()]
        if as_batch:
            micro, divisor = join_by_size(micro, accum), 1
        else:
            divisor = accum
        step_loss = torch.zeros((), device=device)
        for batch in micro:
            if compiled is not None:
                compiled.step_begin()
            latents = batch["latents"]
            if config.compute.channels_last:
                latents = latents.contiguous(memory_format=torch.channels_last)
            with autocast:
                embeds, pooled = encode(batch["prompts"])
                added = None if pooled is None else {"text_embeds": pooled, "time_ids": batch["time_ids"]}
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
                    config.optim.min_snr_gamma,
                    added,
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
        if config.optim.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(all_params, config.optim.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        lr = optimizer.param_groups[0]["lr"]
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if phase.ti_decay:
            for wrapper, target in zip(phase.token_embeddings, ti_targets, strict=True):
                clip_ti_decay_(wrapper.rows, lr, target)

        # ---- report
        losses.append(loss_value)
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
        bar.update(1)
        if callback is not None:
            callback(phase.step_offset + step + 1, {"loss": loss_value, "lr": lr, "phase": phase.name})

        # ---- checkpoint
        done = step + 1
        if done % config.runtime.save_steps == 0 or done == phase.steps:
            checkpoints.append(
                save_checkpoint(config.runtime.output_dir, phase.name, done, lora_snapshot(), snapshot_state(done))
            )
    bar.close()

    for model in (trainee.unet, *trainee.text_encoders):
        model.eval()
    if losses:
        metrics[f"{phase.name}/loss"] = float(np.mean(losses[-max(1, len(losses) // 10) :]))
        metrics[f"{phase.name}/seconds"] = time.perf_counter() - began
        metrics[f"{phase.name}/steps_per_second"] = len(losses) / max(metrics[f"{phase.name}/seconds"], 1e-9)
    if compiled is not None:
        metrics[f"{phase.name}/compiled"] = float(compiled.compiled is not None)
    if config.runtime.eval_noises:
        with autocast:
            metrics[f"{phase.name}/eval_loss_after"] = measure_loss(
                trainee, sources[0].dataset, config.seed, config.runtime.eval_noises, device
            )
    return metrics
