"""Training configuration: one typed dataclass per trainer, its shared options in sections.

A trainer's config (`PTIConfig`, `DreamBoothConfig`) holds its recipe's own options (tokens, phases, prompts),
`seed` and `revision`, and five sections shared by every trainer:

- `data` (`DataSection`): how the images become batches: resolution, crops, augmentation, masks, caches;
- `lora` (`LoraSection`): the adapters, in peft's vocabulary (`r`, `lora_alpha`, `lora_dropout`);
- `optim` (`OptimSection`): batch size, learning rates, schedule, accumulation, clipping, loss weighting;
- `compute` (`ComputeSection`): precision, compilation and memory trade-offs;
- `runtime` (`RuntimeSection`): where the files are and how the run is watched: by construction the only
  options a resumed run may change (a retried pipeline step downloads the same model and images to a new
  folder); a checkpoint records every other option (`resumable_config`) and a resumption must repeat them.

Every option also has one flat name, the flag of the original `lora_pti` (`lora_rank` is `lora.r`,
`lora_dropout_p` is `lora.lora_dropout`, `learning_rate_unet` is `optim.learning_rate_unet`): the
constructor, `from_dict`, config files and the CLI take flat names, nested sections (`{"lora": {"r": 4}}`)
or both, and the original trainer's mask flags are aliases of `data.use_masks`. `to_dict` gives the nested,
JSON-serialisable form stored in the output file's metadata (`from_dict` reads it back).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .options import (
    RUNTIME,
    check_bools,
    check_choice,
    check_float,
    check_int,
    config_class,
    document,
    option,
    options,
    section,
)

if TYPE_CHECKING:
    from ..batching import Buckets

SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
Scheduler = Literal["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
Precision = Literal["auto", "no", "fp16", "bf16"]
COMPILE_MODES = ("auto", "none", "default", "reduce-overhead", "max-autotune", "trace")

# names of the original trainer that mean "the dataset folder holds masks" (`name.mask.png`)
ALIASES = {"use_face_segmentation_condition": "use_masks", "use_mask_captioned_data": "use_masks"}
SECTIONS = ("data", "lora", "optim", "compute", RUNTIME)  # the sections of `TrainConfig`, in order


@document
@dataclass
class DataSection:
    """How the training images become batches."""

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
    cached_latents: Literal["auto", "on", "off"] = option(
        "auto", "cache the VAE latents: `auto` (when no augmentation changes the images), `on`, `off`"
    )
    cache_text_embeddings: bool = option(True, "cache prompt embeddings while the text encoder is frozen")
    enable_bucket: bool | None = option(
        None,
        "aspect-ratio bucketing: train each image at the bucket (h, w) nearest its aspect ratio, at most "
        "resolution² pixels, instead of a square crop; each batch holds one bucket. none = on for SDXL bases, "
        "off (square crops) for SD 1.x/2.x",
    )
    bucket_reso_steps: int = option(64, "bucket sides are multiples of this many pixels (64 for Stable Diffusion)")
    min_bucket_reso: int | None = option(None, "the shortest bucket side; none = resolution / 2")
    max_bucket_reso: int | None = option(None, "the longest bucket side; none = resolution × 2")

    def bucketing(self, sdxl: bool) -> bool:
        """Whether the datasets are bucketed, for an SDXL base or not."""
        return sdxl if self.enable_bucket is None else self.enable_bucket

    def buckets(self, sdxl: bool = False) -> Buckets | None:
        """The datasets' aspect-ratio buckets (for an SDXL base or not), or None without bucketing."""
        if not self.bucketing(sdxl):
            return None
        from ..batching import Buckets  # torch: not for building the CLI's parsers

        return Buckets(self.resolution, self.bucket_reso_steps, self.min_bucket_reso, self.max_bucket_reso)

    def __post_init__(self):
        check_int("resolution", self.resolution, 8)
        check_int("bucket_reso_steps", self.bucket_reso_steps, 8)
        for name in ("min_bucket_reso", "max_bucket_reso"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 8)
        check_choice("crop", self.crop, ("center", "random"))
        check_choice("on_bad_files", self.on_bad_files, ("error", "skip"))
        check_float("mask_temperature", self.mask_temperature, 0.0)
        check_choice("cached_latents", self.cached_latents, ("auto", "on", "off"))
        check_bools(self)
        if self.enable_bucket is not None and not isinstance(self.enable_bucket, bool):
            raise ValueError(f"enable_bucket={self.enable_bucket!r} must be true, false or none")
        if self.enable_bucket:
            self.buckets()  # a bucket layout that cannot work fails here, naming the option
        if self.cached_latents == "on" and (self.crop == "random" or self.horizontal_flip or self.color_jitter):
            raise ValueError(
                "cached_latents='on' cannot be used with random crop, horizontal_flip or color_jitter "
                "(every step sees a different image); use cached_latents='auto'"
            )


@document
@dataclass
class LoraSection:
    """The trained adapters, in peft's vocabulary (`inject.LoraConfig` takes the same names)."""

    r: int = option(4, "rank r of the LoRA adapters", flag="lora_rank")
    lora_alpha: float | None = option(None, "LoRA alpha: the adapters' scale is alpha / r; none = r (scale 1)")
    lora_dropout: float = option(0.0, "dropout probability on the LoRA path", flag="lora_dropout_p")
    use_extended_lora: bool = option(False, "LoRA on the UNet's ResNet convolutions too (preset `unet-extended`)")
    train_text_encoder: bool = option(False, "add LoRA to the text encoder's attention too")

    def __post_init__(self):
        check_int("lora_rank", self.r, 1)
        check_float("lora_alpha", self.lora_alpha, 1e-12, allow_none=True)
        check_float("lora_dropout_p", self.lora_dropout, 0.0)
        if self.lora_dropout >= 1:
            raise ValueError(f"lora_dropout_p={self.lora_dropout!r} must be < 1")
        check_bools(self)

    @property
    def unet_target_modules(self) -> str:
        """The preset of `inject` that these options choose for the UNet."""
        return "unet-extended" if self.use_extended_lora else "unet"

    @property
    def alpha(self) -> float:
        """lora_alpha, or r where none is given."""
        return self.lora_alpha if self.lora_alpha is not None else self.r


@document
@dataclass
class OptimSection:
    """What the optimizer does: batch size, learning rates and their schedule, regularisation, the loss."""

    train_batch_size: int = option(1, "images per micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    scale_lr: bool = option(False, "multiply every learning rate by train_batch_size × gradient_accumulation_steps")
    lr_scheduler: Scheduler = option(
        "constant", "learning-rate schedule of the first phase (inversion; DreamBooth's only phase)"
    )
    lr_warmup_steps: int = option(0, "warm-up steps of `lr_scheduler`")
    learning_rate_unet: float = option(1e-4, "learning rate of the UNet LoRA")
    learning_rate_text: float = option(1e-5, "learning rate of the text-encoder LoRA")
    weight_decay_lora: float = option(0.001, "AdamW weight decay of the LoRA parameters")
    use_8bit_adam: bool = option(False, "bitsandbytes AdamW8bit (needs CUDA and the bitsandbytes package)")
    min_snr_gamma: float | None = option(None, "min-SNR-γ loss weighting (e.g. 5.0); none = plain MSE")
    noise_offset: float = option(0.0, "offset-noise strength (e.g. 0.05); 0 = off")
    max_grad_norm: float | None = option(1.0, "gradient clipping norm; none = off")

    def __post_init__(self):
        check_int("train_batch_size", self.train_batch_size, 1)
        check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, 1)
        check_choice("lr_scheduler", self.lr_scheduler, SCHEDULERS)
        check_int("lr_warmup_steps", self.lr_warmup_steps, 0)
        for name in ("learning_rate_unet", "learning_rate_text", "weight_decay_lora", "noise_offset"):
            check_float(name, getattr(self, name), 0.0)
        check_float("min_snr_gamma", self.min_snr_gamma, 1e-12, allow_none=True)
        check_float("max_grad_norm", self.max_grad_norm, 1e-12, allow_none=True)
        check_bools(self)

    def scaled(self, lr: float) -> float:
        """`lr` scaled by the effective batch size when scale_lr is on (as the original trainer)."""
        return lr * self.train_batch_size * self.gradient_accumulation_steps if self.scale_lr else lr


@document
@dataclass
class ComputeSection:
    """How the numbers are computed: precision, compilation, memory for speed (results equal up to rounding)."""

    mixed_precision: Precision = option(
        "auto", "`auto` (bf16 on CUDA, fp32 elsewhere), `no`, `fp16` (with a gradient scaler), `bf16`"
    )
    gradient_checkpointing: bool = option(False, "trade compute for memory in the UNet and text encoder")
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
        check_choice("mixed_precision", self.mixed_precision, ("auto", "no", "fp16", "bf16"))
        check_choice("compile", self.compile, COMPILE_MODES)
        check_choice("accumulation", self.accumulation, ("auto", "batch", "loop"))
        check_bools(self)


@document
@dataclass
class RuntimeSection:
    """Where the files are and how the run is watched: what a resumed run may change."""

    pretrained_model_name_or_path: str = option(
        "", "base model: a diffusers folder, a hub id or a one-file checkpoint `.safetensors` / `.ckpt` (required)"
    )
    single_file_config: str | None = option(
        None,
        "for a one-file checkpoint base: a diffusers folder or hub id of the same architecture whose configs and "
        "tokenizer it takes; none = diffusers infers them from the hub",
    )
    instance_data_dir: str = option(
        "", "folder of training images, with captions `name.txt` and masks `name.mask.png` (required)"
    )
    output_dir: str = option("", "where the output file and `checkpoints/` go (required)")
    pretrained_vae_name_or_path: str | None = option(None, "another VAE: a folder with the VAE's files")
    out_name: str = option("final_lora", "output file name without extension: `<output_dir>/<out_name>.safetensors`")
    save_steps: int = option(500, "write a checkpoint every this many optimizer steps (and at the end of each phase)")
    device: str = option("auto", "`auto` (CUDA, else MPS, else CPU), `cpu`, `cuda`, `cuda:N`, `mps`")
    resume: str | None = option(
        None, "`auto` (the latest complete checkpoint in output_dir, if any) or a checkpoint folder; none = fresh"
    )
    save_dtype: Literal["fp32", "fp16", "bf16"] = option("fp32", "precision of the output file")
    eval_noises: int = option(
        2,
        "measure the loss on every training image with this many fixed (noise, timestep) pairs before and "
        "after each phase (metrics `<phase>/eval_loss_before|after`); 0 = off",
    )
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        for name in ("pretrained_model_name_or_path", "instance_data_dir", "output_dir"):
            if not isinstance(getattr(self, name), (str, Path)):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a path")
            setattr(self, name, str(getattr(self, name)))
        if not self.out_name or "/" in self.out_name:
            raise ValueError(f"out_name={self.out_name!r} must be a plain file name")
        check_int("save_steps", self.save_steps, 1)
        check_choice("save_dtype", self.save_dtype, ("fp32", "fp16", "bf16"))
        check_int("eval_noises", self.eval_noises, 0)
        check_bools(self)
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            raise ValueError(f"device={self.device!r} must be 'auto', 'cpu', 'cuda', 'cuda:<n>' or 'mps'")


@config_class
class TrainConfig:
    """Options shared by every trainer: the seed, the base's revision and the five sections."""

    ALIASES: ClassVar[dict[str, str]] = ALIASES

    seed: int = option(42, "seed of every random choice: data order, augmentation, noise, timesteps, LoRA init")
    revision: str | None = option(None, "hub revision of the base model")
    data: DataSection = section(DataSection, "how the images become batches")
    lora: LoraSection = section(LoraSection, "the trained adapters, in peft's vocabulary")
    optim: OptimSection = section(OptimSection, "batch size, learning rates, schedule, loss")
    compute: ComputeSection = section(ComputeSection, "precision, compilation, memory for speed")
    runtime: RuntimeSection = section(RuntimeSection, "paths, checkpoints, device, progress: may change on resume")

    def __post_init__(self):
        for name in ("pretrained_model_name_or_path", "instance_data_dir", "output_dir"):
            if not getattr(self.runtime, name):
                raise ValueError(f"{name} is required")
        check_int("seed", self.seed, 0)
        check_bools(self)  # the recipe's own switches (a subclass's fields are fields of self)

    def to_dict(self) -> dict[str, Any]:
        """The nested form (sections as mappings), JSON-serialisable."""
        return dataclasses.asdict(self)

    def flat_dict(self) -> dict[str, Any]:
        """Every option by its flat name (the original flags)."""
        return {o.name: o.get(self) for o in options(type(self))}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]):
        """Build from a mapping (a parsed YAML/JSON file, flat or nested); unknown keys are a ValueError naming
        them."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{cls.__name__}: options must be a mapping, not {type(values).__name__}")
        return cls(**values)


@config_class
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
        check_choice("use_template", self.use_template, ("object", "style", "none"))
        if self.templates is not None and (not self.templates or any("{}" not in t for t in self.templates)):
            raise ValueError(f"templates={self.templates!r}: give a non-empty list, each with one '{{}}'")
        check_int("max_train_steps_ti", self.max_train_steps_ti, 0)
        check_int("max_train_steps_tuning", self.max_train_steps_tuning, 0)
        for name in ("learning_rate_ti", "weight_decay_ti"):
            check_float(name, getattr(self, name), 0.0)
        check_float("ti_target_norm", self.ti_target_norm, 0.0, allow_none=True)
        check_float("continue_inversion_lr", self.continue_inversion_lr, 0.0, allow_none=True)
        check_choice("lr_scheduler_lora", self.lr_scheduler_lora, SCHEDULERS)
        check_int("lr_warmup_steps_lora", self.lr_warmup_steps_lora, 0)
        check_float("prior_loss_weight", self.prior_loss_weight, 0.0)
        if self.prior_data_dir is not None and not Path(self.prior_data_dir).is_dir():
            raise FileNotFoundError(f"prior_data_dir={self.prior_data_dir!r}: no such folder")
        if not self.perform_inversion and not self.perform_tuning:
            raise ValueError("perform_inversion and perform_tuning are both false: nothing to train")


@document
@dataclass
class DreamBoothRuntime(RuntimeSection):
    """The runtime options, and where DreamBooth's class images are."""

    class_data_dir: str | None = option(
        None,
        "folder of class images; missing ones (up to num_class_images) are generated with the base model and "
        "written there",
    )


@config_class
class DreamBoothConfig(TrainConfig):
    """DreamBooth LoRA: an instance prompt with a rare token, and optional prior preservation."""

    instance_prompt: str = option("", "prompt of every instance image, e.g. `a photo of sks dog` (required)")
    class_prompt: str | None = option(
        None, "prompt of the class images, e.g. `a photo of dog` (needed with with_prior_preservation)"
    )
    with_prior_preservation: bool = option(False, "add the class images' loss, weighted by prior_loss_weight")
    prior_loss_weight: float = option(1.0, "weight of the class (prior) loss")
    num_class_images: int = option(100, "how many class images to use")
    sample_batch_size: int = option(4, "batch size of class-image generation")
    class_inference_steps: int = option(25, "denoising steps per generated class image")
    max_train_steps: int = option(1000, "optimizer steps")
    runtime: DreamBoothRuntime = section(
        DreamBoothRuntime, "paths, checkpoints, device, progress, class images: may change on resume"
    )

    def __post_init__(self):
        super().__post_init__()
        if not self.instance_prompt:
            raise ValueError("instance_prompt is required (e.g. 'a photo of sks dog')")
        if self.with_prior_preservation:
            if not self.class_prompt:
                raise ValueError("with_prior_preservation needs class_prompt (e.g. 'a photo of dog')")
            if not self.runtime.class_data_dir:
                raise ValueError("with_prior_preservation needs class_data_dir (class images are written there)")
        check_float("prior_loss_weight", self.prior_loss_weight, 0.0)
        check_int("num_class_images", self.num_class_images, 1)
        check_int("sample_batch_size", self.sample_batch_size, 1)
        check_int("class_inference_steps", self.class_inference_steps, 1)
        check_int("max_train_steps", self.max_train_steps, 1)
        if self.data.train_inpainting:
            raise ValueError("train_inpainting is supported by the PTI trainer only")
