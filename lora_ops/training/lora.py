"""The LoRA side of training: adapters injected for training, their metadata, and the native file of a run's state."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..inject import LoraConfig, extract_lora, inject_lora
from ..lora_file import LoraFile
from ..models import components
from ..tokens import read_lora_tokens
from .config import TrainConfig
from .trainee import Trainee, cast_frozen_weights


def lora_metadata(trainee: Trainee, trainer: str, phases: list[str]) -> dict:
    config = trainee.config
    targets = {"unet": config.lora.unet_target_modules if "lora" in phases else None}
    for name in text_components(trainee):
        targets[name] = "text_encoder" if config.lora.train_text_encoder and "lora" in phases else None
    alpha = config.lora.alpha
    training = {**config.to_dict(), "trainer": trainer}
    return {
        "base_model": config.runtime.pretrained_model_name_or_path,
        "targets": targets,
        "alphas": {name: alpha if target else None for name, target in targets.items()},
        "training_config": training,
    }


def text_components(trainee: Trainee) -> list[str]:
    """The text encoders' component names: text_encoder, and text_encoder_2 for SDXL."""
    return [name for name in components(trainee.pipe) if name != "unet"]


def current_lora(trainee: Trainee, tokens: list[str], token_embeddings: list[nn.Module], meta: dict) -> LoraFile:
    """The native file of the current state: LoRA of every model, token rows (of each text encoder), metadata.

    `token_embeddings`: the wrapped token rows being trained, one per text encoder, or [] to read the rows from
    the embedding tables.
    """
    if token_embeddings:
        tables = [{t: w.rows[i].detach().float().cpu().clone() for i, t in enumerate(tokens)} for w in token_embeddings]
    else:
        tables = list(read_lora_tokens(trainee, tokens).values()) if tokens else [{}]
    lora = LoraFile(tokens=tables[0], tokens_2=tables[1] if len(tables) > 1 else {}, metadata=meta)
    for name, model in components(trainee.pipe).items():
        lora.component(name).update(extract_lora(model, name))
    return lora


def inject_trainable_lora(trainee: Trainee, config: TrainConfig) -> list[dict]:
    """Add LoRA to the UNet (and text encoder); returns their AdamW parameter groups.

    The initial lora_A draws from the global torch RNG, seeded here so that the same seed gives the same
    start whether or not phase 1 ran in the same process.
    """
    torch.manual_seed(config.seed + 7)
    # a previous phase may have cast the frozen weights to bf16/fp16 (cast_base_weights); peft creates LoRA
    # weights in their layer's dtype, so make the layers fp32 again (exact: every bf16/fp16 value is an fp32
    # value) for fp32 LoRA weights; `run_phase` casts the frozen weights back
    for model in (trainee.unet, *trainee.text_encoders):
        cast_frozen_weights(model, torch.float32)
    unet_cfg = LoraConfig(
        target_modules=config.lora.unet_target_modules,
        r=config.lora.r,
        lora_alpha=config.lora.lora_alpha,
        lora_dropout=config.lora.lora_dropout,
    )
    inject_lora(trainee.unet, unet_cfg)
    groups = [
        {
            "name": "unet",
            "params": {n: p for n, p in trainee.unet.named_parameters() if p.requires_grad},
            "lr": config.optim.scaled(config.optim.learning_rate_unet),
            "weight_decay": config.optim.weight_decay_lora,
        }
    ]
    if config.lora.train_text_encoder:
        te_cfg = dataclasses.replace(unet_cfg, target_modules="text_encoder")
        for name in text_components(trainee):
            encoder = getattr(trainee.pipe, name)
            inject_lora(encoder, te_cfg)
            groups.append(
                {
                    "name": name,
                    "params": {n: p for n, p in encoder.named_parameters() if p.requires_grad},
                    "lr": config.optim.scaled(config.optim.learning_rate_text),
                    "weight_decay": config.optim.weight_decay_lora,
                }
            )
    return groups
