"""One-file Stable Diffusion and SDXL checkpoints in the original (CompVis ldm / Stability sgm) layout, for A1111
and ComfyUI.

`save_single_file` maps a diffusers pipeline's UNet, VAE and CLIP text encoder onto the original key
layout (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`), driven by
the models' configs (block counts, layers per block; the UNet names are `lora_ops.original_layout`, shared
with kohya's SDXL LoRA names), not by a fixed table, so it covers SD 1.x and
the tiny test model alike. `save_merged_single_file` is `lora-ops add upl-ckpt`: LoRA merged into the
weights, learned tokens written as an A1111 embedding next to the checkpoint (a checkpoint with a grown
vocabulary would not load in those tools). The layout is checked by loading the file back with
diffusers' `from_single_file` (tests/test_single_file.py).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from .formats import save_a1111_embedding
from .lora_file import LoraFile, atomic_write, require_finite
from .merge import add_to_pipeline
from .models import is_sdxl
from .original_layout import original_unet_name

_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key_to_original(key: str, config) -> str:
    """A diffusers AutoencoderKL key -> its ldm `first_stage_model.` key."""
    levels = len(config["block_out_channels"])
    key = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3]}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.(.+)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)
    if m:  # ldm numbers decoder levels from the bottom
        return f"decoder.up.{levels - 1 - int(m[1])}.block.{m[2]}.{m[3]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key)
    if m:
        return f"decoder.up.{levels - 1 - int(m[1])}.upsample.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key)
    if m:
        if m[2] not in _VAE_ATTN:
            raise ValueError(f"VAE key {key!r} has no place in the original layout")
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{m[3]}"
    return key  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names


def _text_model_keys(text_encoder) -> dict[str, torch.Tensor]:
    """A CLIP text model's state dict with the `text_model.` prefix the file layouts keep (transformers 5 dropped
    the wrapper in the module)."""
    return {
        (k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
        for k, v in text_encoder.state_dict().items()
        if not k.endswith("position_ids")
    }


def open_clip_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    """SDXL's second text encoder (a CLIPTextModelWithProjection) in OpenCLIP's layout, the inverse of diffusers'
    `convert_open_clip_checkpoint`: q/k/v fused into `attn.in_proj_*`, `text_projection` transposed."""
    simple = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    inner = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    inner["self_attn.out_proj"] = "attn.out_proj"
    out: dict[str, torch.Tensor] = {}
    fused: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in _text_model_keys(text_encoder).items():
        if key in simple:
            out[simple[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((m[1], m[3]), {})[m[2]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            if m[2] not in inner:
                raise ValueError(f"text_encoder_2 key {key!r} has no place in OpenCLIP's layout")
            out[f"transformer.resblocks.{m[1]}.{inner[m[2]]}.{m[3]}"] = value
        else:
            raise ValueError(f"text_encoder_2 key {key!r} has no place in OpenCLIP's layout")
    for (layer, kind), qkv in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([qkv["q"], qkv["k"], qkv["v"]])
    return out


def original_state_dict(pipe, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and text encoder(s) in the original single-file layout (SDXL: Stability's, with
    `conditioner.embedders.0` CLIP ViT-L and `conditioner.embedders.1` OpenCLIP bigG)."""
    sdxl = is_sdxl(pipe)
    te_config = pipe.text_encoder.config
    if not sdxl and (getattr(te_config, "hidden_act", "") == "gelu" or te_config.hidden_size == 1024):
        raise ValueError(
            "single-file export supports SD 1.x and SDXL text encoders; this one is OpenCLIP-shaped "
            f"(hidden_size {te_config.hidden_size}, hidden_act {te_config.hidden_act!r}): an SD 2.x model"
        )
    out: dict[str, torch.Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        out["model.diffusion_model." + original_unet_name(key, pipe.unet.config)] = value
    for key, value in pipe.vae.state_dict().items():
        new = vae_key_to_original(key, pipe.vae.config)
        if ".mid.attn_1." in new and new.endswith(".weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)  # ldm's VAE attention uses 1×1 convolutions
        out["first_stage_model." + new] = value
    clip_prefix = "conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer."
    for key, value in _text_model_keys(pipe.text_encoder).items():
        out[clip_prefix + key] = value
    if sdxl:
        for key, value in open_clip_state_dict(pipe.text_encoder_2).items():
            out["conditioner.embedders.1.model." + key] = value
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous() for k, v in out.items()}


def save_single_file(pipe, path: str | Path, half: bool = False) -> Path:
    """Write `pipe` as one original-layout checkpoint: `.safetensors` (default) or `.ckpt` (a pickle of
    `{"state_dict": …}` holding only tensors)."""
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"path={str(path)!r}: the checkpoint must end in .safetensors or .ckpt")
    tensors = original_state_dict(pipe, torch.float16 if half else torch.float32)
    require_finite(tensors, f"refusing to write {path}{' (fp16)' if half else ''}")
    if path.suffix == ".ckpt":
        return atomic_write(path, lambda tmp: torch.save({"state_dict": tensors}, tmp))
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))


def embedding_name(tokens) -> str:
    """The A1111 trigger word for a token sequence: `<s1>`, `<s2>` -> `s1s2`."""
    name = "".join(re.sub(r"[^A-Za-z0-9_-]", "", t) for t in tokens)
    return name or "embedding"


def save_merged_single_file(
    pipe,
    lora: LoraFile,
    path: str | Path,
    unet_scale: float = 1.0,
    text_encoder_scale: float = 1.0,
    half: bool = False,
) -> dict[str, Path]:
    """`add upl-ckpt`: merge `lora` into `pipe` (in place), write the checkpoint, and the tokens as one
    A1111 embedding `<trigger>.safetensors` beside it (type the trigger where the tokens would go).

    Returns {"checkpoint": path, "embedding": path (only when the LoRA has tokens)}.
    """
    path = Path(path)
    if path.suffix not in (".safetensors", ".ckpt"):
        raise ValueError(f"path={str(path)!r}: the checkpoint must end in .safetensors or .ckpt")
    add_to_pipeline(pipe, lora, unet_scale, text_encoder_scale, load_tokens=False)
    out = {"checkpoint": save_single_file(pipe, path, half=half)}
    if lora.tokens:
        name = path.parent / f"{embedding_name(lora.tokens)}.safetensors"
        out["embedding"] = save_a1111_embedding(name, lora.tokens, lora.tokens_2)
    return out
