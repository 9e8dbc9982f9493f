"""The original lora_diffusion commands, `lora_add`, `lora_pti` and `lora_distill`, as they were typed.

The original project built its commands with python-fire: positional arguments fill the function's
parameters in order, flags are `--name value` or `--name=value` (dashes or underscores), a bare `--flag` is
true and `--noflag` false. Each entry point here reads that form, with the original defaults, and runs the
`lora-ops` command that does the same (printed on stderr, so users learn the new spelling):

- `lora_add PATH_1 PATH_2 OUTPUT_PATH [ALPHA_1 [ALPHA_2]] --mode lpl|upl|upl-ckpt-v2|ljl [--with_text_lora]`
  -> `lora-ops add lpl|upl|upl-ckpt|ljl`;
- `lora_pti --flag=value ...` -> `lora-ops train pti` with the original defaults;
- `lora_distill TARGET_MODEL BASE_MODEL [--rank --clamp_quantile --device --save_path]` ->
  `lora-ops distill` (the original cli_svd: extended UNet targets, the text encoder's attention).
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

_TRUE = {"true", "1", "yes", "on", "y"}
_FALSE = {"false", "0", "no", "off", "n"}

# the Stable Diffusion repositories of runwayml were removed from the hub; this is their maintained copy
REMOVED_MODEL_IDS = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "runwayml/stable-diffusion-inpainting": "stable-diffusion-v1-5/stable-diffusion-inpainting",
}


class UsageError(ValueError):
    """A command line the original command would not have accepted either."""


def parse_fire(
    argv: Sequence[str],
    params: Sequence[str],
    bools: frozenset[str] = frozenset(),
    aliases: dict[str, str] | None = None,
    open_flags: bool = False,
) -> tuple[dict[str, str | bool], list[str]]:
    """({parameter: value}, unknown flags) from a python-fire command line.

    Values stay strings (bare boolean flags are True/False). Positional words fill `params` in order,
    skipping those given by name. With `open_flags`, flags not in `params` are returned as written
    (`--name=value` / `--name`) instead of refused.
    """
    aliases = aliases or {}
    named: dict[str, str | bool] = {}
    positional: list[str] = []
    passthrough: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if not word.startswith("--") or word == "--":
            positional.append(word)
            continue
        name, eq, value = word[2:].partition("=")
        key = aliases.get(name.replace("-", "_"), name.replace("-", "_"))
        if not eq and key.startswith("no") and key[2:] in bools:
            named[key[2:]] = False
            continue
        if key not in params:
            if not open_flags:
                raise UsageError(f"unknown flag --{name}; the flags are {', '.join('--' + p for p in params)}")
            if not eq and key not in bools and i < len(argv) and not argv[i].startswith("--"):
                value, eq, i = argv[i], "=", i + 1
            passthrough.append(f"--{name}={value}" if eq else f"--{name}")
            continue
        if key in bools:
            if eq:
                named[key] = _bool(key, value)
            elif i < len(argv) and argv[i].strip().lower() in _TRUE | _FALSE:
                named[key] = _bool(key, argv[i])
                i += 1
            else:
                named[key] = True
            continue
        if not eq:
            if i >= len(argv):
                raise UsageError(f"--{name} needs a value")
            value = argv[i]
            i += 1
        named[key] = value
    free = [p for p in params if p not in named]
    if len(positional) > len(free):
        raise UsageError(f"too many positional arguments: {positional[len(free) :]} (parameters: {list(params)})")
    named.update(zip(free, positional))
    return named, passthrough


def _bool(name: str, text) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UsageError(f"--{name}={text!r} is not a boolean (true/false)")


def _float(name: str, text) -> str:
    try:
        float(text)
    except (TypeError, ValueError):
        raise UsageError(f"--{name}={text!r} is not a number") from None
    return str(text)


def _model_id(name: str, program: str) -> str:
    """A removed hub id as its maintained copy, said on stderr (a local folder of that name wins)."""
    from pathlib import Path

    if name in REMOVED_MODEL_IDS and not Path(name).exists():
        print(f"{program}: note: {name} was removed from the hub; using {REMOVED_MODEL_IDS[name]}", file=sys.stderr)
        return REMOVED_MODEL_IDS[name]
    return name


def _run(program: str, argv: list[str]) -> int:
    from .cli import main

    print(f"{program}: running: lora-ops {' '.join(shlex.quote(a) for a in argv)}", file=sys.stderr)
    return main(argv)


def _entry(program: str, translate, argv: Sequence[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["--help"], ["-h"]):
        print(translate.__doc__.strip())
        return 0
    try:
        args = translate(argv, program)
    except UsageError as exc:
        print(f"{program}: error: {exc}", file=sys.stderr)
        return 2
    return _run(program, args)


# ---------------------------------------------------------------------------------------------------- lora_add

ADD_PARAMS = ("path_1", "path_2", "output_path", "alpha_1", "alpha_2", "mode", "with_text_lora", "base")
ADD_MODES = {"lpl": "lpl", "upl": "upl", "upl-ckpt-v2": "upl-ckpt", "ljl": "ljl"}


def translate_add(argv: Sequence[str], program: str = "lora_add") -> list[str]:
    """lora_add PATH_1 PATH_2 OUTPUT_PATH [ALPHA_1 [ALPHA_2]] [--mode MODE] [--with_text_lora] [--base DIR]

    The original lora_diffusion `lora_add` (python-fire: positional or --name value / --name=value):

      --mode upl          PATH_1 model (folder or hub id) + PATH_2 LoRA -> diffusers folder OUTPUT_PATH,
                          W' = W + ALPHA_1 ΔW (UNet and text encoder)   = lora-ops add upl
      --mode upl-ckpt-v2  the same, as one fp16 checkpoint (.ckpt or .safetensors) + the tokens as an
                          A1111 embedding beside it                     = lora-ops add upl-ckpt --half
      --mode lpl          (default) LoRA + LoRA, the original's formula
                          ΔW = (ALPHA_1 B_1 + ALPHA_2 B_2)(ALPHA_1 A_1 + ALPHA_2 A_2)
                                                                        = lora-ops add lpl --merge-mode legacy-sum-factors
                          (lora-ops add lpl without it merges exactly: ΔW = ALPHA_1 ΔW_1 + ALPHA_2 ΔW_2)
      --mode ljl          join: one file with both LoRAs as parts (rank r1 + r2); alphas have no effect
                                                                        = lora-ops add ljl
    --alpha is ALPHA_1 (the original's first spelling); ALPHA_1 and ALPHA_2 default to 0.5.
    --with_text_lora: safetensors files always carry their text-encoder LoRA, which is merged too.
    --base DIR (an addition): the base model, needed to read original-format files in lpl and ljl.
    """
    named, _ = parse_fire(argv, ADD_PARAMS, frozenset({"with_text_lora"}), {"alpha": "alpha_1"})
    missing = [p.upper() for p in ADD_PARAMS[:3] if p not in named]
    if missing:
        raise UsageError(
            f"missing {' '.join(missing)} (usage: {program} PATH_1 PATH_2 OUTPUT_PATH [ALPHA] --mode MODE)"
        )
    mode = str(named.get("mode", "lpl"))
    if mode not in ADD_MODES:
        raise UsageError(f"--mode={mode!r} is not one of {', '.join(ADD_MODES)}")
    alpha_1 = _float("alpha_1", named.get("alpha_1", "0.5"))
    alpha_2 = _float("alpha_2", named.get("alpha_2", "0.5"))
    path_1, path_2, out = (str(named[p]) for p in ADD_PARAMS[:3])
    base = ["--base", str(named["base"])] if "base" in named else []
    if mode in ("upl", "upl-ckpt-v2"):
        if "alpha_2" in named:
            print(f"{program}: note: ALPHA_2 has no effect with --mode {mode}", file=sys.stderr)
        if base:
            raise UsageError(f"--base: with --mode {mode} PATH_1 is the base model")
        args = ["add", ADD_MODES[mode], path_2, "--base", _model_id(path_1, program), "--out", out, "--alpha", alpha_1]
        return args + (["--half"] if mode == "upl-ckpt-v2" else [])
    if mode == "ljl":
        if "alpha_1" in named or "alpha_2" in named:
            print(f"{program}: note: join mode (ljl): the alphas have no effect", file=sys.stderr)
        return ["add", "ljl", path_1, path_2, "--out", out, *base]
    if any(p.endswith(".pt") for p in (path_1, path_2)) and named.get("with_text_lora"):
        raise UsageError(
            "--with_text_lora with .pt files (the text-encoder LoRA in <name>.text_encoder.pt beside each): "
            "merge the .safetensors files instead, which hold both"
        )
    return ["add", "lpl", path_1, path_2, "--out", out, "--weights", alpha_1, alpha_2,
            "--merge-mode", "legacy-sum-factors", *base]  # fmt: skip


def lora_add(argv: Sequence[str] | None = None) -> int:
    return _entry("lora_add", translate_add, argv)


# ---------------------------------------------------------------------------------------------------- lora_pti

# the original train()'s parameters in order (python-fire fills positional words into them)
PTI_PARAMS = (
    "instance_data_dir", "pretrained_model_name_or_path", "output_dir", "train_text_encoder",
    "pretrained_vae_name_or_path", "revision", "perform_inversion", "use_template", "train_inpainting",
    "placeholder_tokens", "placeholder_token_at_data", "initializer_tokens", "seed", "resolution",
    "color_jitter", "train_batch_size", "sample_batch_size", "max_train_steps_tuning", "max_train_steps_ti",
    "save_steps", "gradient_accumulation_steps", "gradient_checkpointing", "lora_rank",
    "lora_unet_target_modules", "lora_clip_target_modules", "lora_dropout_p", "lora_scale",
    "use_extended_lora", "clip_ti_decay", "learning_rate_unet", "learning_rate_text", "learning_rate_ti",
    "continue_inversion", "continue_inversion_lr", "use_face_segmentation_condition", "cached_latents",
    "use_mask_captioned_data", "mask_temperature", "scale_lr", "lr_scheduler", "lr_warmup_steps",
    "lr_scheduler_lora", "lr_warmup_steps_lora", "weight_decay_ti", "weight_decay_lora", "use_8bit_adam",
    "device", "extra_args", "log_wandb", "wandb_log_prompt_cnt", "wandb_project_name", "wandb_entity",
    "proxy_token", "enable_xformers_memory_efficient_attention", "out_name",
)  # fmt: skip
PTI_BOOLS = frozenset({
    "train_text_encoder", "perform_inversion", "train_inpainting", "color_jitter", "gradient_checkpointing",
    "use_extended_lora", "clip_ti_decay", "continue_inversion", "use_face_segmentation_condition",
    "cached_latents", "use_mask_captioned_data", "scale_lr", "use_8bit_adam", "log_wandb",
    "enable_xformers_memory_efficient_attention",
    # lora-ops train pti's own boolean options, accepted here too
    "horizontal_flip", "use_masks", "perform_tuning", "cache_text_embeddings", "progress", "channels_last",
    "cast_base_weights",
})  # fmt: skip
# the original's defaults where lora-ops train pti has another one
PTI_ORIGINAL_DEFAULTS = {
    "train_text_encoder": "true",
    "color_jitter": "true",
    "gradient_accumulation_steps": "4",
    "save_steps": "100",
    "lr_scheduler": "linear",
}
# parameters of the original that did nothing there or only fed its wandb logging
PTI_NO_EFFECT = ("sample_batch_size", "lora_scale", "proxy_token", "extra_args", "wandb_log_prompt_cnt",
                 "wandb_project_name", "wandb_entity")  # fmt: skip
PRESET_CLASSES = {
    "lora_unet_target_modules": ({"CrossAttention", "Attention", "GEGLU"}, "--use_extended_lora"),
    "lora_clip_target_modules": ({"CLIPAttention"}, None),
}


def _class_set(text: str) -> set[str]:
    return {w.strip(" '\"") for w in str(text).strip("{}[]() ").split(",") if w.strip(" '\"")}


def translate_pti(argv: Sequence[str], program: str = "lora_pti") -> list[str]:
    """lora_pti --pretrained_model_name_or_path=MODEL --instance_data_dir=DIR --output_dir=DIR [--flag=value ...]

    The original lora_diffusion `lora_pti`, run as `lora-ops train pti` with every flag of the same name
    and the original's defaults (train_text_encoder, color_jitter, gradient_accumulation_steps 4,
    save_steps 100, lr_scheduler linear; with --config FILE the file decides instead). Also:
      --enable_xformers_memory_efficient_attention  accepted: PyTorch SDPA attention is always used
      --cached_latents=True|False                    = --cached_latents=auto|off
      --use_template=None                            = --use_template=none
      --lora_unet_target_modules / --lora_clip_target_modules: the original class sets; the extended set
                                                     (with ResnetBlock2D) = --use_extended_lora
      --sample_batch_size, --lora_scale, --proxy_token, --extra_args, --wandb_*: no effect (a note says so)
      --log_wandb=True: not supported (metrics go to the training callback; the pipeline logs them to MLflow)
    Every `lora-ops train pti` flag works too; see `lora-ops train pti --help` and docs/training.md.
    """
    named, extra = parse_fire(argv, PTI_PARAMS, PTI_BOOLS, open_flags=True)
    out: list[str] = []
    for key in PTI_NO_EFFECT:
        if key in named:
            print(f"{program}: note: --{key} has no effect (as in the original) and is ignored", file=sys.stderr)
            del named[key]
    if named.pop("log_wandb", False):
        raise UsageError("--log_wandb is not supported: metrics go to the training callback (MLflow in the pipeline)")
    for key, (default, flag) in PRESET_CLASSES.items():
        if key in named:
            classes = _class_set(named.pop(key))
            if classes == default:
                continue
            if flag and classes == default | {"ResnetBlock2D"}:
                out.append(f"{flag}=true")
                continue
            raise UsageError(f"--{key}={sorted(classes)}: the supported sets are the presets; see docs/training.md")
    if "cached_latents" in named:
        named["cached_latents"] = "auto" if _bool("cached_latents", named["cached_latents"]) else "off"
    if str(named.get("use_template", "")).lower() == "none":
        named["use_template"] = "none"
    if "pretrained_model_name_or_path" in named:
        named["pretrained_model_name_or_path"] = _model_id(str(named["pretrained_model_name_or_path"]), program)
    has_config = any(a.split("=", 1)[0] == "--config" for a in extra)
    if not has_config:
        for key, value in PTI_ORIGINAL_DEFAULTS.items():
            named.setdefault(key, value)
    for key, value in named.items():
        value = ("true" if value else "false") if isinstance(value, bool) else value
        out.append(f"--{key}={value}")
    return ["train", "pti", *out, *extra]


def lora_pti(argv: Sequence[str] | None = None) -> int:
    return _entry("lora_pti", translate_pti, argv)


# ------------------------------------------------------------------------------------------------ lora_distill

DISTILL_PARAMS = ("target_model", "base_model", "rank", "clamp_quantile", "device", "save_path")


def translate_distill(argv: Sequence[str], program: str = "lora_distill") -> list[str]:
    """lora_distill TARGET_MODEL BASE_MODEL [--rank 4] [--clamp_quantile 0.99] [--device auto] [--save_path FILE]

    The original lora_diffusion SVD distillation (cli_svd.svd_distill), run as `lora-ops distill`: the LoRA
    of rank RANK closest to TARGET_MODEL - BASE_MODEL on the UNet's attention, feed-forward and ResNet
    layers (the original's extended targets) and the text encoder's attention, factors clamped to the
    CLAMP_QUANTILE quantile. Writes SAVE_PATH (default svd_distill.safetensors) in the native format (fp32;
    `lora-ops convert` writes the other formats). --device: auto (the original's cuda:0 when there is a GPU).
    """
    named, _ = parse_fire(argv, DISTILL_PARAMS)
    missing = [p.upper() for p in DISTILL_PARAMS[:2] if p not in named]
    if missing:
        raise UsageError(f"missing {' '.join(missing)} (usage: {program} TARGET_MODEL BASE_MODEL [--rank R])")
    return [
        "distill",
        str(named.get("save_path", "svd_distill.safetensors")),
        "--tuned", _model_id(str(named["target_model"]), program),
        "--base", _model_id(str(named["base_model"]), program),
        "--rank", str(named.get("rank", "4")),
        "--clamp-quantile", _float("clamp_quantile", named.get("clamp_quantile", "0.99")),
        "--device", str(named.get("device", "auto")),
        "--unet-targets", "unet-extended",
        "--text-encoder-targets", "text_encoder",
    ]  # fmt: skip


def lora_distill(argv: Sequence[str] | None = None) -> int:
    return _entry("lora_distill", translate_distill, argv)
