"""Training configuration: one typed dataclass per trainer, field names as the original `lora_pti` flags.

`PTIConfig` (pivotal tuning: textual inversion, then LoRA) and `DreamBoothConfig` share the options of
`TrainConfig`. `from_dict` builds a config from a YAML/JSON mapping (unknown keys are an error) and
`to_dict` gives the JSON-serialisable form stored in the output file's metadata.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
Precision = Literal["auto", "no", "fp16", "bf16"]
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune", "trace")

# names of the original trainer that mean "the dataset folder holds masks" (`name.mask.png`)
ALIASES = {"use_face_segmentation_condition": "use_masks", "use_mask_captioned_data": "use_masks"}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {list(choices)}")


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")


def _check_float(name: str, value, minimum: float = 0.0, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name}={value!r} must be a finite number >= {minimum}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be true or false")


@dataclass
class TrainConfig:
    """Options shared by every trainer.

    Args:
        pretrained_model_name_or_path: base model: a diffusers folder or hub id.
        instance_data_dir: folder of training images (captions `name.txt`, masks `name.mask.png`).
        output_dir: where the output file and `checkpoints/` go.
        pretrained_vae_name_or_path: another VAE (a folder with the VAE's files), optional.
        revision: hub revision of the base model.
        out_name: output file name without extension (`<output_dir>/<out_name>.safetensors`).
        seed: seed of every random choice (data order, augmentation, noise, timesteps, LoRA init).
        resolution: training resolution in pixels (a multiple of the VAE's downsampling factor).
        crop: "center" or "random" crop after resizing the shorter side to `resolution`.
        horizontal_flip: random horizontal flips.
        color_jitter: random brightness/contrast (±10%).
        on_bad_files: "error" (list unusable files in one error) or "skip" (drop them with a warning).
        use_masks: weight the loss by the dataset's masks (original `use_face_segmentation_condition`
            and `use_mask_captioned_data`: the masks come from preprocessing).
        mask_temperature: mask weight = (mask + 0.01) ** mask_temperature, normalised to max 1.
        train_inpainting: train a 9-channel inpainting UNet with random cutout masks.
        train_batch_size: images per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        gradient_checkpointing: trade compute for memory in the UNet and text encoder.
        mixed_precision: "auto" (bf16 on CUDA, fp32 on CPU), "no", "fp16" (with a gradient scaler), "bf16".
        scale_lr: multiply every learning rate by train_batch_size * gradient_accumulation_steps.
        lr_scheduler, lr_warmup_steps: schedule of the first phase (inversion; DreamBooth's only phase).
        save_steps: write a checkpoint every this many optimizer steps (and at the end of each phase).
        lora_rank, lora_alpha, lora_dropout_p: the LoRA adapters (alpha None = rank: scale 1).
        use_extended_lora: LoRA on the ResNet convolutions too (preset "unet-extended").
        learning_rate_unet, learning_rate_text: LoRA learning rates of UNet and text encoder.
        weight_decay_lora: AdamW weight decay of the LoRA parameters.
        train_text_encoder: add LoRA to the text encoder too.
        use_8bit_adam: bitsandbytes AdamW8bit (needs CUDA and the bitsandbytes package).
        cached_latents: "auto" (cache VAE latents when augmentation allows), "on", "off".
        cache_text_embeddings: cache prompt embeddings while the text encoder is frozen.
        min_snr_gamma: min-SNR-γ loss weighting (e.g. 5.0); None = plain MSE.
        noise_offset: offset noise strength (e.g. 0.05); 0 = off.
        max_grad_norm: gradient clipping norm; None = off.
        device: "auto" (cuda if present), "cpu", "cuda", "cuda:1", ...
        resume: None, "auto" (the latest complete checkpoint in output_dir, if any) or a checkpoint folder.
        save_dtype: precision of the output file ("fp32", "fp16", "bf16").
        eval_noises: measure the loss on every training image with this many fixed (noise, timestep)
            pairs before and after each phase (metrics `<phase>/eval_loss_before|after`); 0 = off.
        progress: show a progress bar.
        compile: `torch.compile` the UNet: "auto" ("reduce-overhead", i.e. CUDA graphs, on CUDA; "none"
            elsewhere), "none" (eager), "default", "reduce-overhead", "max-autotune", or "trace" (graphs
            captured and run with eager kernels: checks tracing without a compiler). Falls back to eager,
            with a warning, where compiling fails.
        accumulation: how `gradient_accumulation_steps` run: "batch" (the micro-batches as one larger
            batch: the same loss and gradient, fewer kernel launches, more memory), "loop" (one micro-batch
            at a time), "auto" ("batch" unless LoRA dropout (random per call) or gradient checkpointing
            (a sign that memory is short) is on).
        channels_last: store the UNet's convolution weights channels-last (faster convolutions on tensor
            cores).
        cast_base_weights: with mixed precision, cast the frozen base Linear/Conv weights to the autocast
            dtype once, instead of autocast casting them on every call (the same numbers: autocast
            computes those layers in that dtype anyway). Trained parameters stay fp32.
    """

    pretrained_model_name_or_path: str = ""
    instance_data_dir: str = ""
    output_dir: str = ""
    pretrained_vae_name_or_path: str | None = None
    revision: str | None = None
    out_name: str = "final_lora"
    seed: int = 42
    resolution: int = 512
    crop: Literal["center", "random"] = "center"
    horizontal_flip: bool = False
    color_jitter: bool = False
    on_bad_files: Literal["error", "skip"] = "error"
    use_masks: bool = False
    mask_temperature: float = 1.0
    train_inpainting: bool = False
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: Precision = "auto"
    scale_lr: bool = False
    lr_scheduler: Scheduler = "constant"
    lr_warmup_steps: int = 0
    save_steps: int = 500
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_dropout_p: float = 0.0
    use_extended_lora: bool = False
    learning_rate_unet: float = 1e-4
    learning_rate_text: float = 1e-5
    weight_decay_lora: float = 0.001
    train_text_encoder: bool = False
    use_8bit_adam: bool = False
    cached_latents: Literal["auto", "on", "off"] = "auto"
    cache_text_embeddings: bool = True
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    max_grad_norm: float | None = 1.0
    device: str = "auto"
    resume: str | None = None
    save_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    eval_noises: int = 2
    progress: bool = True
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune", "trace"] = "auto"
    accumulation: Literal["auto", "batch", "loop"] = "auto"
    channels_last: bool = False
    cast_base_weights: bool = True

    def __post_init__(self):
        for name in ("pretrained_model_name_or_path", "instance_data_dir", "output_dir"):
            if not isinstance(getattr(self, name), (str, Path)) or not str(getattr(self, name)):
                raise ValueError(f"{name} is required")
            setattr(self, name, str(getattr(self, name)))
        if not self.out_name or "/" in self.out_name:
            raise ValueError(f"out_name={self.out_name!r} must be a plain file name")
        _check_int("seed", self.seed, 0)
        _check_int("resolution", self.resolution, 8)
        _check_choice("crop", self.crop, ("center", "random"))
        _check_choice("on_bad_files", self.on_bad_files, ("error", "skip"))
        _check_float("mask_temperature", self.mask_temperature, 0.0)
        _check_int("train_batch_size", self.train_batch_size, 1)
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        _check_choice("mixed_precision", self.mixed_precision, ("auto", "no", "fp16", "bf16"))
        _check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        _check_int("lr_warmup_steps", self.lr_warmup_steps, 0)
        _check_int("save_steps", self.save_steps, 1)
        _check_int("lora_rank", self.lora_rank, 1)
        _check_float("lora_alpha", self.lora_alpha, 1e-12, allow_none=True)
        _check_float("lora_dropout_p", self.lora_dropout_p, 0.0)
        if self.lora_dropout_p >= 1:
            raise ValueError(f"lora_dropout_p={self.lora_dropout_p!r} must be < 1")
        for name in ("learning_rate_unet", "learning_rate_text", "weight_decay_lora", "noise_offset"):
            _check_float(name, getattr(self, name), 0.0)
        _check_float("min_snr_gamma", self.min_snr_gamma, 1e-12, allow_none=True)
        _check_float("max_grad_norm", self.max_grad_norm, 1e-12, allow_none=True)
        _check_choice("cached_latents", self.cached_latents, ("auto", "on", "off"))
        _check_choice("save_dtype", self.save_dtype, ("fp32", "fp16", "bf16"))
        _check_int("eval_noises", self.eval_noises, 0)
        _check_choice("compile", self.compile, COMPILE_MODES)
        _check_choice("accumulation", self.accumulation, ("auto", "batch", "loop"))
        for f in dataclasses.fields(self):
            if f.type == "bool":
                _check_bool(f.name, getattr(self, f.name))
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda', 'cuda:<n>' or 'mps'")
        if self.cached_latents == "on" and (self.crop == "random" or self.horizontal_flip or self.color_jitter):
            raise ValueError(
                "cached_latents='on' cannot be used with random crop, horizontal_flip or color_jitter "
                "(every step sees a different image); use cached_latents='auto'"
            )

    def scaled(self, lr: float) -> float:
        """`lr` scaled by the effective batch size when scale_lr is on (as the original trainer)."""
        return lr * self.train_batch_size * self.gradient_accumulation_steps if self.scale_lr else lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a mapping (a parsed YAML/JSON file); unknown keys are a ValueError naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        out: dict[str, Any] = {}
        unknown = []
        for key, value in values.items():
            key = ALIASES.get(key, key)
            if key in names:
                out[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} option(s): {sorted(unknown)}")
        return cls(**out)


@dataclass
class PTIConfig(TrainConfig):
    """Pivotal tuning: phase 1 learns new tokens (textual inversion), phase 2 tunes LoRA around them.

    Args:
        placeholder_tokens: the new tokens, "<s1>|<s2>".
        initializer_tokens: one word per token ("dog|toy") or one for all; None = random rows with the
            mean norm of the vocabulary. "<rand-0.017>" (random, that std) and "<zero>" as the original.
        placeholder_token_at_data: "word|<s1><s2>": replace `word` in captions by the tokens.
        use_template: "object", "style" or "none" (captions from `name.txt` or file names).
        templates: a user list of templates (each with one "{}"), instead of use_template.
        perform_inversion: run phase 1.
        perform_tuning: run phase 2.
        max_train_steps_ti, max_train_steps_tuning: optimizer steps of each phase.
        learning_rate_ti, weight_decay_ti: phase 1 AdamW settings of the token rows.
        clip_ti_decay: after each phase-1 step pull the token norms toward `ti_target_norm`, with
            strength min(1, 100 · lr), as the original `clip_ti_decay`.
        ti_target_norm: target norm of the token rows; None (default): the mean norm of the base
            vocabulary's rows, measured from the text encoder (the original's fixed 0.4 was chosen for SD's
            CLIP vocabulary; a text encoder with other embedding norms needs its own).
        continue_inversion: keep training the tokens in phase 2, at `continue_inversion_lr`
            (None = learning_rate_ti).
        lr_scheduler_lora, lr_warmup_steps_lora: schedule of phase 2.
        prior_data_dir: a folder of regularization images with their own captions (`name.txt`: images of
            what the model should keep drawing, e.g. its class in other contexts; kohya's reg images). Each
            phase-2 batch holds as many of them as instance images, their loss weighted by
            `prior_loss_weight`: LoRA learns the concept without redrawing everything else as it.
        prior_loss_weight: weight of the regularization images' loss.
    """

    placeholder_tokens: str = "<s>"
    initializer_tokens: str | None = None
    placeholder_token_at_data: str | None = None
    use_template: Literal["object", "style", "none"] = "none"
    templates: list[str] | None = None
    perform_inversion: bool = True
    perform_tuning: bool = True
    max_train_steps_ti: int = 1000
    max_train_steps_tuning: int = 1000
    learning_rate_ti: float = 5e-4
    weight_decay_ti: float = 0.0
    clip_ti_decay: bool = True
    ti_target_norm: float | None = None
    continue_inversion: bool = False
    continue_inversion_lr: float | None = None
    prior_data_dir: str | None = None
    prior_loss_weight: float = 1.0
    lr_scheduler_lora: Scheduler = "linear"
    lr_warmup_steps_lora: int = 0

    def __post_init__(self):
        super().__post_init__()
        from .tokens import parse_tokens

        parse_tokens(self.placeholder_tokens)
        if self.initializer_tokens is not None:
            n_tok, n_init = len(self.placeholder_tokens.split("|")), len(self.initializer_tokens.split("|"))
            if n_init not in (1, n_tok):
                raise ValueError(
                    f"initializer_tokens={self.initializer_tokens!r}: give one word, or one per placeholder ({n_tok})"
                )
        if self.use_template is None:
            self.use_template = "none"
        _check_choice("use_template", self.use_template, ("object", "style", "none"))
        if self.templates is not None and (not self.templates or any("{}" not in t for t in self.templates)):
            raise ValueError(f"templates={self.templates!r}: give a non-empty list, each with one '{{}}'")
        _check_int("max_train_steps_ti", self.max_train_steps_ti, 0)
        _check_int("max_train_steps_tuning", self.max_train_steps_tuning, 0)
        for name in ("learning_rate_ti", "weight_decay_ti"):
            _check_float(name, getattr(self, name), 0.0)
        _check_float("ti_target_norm", self.ti_target_norm, 0.0, allow_none=True)
        _check_float("continue_inversion_lr", self.continue_inversion_lr, 0.0, allow_none=True)
        _check_choice("lr_scheduler_lora", self.lr_scheduler_lora, SCHEDULERS)
        _check_int("lr_warmup_steps_lora", self.lr_warmup_steps_lora, 0)
        _check_float("prior_loss_weight", self.prior_loss_weight, 0.0)
        if self.prior_data_dir is not None and not Path(self.prior_data_dir).is_dir():
            raise FileNotFoundError(f"prior_data_dir={self.prior_data_dir!r}: no such folder")
        if not self.perform_inversion and not self.perform_tuning:
            raise ValueError("perform_inversion and perform_tuning are both false: nothing to train")


@dataclass
class DreamBoothConfig(TrainConfig):
    """DreamBooth LoRA: an instance prompt with a rare token, and optional prior preservation.

    Args:
        instance_prompt: prompt of every instance image, e.g. "a photo of sks dog".
        class_prompt: prompt of the class images, e.g. "a photo of dog" (needed with prior preservation).
        with_prior_preservation: add the class images' loss, weighted by prior_loss_weight.
        prior_loss_weight: weight of the class (prior) loss.
        class_data_dir: folder of class images; missing ones (up to num_class_images) are generated
            with the base model and written there.
        num_class_images: how many class images to use.
        sample_batch_size: batch size of class image generation.
        class_inference_steps: denoising steps per generated class image.
        max_train_steps: optimizer steps.
    """

    instance_prompt: str = ""
    class_prompt: str | None = None
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    class_data_dir: str | None = None
    num_class_images: int = 100
    sample_batch_size: int = 4
    class_inference_steps: int = 25
    max_train_steps: int = 1000

    def __post_init__(self):
        super().__post_init__()
        if not self.instance_prompt:
            raise ValueError("instance_prompt is required (e.g. 'a photo of sks dog')")
        if self.with_prior_preservation:
            if not self.class_prompt:
                raise ValueError("with_prior_preservation needs class_prompt (e.g. 'a photo of dog')")
            if not self.class_data_dir:
                raise ValueError("with_prior_preservation needs class_data_dir (class images are written there)")
        _check_float("prior_loss_weight", self.prior_loss_weight, 0.0)
        _check_int("num_class_images", self.num_class_images, 1)
        _check_int("sample_batch_size", self.sample_batch_size, 1)
        _check_int("class_inference_steps", self.class_inference_steps, 1)
        _check_int("max_train_steps", self.max_train_steps, 1)
        if self.train_inpainting:
            raise ValueError("train_inpainting is supported by the PTI trainer only")


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping from a file (by extension; .yaml/.yml/.json)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path}: no such file")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    elif path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        raise ValueError(f"config file {path}: use a .yaml, .yml or .json file")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: must hold a mapping of option: value")
    return data
