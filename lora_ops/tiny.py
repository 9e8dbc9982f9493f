"""Diffusers folders with random weights and a working tokenizer, built offline.

`tiny` and `sdxl-tiny` run in seconds on a CPU (tests, demo); `sd15`, `sd21` and `sdxl` have the real
architectures' shapes (shape checks, GPU benchmarks). An SDXL folder has SDXL's parts: two text encoders
(the second with a projection, whose pooled output conditions the UNet), two tokenizers, and a UNet with
text-time additional embeddings (micro-conditioning). The tokenizers are byte-level CLIP BPE vocabularies
with no merges, padded to the real vocabulary size so token ids line up with the real models.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch

Arch = Literal["tiny", "sd15", "sd21", "sdxl-tiny", "sdxl"]
ARCHS: tuple[str, ...] = ("tiny", "sd15", "sd21", "sdxl-tiny", "sdxl")

# SD 1.x's DDIM schedule (also the shapes world's)
SCHEDULER_DEFAULTS = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

_ARCH_CONFIGS: dict[str, dict] = {
    "tiny": {
        "unet": dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        "vae": dict(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
        ),
        "text": dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=1000,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
        ),
        "prediction_type": "epsilon",
    },
    "sd15": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            sample_size=64,
            cross_attention_dim=768,
            attention_head_dim=8,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=512,
            layers_per_block=2,
        ),
        "text": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        "prediction_type": "epsilon",
    },
    "sd21": {
        "unet": dict(
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            sample_size=96,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=768,
            layers_per_block=2,
        ),
        "text": dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
        ),
        "prediction_type": "v_prediction",
    },
    # SDXL: cross-attention on both encoders' penultimate states side by side (te1 + te2 hidden sizes); the
    # added embedding takes te2's pooled projection and six size numbers of `addition_time_embed_dim` each.
    # The two encoders differ in width, as SDXL's do (768 and 1280): one-file loaders tell them apart by it
    "sdxl-tiny": {
        "unet": dict(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            cross_attention_dim=32 + 48,
            attention_head_dim=(4, 8),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=6 * 8 + 48,
            norm_num_groups=32,
        ),
        "vae": dict(
            block_out_channels=(32, 64),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,
        ),
        "text": dict(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=1000,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
        ),
        "text_2": dict(
            hidden_size=48,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=1000,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=48,
        ),
        "prediction_type": "epsilon",
    },
    "sdxl": {
        "unet": dict(
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            sample_size=128,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        ),
        "vae": dict(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            sample_size=1024,
            layers_per_block=2,
            scaling_factor=0.13025,
            force_upcast=True,
        ),
        "text": dict(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        "text_2": dict(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=20,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=1280,
        ),
        "prediction_type": "epsilon",
    },
}


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_byte_level_tokenizer(directory: str | Path, vocab_size: int) -> None:
    """Write a CLIP tokenizer whose vocabulary is every byte, alone and word-final, padded to `vocab_size`.

    With no merges every word tokenizes into its bytes, which is enough for a working tokenizer.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    # pad so that the ids of the special tokens (the last two) match the real CLIP vocabulary
    tokens += [f"<|unused{i}|>" for i in range(vocab_size - len(tokens) - 2)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    if len(tokens) != vocab_size:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the byte vocabulary ({len(tokens)})")
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )


def arch_config(arch: Arch) -> dict:
    """The component configs of `arch`: {"unet", "vae", "text", ["text_2",] "prediction_type"}."""
    if arch not in _ARCH_CONFIGS:
        raise ValueError(f"arch={arch!r} is not one of {ARCHS}")
    return _ARCH_CONFIGS[arch]


def is_sdxl_arch(arch: Arch) -> bool:
    return "text_2" in arch_config(arch)


def _text_config(cfg: dict):
    from transformers import CLIPTextConfig

    # the special tokens are the last two ids, as in the real CLIP vocabulary
    vocab = cfg["vocab_size"]
    return CLIPTextConfig(bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1, **cfg)


def build_models(arch: Arch = "tiny", inpainting: bool = False) -> dict:
    """{"unet", "text_encoder"[, "text_encoder_2"]} of `arch` with random weights, in memory (on the meta
    device for shape checks when called under `with torch.device("meta")`)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cfg = arch_config(arch)
    models = {
        "unet": UNet2DConditionModel(in_channels=9 if inpainting else 4, out_channels=4, **cfg["unet"]),
        "text_encoder": CLIPTextModel(_text_config(cfg["text"])),
    }
    if "text_2" in cfg:
        models["text_encoder_2"] = CLIPTextModelWithProjection(_text_config(cfg["text_2"]))
    return models


def make_tiny_model(
    directory: str | Path,
    arch: Arch = "tiny",
    inpainting: bool = False,
    seed: int = 0,
) -> Path:
    """Write a Stable Diffusion (or SDXL) diffusers folder with random weights for `arch`; returns the folder.

    Args:
        directory: output folder (created; existing model files are overwritten).
        arch: "tiny" (CPU tests), "sd15" (SD 1.5 shapes), "sd21" (SD 2.1 shapes, v-prediction),
            "sdxl-tiny" (CPU tests of SDXL) or "sdxl" (SDXL 1.0 shapes).
        inpainting: build the 9-channel inpainting UNet and an inpainting pipeline.
        seed: seed of the random weights.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )
    from transformers import CLIPTokenizer

    cfg = arch_config(arch)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(seed)
    models = build_models(arch, inpainting)
    vae = AutoencoderKL(in_channels=3, out_channels=3, **cfg["vae"])
    scheduler = DDIMScheduler.from_config({**SCHEDULER_DEFAULTS, "prediction_type": cfg["prediction_type"]})
    parts = {"vae": vae, "scheduler": scheduler, **models}
    for suffix, text in (("", "text"), ("_2", "text_2")):
        if text in cfg:
            write_byte_level_tokenizer(directory / f"tokenizer{suffix}", cfg[text]["vocab_size"])
            parts[f"tokenizer{suffix}"] = CLIPTokenizer.from_pretrained(directory / f"tokenizer{suffix}")
    if is_sdxl_arch(arch):
        pipeline_class = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
        pipe = pipeline_class(**parts)
    else:
        pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
        pipe = pipeline_class(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory
