"""Pivotal tuning inversion (PTI): learn new tokens, then tune LoRA around them.

Phase 1 ("inversion") trains only the rows of the new placeholder tokens in the text encoder's embedding
table; phase 2 ("tuning") trains LoRA on the UNet (and optionally the text encoder), optionally still
training the tokens (`continue_inversion`). `train_pti` runs both as configured, `run_inversion` and
`run_tuning` one each. The loop itself is `lora_ops.training.loop.run_phase`, shared with DreamBooth.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..dataset import DatasetConfig, ImageDataset
from ..lora_file import load_lora, save_lora
from ..tokens import add_tokens, apply_lora_tokens, init_token_embeddings, parse_tokens, text_pairs
from .batches import Source
from .checkpoints import load_checkpoint, resolve_resume
from .config import PTIConfig
from .loop import Callback, Phase, TrainResult, run_phase
from .lora import current_lora, inject_trainable_lora, lora_metadata
from .token_rows import TokenEmbedding, unwrap_token_embedding, wrap_token_embedding
from .trainee import Trainee, load_trainee


def _init_tokens(trainee: Trainee, tokens: list[str], initializer: str | None, seed: int) -> dict[str, list[int]]:
    """Add the placeholder tokens to every text encoder and initialise their rows (words, "<rand-σ>", "<zero>"
    or random), each encoder from its own vocabulary (SDXL: both, as diffusers' advanced SDXL script does);
    returns the tokens' ids per encoder."""
    ids_by_encoder = {}
    words = None if initializer is None else initializer.split("|")
    words = words * len(tokens) if words is not None and len(words) == 1 else words
    for k, (name, (tok, te)) in enumerate(text_pairs(trainee).items()):
        ids = ids_by_encoder[name] = add_tokens(tok, te, tokens)
        generator = torch.Generator().manual_seed(seed + k)
        if words is None:
            init_token_embeddings(tok, te, tokens, None, generator=generator)
            continue
        weight = te.get_input_embeddings().weight
        for token, token_id, word in zip(tokens, ids, words, strict=True):
            with torch.no_grad():
                if word.startswith("<rand-") and word.endswith(">"):
                    try:
                        sigma = float(word[6:-1])
                    except ValueError:
                        raise ValueError(f"initializer_tokens: {word!r} must look like <rand-0.017>") from None
                    weight[token_id] = (torch.randn(weight.shape[1], generator=generator) * sigma).to(weight)
                elif word == "<zero>":
                    weight[token_id] = 0.0
                else:
                    init_token_embeddings(tok, te, [token], word)
    return ids_by_encoder


def _pti_dataset(config: PTIConfig, tokens: list[str]) -> ImageDataset:
    dataset = ImageDataset(
        DatasetConfig(
            data_dir=config.runtime.instance_data_dir,
            resolution=config.data.resolution,
            placeholder_tokens=tokens,
            template=config.templates if config.templates else config.use_template,
            token_map=config.placeholder_token_at_data,
            crop=config.data.crop,
            flip=config.data.horizontal_flip,
            color_jitter=config.data.color_jitter,
            use_masks=config.data.use_masks,
            inpainting=config.data.train_inpainting,
            on_bad_files=config.data.on_bad_files,
            buckets=config.data.buckets(),
        )
    )
    if not any(t in p for p in dataset.all_prompts() for t in tokens):
        raise ValueError(
            f"no training prompt contains the placeholder tokens {tokens}: use use_template='object'/'style', "
            "captions with the tokens, or placeholder_token_at_data='word|<s1><s2>'"
        )
    return dataset


def _prior_dataset(config: PTIConfig) -> ImageDataset:
    """The regularization images of phase 2, with their own captions (no template, no token map)."""
    return ImageDataset(
        DatasetConfig(
            data_dir=config.prior_data_dir,
            resolution=config.data.resolution,
            template="none",
            crop=config.data.crop,
            flip=config.data.horizontal_flip,
            inpainting=config.data.train_inpainting,
            on_bad_files=config.data.on_bad_files,
            buckets=config.data.buckets(),
        )
    )


def token_groups(trainee: Trainee, ids: dict[str, list[int]], lr: float) -> tuple[list[dict], list[TokenEmbedding]]:
    """Wrap each text encoder's token embedding so that only the new tokens' rows train; their AdamW groups
    ("tokens", and "tokens_2" for SDXL's second encoder) and the wrappers, in text-encoder order."""
    config = trainee.config
    groups, wrappers = [], []
    for k, (name, (_, te)) in enumerate(text_pairs(trainee).items()):
        wrapper = wrap_token_embedding(te, ids[name])
        wrappers.append(wrapper)
        groups.append(
            {
                "name": "tokens" if k == 0 else f"tokens_{k + 1}",
                "params": {"rows": wrapper.rows},
                "lr": config.optim.scaled(lr),
                "weight_decay": config.weight_decay_ti,
            }
        )
    return groups, wrappers


def unwrap_tokens(trainee: Trainee) -> None:
    for encoder in trainee.text_encoders:
        unwrap_token_embedding(encoder)


def inversion_phase(trainee: Trainee, ids: dict[str, list[int]]) -> tuple[Phase, list[TokenEmbedding]]:
    """The phase-1 Phase: only the rows of the new tokens train, in every text encoder."""
    config = trainee.config
    groups, wrappers = token_groups(trainee, ids, config.learning_rate_ti)
    phase = Phase(
        name="inversion",
        steps=config.max_train_steps_ti,
        groups=groups,
        lr_scheduler=config.optim.lr_scheduler,
        warmup=config.optim.lr_warmup_steps,
        text_trained=True,
        unet_trained=False,
        token_embeddings=wrappers,
        ti_decay=config.clip_ti_decay,
    )
    return phase, wrappers


def _pti(config: PTIConfig, phases: list[str], tokens_from: str | Path | None, callback: Callback | None):
    Path(config.runtime.output_dir).mkdir(parents=True, exist_ok=True)
    resume_path = resolve_resume(config.runtime.resume, config.runtime.output_dir)
    state = load_checkpoint(resume_path) if resume_path is not None else None
    if state is not None and state["phase"] not in phases:
        raise ValueError(f"resume: {resume_path} is a {state['phase']!r} checkpoint; this run trains {phases}")
    tokens = parse_tokens(config.placeholder_tokens)
    trainee = load_trainee(config)
    dataset = _pti_dataset(config, tokens)
    meta_phases = ["tokens"] + (["lora"] if "tuning" in phases else [])
    meta = lora_metadata(trainee, "pti", meta_phases)
    metrics: dict[str, float] = {}
    checkpoints: list[Path] = []

    # ---- tokens: from a phase-1 file, from the checkpoint being resumed, or freshly initialised
    resumed_tuning = state is not None and state["phase"] == "tuning"
    if tokens_from is not None or resumed_tuning:
        source_file = load_lora(tokens_from if not resumed_tuning else resume_path / "lora.safetensors")
        if list(source_file.tokens) != tokens:
            raise ValueError(
                f"tokens_from: {tokens_from} holds tokens {list(source_file.tokens)}, "
                f"but placeholder_tokens is {config.placeholder_tokens!r}"
            )
        ids = apply_lora_tokens(trainee, source_file)
    else:
        ids = _init_tokens(trainee, tokens, config.initializer_tokens, config.seed)

    # ---- phase 1: textual inversion (only the new token rows train)
    if "inversion" in phases and not resumed_tuning:
        phase, wrappers = inversion_phase(trainee, ids)
        metrics |= run_phase(
            trainee,
            phase,
            [Source(dataset)],
            lambda: current_lora(trainee, tokens, wrappers, meta),
            callback,
            state if state is not None and state["phase"] == "inversion" else None,
            checkpoints,
        )
        unwrap_tokens(trainee)

    # ---- phase 2: LoRA tuning (UNet, optionally text encoder, optionally the tokens still)
    if "tuning" in phases:
        groups = inject_trainable_lora(trainee, config)
        wrappers = []
        if config.continue_inversion:
            lr = config.continue_inversion_lr if config.continue_inversion_lr is not None else config.learning_rate_ti
            token_param_groups, wrappers = token_groups(trainee, ids, lr)
            groups += token_param_groups
        phase = Phase(
            name="tuning",
            steps=config.max_train_steps_tuning,
            groups=groups,
            lr_scheduler=config.lr_scheduler_lora,
            warmup=config.lr_warmup_steps_lora,
            text_trained=config.lora.train_text_encoder or config.continue_inversion,
            unet_trained=True,
            token_embeddings=wrappers,
            step_offset=config.max_train_steps_ti if "inversion" in phases else 0,
        )
        sources = [Source(dataset)]
        if config.prior_data_dir:
            sources.append(Source(_prior_dataset(config), config.prior_loss_weight))
        metrics |= run_phase(
            trainee,
            phase,
            sources,
            lambda: current_lora(trainee, tokens, wrappers, meta),
            callback,
            state if resumed_tuning else None,
            checkpoints,
        )
        unwrap_tokens(trainee)

    # ---- output: the native file
    path = Path(config.runtime.output_dir) / f"{config.runtime.out_name}.safetensors"
    save_lora(path, current_lora(trainee, tokens, [], meta), dtype=config.runtime.save_dtype)
    return TrainResult(path, metrics, checkpoints)


def train_pti(config: PTIConfig, callback: Callback | None = None) -> TrainResult:
    """Pivotal tuning: phase 1 (inversion) and/or phase 2 (LoRA tuning) as configured; writes the native file."""
    phases = (["inversion"] if config.perform_inversion else []) + (["tuning"] if config.perform_tuning else [])
    return _pti(config, phases, None, callback)


def run_inversion(config: PTIConfig, callback: Callback | None = None) -> TrainResult:
    """Phase 1 only: the output file holds the learned tokens and no LoRA."""
    return _pti(config, ["inversion"], None, callback)


def run_tuning(config: PTIConfig, tokens_from: str | Path | None = None, callback: Callback | None = None):
    """Phase 2 only, starting from the tokens of a phase-1 native file (or fresh tokens when None)."""
    return _pti(config, ["tuning"], tokens_from, callback)
