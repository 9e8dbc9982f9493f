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


def option(default, help: str):
    """A config field with its help text: `lora-ops train --help`, docs/training.md and the class docstring
    all read it from `field.metadata["help"]`."""
    return dataclasses.field(default=default, metadata={"help": help})


def runtime(default, help: str):
    """An option of how a run executes or where its files are, not of what it computes: it may differ between a
    run and its resumption (a retried pipeline step downloads the same model and images to a new folder)."""
    return dataclasses.field(default=default, metadata={"help": help, "runtime": True})


def resumable_config(config) -> dict[str, Any]:
    """The options a checkpoint records and a resumption must repeat: every field but the runtime ones."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if not f.metadata.get("runtime")}


def resume_changes(saved: Mapping[str, Any], config) -> list[str]:
    """The options that differ between a checkpoint's `resumable_config` and `config`, sorted; an option added
    after the checkpoint was written counts as unchanged while it has its default."""
    now = resumable_config(config)
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    return sorted(k for k in set(saved) | set(now) if saved.get(k, defaults.get(k)) != now.get(k))


def help_text(f: dataclasses.Field) -> str:
    return f.metadata.get("help", "")


def document(cls):
    """Append an `Args:` section, built from the fields' help, to a config class's docstring."""
    own = [f for f in dataclasses.fields(cls) if f.name in cls.__dict__.get("__annotations__", {})]
    lines = [f"        {f.name}: {help_text(f)} (default: {f.default!r})." for f in own]
    cls.__doc__ = (cls.__doc__ or "").rstrip() + "\n\n    Args:\n" + "\n".join(lines) + "\n"
    return cls


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


@document
@dataclass
class TrainConfig:
    """Options shared by every trainer (each field's help is in its metadata: `--help`, docs/training.md)."""

    pretrained_model_name_or_path: str = runtime("", "base model: a diffusers folder or hub id (required)")
    instance_data_dir: str = runtime(
        "", "folder of training images, with captions `name.txt` and masks `name.mask.png` (required)"
    )
    output_dir: str = runtime("", "where the output file and `checkpoints/` go (required)")
    pretrained_vae_name_or_path: str | None = runtime(None, "another VAE: a folder with the VAE's files")
    revision: str | None = option(None, "hub revision of the base model")
    out_name: str = runtime("final_lora", "output file name without extension: `<output_dir>/<out_name>.safetensors`")
    seed: int = option(42, "seed of every random choice: data order, augmentation, noise, timesteps, LoRA init")
    resolution: int = option(512, "training resolution in pixels (a multiple of the VAE's downsampling factor)")
    crop: Literal["center", "random"] = option("center", "crop after resizing the shorter side to `resolution`")
    horizontal_flip: bool = option(False, "random horizontal flips")
    color_jitter: bool = option(False, "random brightness and contrast (±10%); the original lora_pti defaulted to on")
    on_bad_files: Literal["error", "skip"] = option(
        "error", "unusable image files: `error` lists them all in one error, `skip` drops them with a warning"
    )
    use_masks: bool = option(
        False,
        "weight the loss by the dataset's masks (from preprocessing); the original "
        "`use_face_segmentation_condition` and `use_mask_captioned_data` mean this",
    )
    mask_temperature: float = option(1.0, "mask weight = (mask + 0.01) ** mask_temperature, normalised to max 1")
    train_inpainting: bool = option(False, "train a 9-channel inpainting UNet with random cutout masks")
    train_batch_size: int = option(1, "images per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    gradient_checkpointing: bool = option(False, "trade compute for memory in the UNet and text encoder")
    mixed_precision: Precision = option(
        "auto", "`auto` (bf16 on CUDA, fp32 elsewhere), `no`, `fp16` (with a gradient scaler), `bf16`"
    )
    scale_lr: bool = option(False, "multiply every learning rate by train_batch_size × gradient_accumulation_steps")
    lr_scheduler: Scheduler = option(
        "constant", "learning-rate schedule of the first phase (inversion; DreamBooth's only phase)"
    )
    lr_warmup_steps: int = option(0, "warm-up steps of `lr_scheduler`")
    save_steps: int = runtime(500, "write a checkpoint every this many optimizer steps (and at the end of each phase)")
    lora_rank: int = option(4, "rank r of the LoRA adapters")
    lora_alpha: float | None = option(None, "LoRA alpha: the adapters' scale is alpha / r; none = r (scale 1)")
    lora_dropout_p: float = option(0.0, "dropout probability on the LoRA path")
    use_extended_lora: bool = option(False, "LoRA on the UNet's ResNet convolutions too (preset `unet-extended`)")
    learning_rate_unet: float = option(1e-4, "learning rate of the UNet LoRA")
    learning_rate_text: float = option(1e-5, "learning rate of the text-encoder LoRA")
    weight_decay_lora: float = option(0.001, "AdamW weight decay of the LoRA parameters")
    train_text_encoder: bool = option(False, "add LoRA to the text encoder's attention too")
    use_8bit_adam: bool = option(False, "bitsandbytes AdamW8bit (needs CUDA and the bitsandbytes package)")
    cached_latents: Literal["auto", "on", "off"] = option(
        "auto", "cache the VAE latents: `auto` (when no augmentation changes the images), `on`, `off`"
    )
    cache_text_embeddings: bool = option(True, "cache prompt embeddings while the text encoder is frozen")
    min_snr_gamma: float | None = option(None, "min-SNR-γ loss weighting (e.g. 5.0); none = plain MSE")
    noise_offset: float = option(0.0, "offset-noise strength (e.g. 0.05); 0 = off")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm; none = off")
    device: str = runtime("auto", "`auto` (CUDA, else MPS, else CPU), `cpu`, `cuda`, `cuda:N`, `mps`")
    resume: str | None = runtime(
        None, "`auto` (the latest complete checkpoint in output_dir, if any) or a checkpoint folder; none = fresh"
    )
    save_dtype: Literal["fp32", "fp16", "bf16"] = runtime("fp32", "precision of the output file")
    eval_noises: int = runtime(
        2,
        "measure the loss on every training image with this many fixed (noise, timestep) pairs before and "
        "after each phase (metrics `<phase>/eval_loss_before|after`); 0 = off",
    )
    progress: bool = runtime(True, "show a progress bar")
    compile: Literal["auto", "none", "default", "reduce-overhead", "max-autotune", "trace"] = option(
        "auto",
        "`torch.compile` the UNet: `auto` (`reduce-overhead`, i.e. CUDA graphs, on CUDA; `none` elsewhere), "
        "`none` (eager), `default`, `reduce-overhead`, `max-autotune`, or `trace` (graphs captured and run with "
        "eager kernels: checks tracing without a compiler); falls back to eager, with a warning, where "
        "compiling fails",
    )
    accumulation: Literal["auto", "batch", "loop"] = option(
        "auto",
        "how gradient_accumulation_steps run: `batch` (the micro-batches as one larger batch: the same loss "
        "and gradient, fewer kernel launches, more memory), `loop` (one micro-batch at a time), `auto` "
        "(`batch` unless LoRA dropout or gradient checkpointing is on)",
    )
    channels_last: bool = option(False, "store the UNet's convolution weights channels-last (faster on tensor cores)")
    cast_base_weights: bool = option(
        True,
        "with mixed precision, cast the frozen base Linear/Conv weights to the autocast dtype once instead of "
        "on every call (the same numbers); trained parameters stay fp32",
    )

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


@document
@dataclass
class PTIConfig(TrainConfig):
    """Pivotal tuning: phase 1 learns new tokens (textual inversion), phase 2 tunes LoRA around them."""

    placeholder_tokens: str = option("<s>", "the new tokens, `<s1>|<s2>`")
    initializer_tokens: str | None = option(
        None,
        "one word per token (`dog|toy`) or one for all; `<rand-0.017>` (random, that std) and `<zero>` as the "
        "original; none = random rows with the vocabulary's mean norm",
    )
    placeholder_token_at_data: str | None = option(
        None, "`word|<s1><s2>`: replace `word` in the captions by the tokens"
    )
    use_template: Literal["object", "style", "none"] = option(
        "none", "prompt templates `object` or `style`; `none`: captions from `name.txt` or the file names"
    )
    templates: list[str] | None = option(
        None, "your own prompt templates (each with one `{}`), instead of use_template"
    )
    perform_inversion: bool = option(True, "run phase 1, textual inversion")
    perform_tuning: bool = option(True, "run phase 2, LoRA tuning")
    max_train_steps_ti: int = option(1000, "optimizer steps of phase 1 (textual inversion)")
    max_train_steps_tuning: int = option(1000, "optimizer steps of phase 2 (LoRA tuning)")
    learning_rate_ti: float = option(5e-4, "learning rate of the token rows in phase 1")
    weight_decay_ti: float = option(0.0, "AdamW weight decay of the token rows in phase 1")
    clip_ti_decay: bool = option(
        True,
        "after each phase-1 step pull the token norms toward ti_target_norm, with strength min(1, 100 · lr), "
        "as the original",
    )
    ti_target_norm: float | None = option(
        None,
        "target norm of the token rows; none = the mean norm of the base vocabulary's rows, measured from the "
        "text encoder (the original's fixed 0.4 suits SD's CLIP only)",
    )
    continue_inversion: bool = option(False, "keep training the tokens in phase 2, at continue_inversion_lr")
    continue_inversion_lr: float | None = option(
        None, "learning rate of the tokens in phase 2 with continue_inversion; none = learning_rate_ti"
    )
    prior_data_dir: str | None = option(
        None,
        "folder of regularization images with their own captions (`name.txt`; kohya's reg images): each "
        "phase-2 batch holds as many of them as instance images, so the LoRA learns the concept without "
        "redrawing everything else as it",
    )
    prior_loss_weight: float = option(1.0, "weight of the regularization images' loss (prior_data_dir)")
    lr_scheduler_lora: Scheduler = option("linear", "learning-rate schedule of phase 2")
    lr_warmup_steps_lora: int = option(0, "warm-up steps of `lr_scheduler_lora`")

    def __post_init__(self):
        super().__post_init__()
        from ..tokens import parse_tokens

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


@document
@dataclass
class DreamBoothConfig(TrainConfig):
    """DreamBooth LoRA: an instance prompt with a rare token, and optional prior preservation."""

    instance_prompt: str = option("", "prompt of every instance image, e.g. `a photo of sks dog` (required)")
    class_prompt: str | None = option(
        None, "prompt of the class images, e.g. `a photo of dog` (needed with with_prior_preservation)"
    )
    with_prior_preservation: bool = option(False, "add the class images' loss, weighted by prior_loss_weight")
    prior_loss_weight: float = option(1.0, "weight of the class (prior) loss")
    class_data_dir: str | None = runtime(
        None,
        "folder of class images; missing ones (up to num_class_images) are generated with the base model and "
        "written there",
    )
    num_class_images: int = option(100, "how many class images to use")
    sample_batch_size: int = option(4, "batch size of class-image generation")
    class_inference_steps: int = option(25, "denoising steps per generated class image")
    max_train_steps: int = option(1000, "optimizer steps")

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
