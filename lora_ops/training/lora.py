"""The LoRA side of training: adapters injected for training, their metadata, and the native file of a run's state."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..inject import LoraConfig, extract_lora, inject_lora
from ..lora_file import LoraFile
from ..tokens import read_token_embeddings
from .config import TrainConfig
from .trainee import Trainee, cast_frozen_weights


def lora_metadata(config: TrainConfig, trainer: str, phases: list[str]) -> dict:
    unet_targets = config.lora.unet_target_modules if "lora" in phases else None
    te_targets = "text_encoder" if config.lora.train_text_encoder and "lora" in phases else None
    alpha = config.lora.alpha
    training = {**config.to_dict(), "trainer": trainer}
    return {
        "base_model": config.runtime.pretrained_model_name_or_path,
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
        inject_lora(trainee.text_encoder, te_cfg)
        groups.append(
            {
                "name": "text_encoder",
                "params": {n: p for n, p in trainee.text_encoder.named_parameters() if p.requires_grad},
                "lr": config.optim.scaled(config.optim.learning_rate_text),
                "weight_decay": config.optim.weight_decay_lora,
            }
        )
    return groups
