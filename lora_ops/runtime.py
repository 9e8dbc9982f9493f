"""Using LoRA files at inference: patch a pipeline, set scales, combine adapters, fuse and unfuse.

Adapters are peft LoRA layers inside `pipe.unet` / `pipe.text_encoder` (and SDXL's `pipe.text_encoder_2`);
each loaded file is one named adapter whose UNet and text-encoder scales can be changed without reloading.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from .inject import check_adapter, load_adapter, lora_layers
from .lora_file import LoraFile, load_lora
from .models import components
from .tokens import apply_lora_tokens


def _check_scale(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(value)


def _models(pipe) -> dict[str, torch.nn.Module]:
    return components(pipe)


def adapter_names(pipe) -> list[str]:
    """Names of the adapters loaded into the pipeline, in load order."""
    names: list[str] = []
    for model in _models(pipe).values():
        for layer in lora_layers(model).values():
            names.extend(n for n in layer.lora_A if n not in names)
    return names


def patch_pipeline(
    pipe,
    lora: LoraFile | str | Path,
    adapter_name: str = "default",
    unet_scale: float = 1.0,
    text_encoder_scale: float = 1.0,
    load_tokens: bool = True,
) -> str:
    """Load a LoRA (UNet, text encoder, learned tokens) into `pipe` as adapter `adapter_name`.

    Every adapter loaded stays active; set each one's scales with `set_scales`. Everything is checked
    before anything is changed. A file with learned tokens only (textual inversion) adds the tokens and
    no adapter.
    """
    if isinstance(lora, (str, Path)):
        lora = load_lora(lora)
    _check_scale("unet_scale", unet_scale)
    _check_scale("text_encoder_scale", text_encoder_scale)
    if adapter_name in adapter_names(pipe):
        raise ValueError(f"adapter {adapter_name!r} is already loaded; remove it first or pick another name")
    # check everything first, so that a bad file leaves the pipeline as it was
    for component, model in _models(pipe).items():
        check_adapter(model, lora.component(component), adapter_name, component)
    if load_tokens and lora.tokens:
        apply_lora_tokens(pipe, lora)
    for component, model in _models(pipe).items():
        modules = lora.component(component)
        load_adapter(model, modules, adapter_name, component)
        if modules:
            ref = next(model.parameters())
            model.to(ref.device)
    if not any(lora.component(c) for c in _models(pipe)):
        return adapter_name  # a tokens-only file (textual inversion): nothing to scale
    active = adapter_names(pipe)
    for model in _models(pipe).values():
        for layer in lora_layers(model).values():
            layer.set_adapter([n for n in active if n in layer.lora_A])
    set_scales(pipe, adapter_name, unet=unet_scale, text_encoder=text_encoder_scale)
    return adapter_name


def set_scales(pipe, adapter_name: str = "default", unet: float | None = None, text_encoder: float | None = None):
    """Set the multiplier of one adapter on the UNet and/or the text encoder(s) (None: leave as is).

    SDXL's two text encoders take the same text-encoder scale.
    """
    if adapter_name not in adapter_names(pipe):
        raise ValueError(f"no adapter {adapter_name!r} is loaded (loaded: {adapter_names(pipe)})")
    for component, model in _models(pipe).items():
        scale = unet if component == "unet" else text_encoder
        if scale is None:
            continue
        scale = _check_scale(f"{component.rstrip('_2')} scale", scale)
        for layer in lora_layers(model).values():
            if layer.merged:
                raise ValueError("adapters are fused into the weights; unfuse before changing scales")
            layer.set_scale(adapter_name, scale)


def enable_lora(pipe, enabled: bool = True) -> None:
    """Switch every adapter off (the base model's output) or back on."""
    for model in _models(pipe).values():
        for layer in lora_layers(model).values():
            layer.enable_adapters(enabled)


def remove_lora(pipe, adapter_name: str) -> None:
    """Delete one adapter from the UNet and text encoder (learned tokens stay in the tokenizer)."""
    if adapter_name not in adapter_names(pipe):
        raise ValueError(f"no adapter {adapter_name!r} is loaded (loaded: {adapter_names(pipe)})")
    layers = [layer for model in _models(pipe).values() for layer in lora_layers(model).values()]
    if any(layer.merged for layer in layers):
        raise ValueError("adapters are fused into the weights; unfuse before removing one")
    for layer in layers:
        if adapter_name in layer.lora_A:
            layer.delete_adapter(adapter_name)


def fuse_lora(pipe, adapter_names_: Sequence[str] | None = None) -> None:
    """Merge adapters (at their current scales) into the base weights.

    peft's safe merge computes each merged weight in a copy and refuses non-finite results before the
    base weight is replaced.
    """
    merged = []
    try:
        for model in _models(pipe).values():
            for name, layer in lora_layers(model).items():
                names = [n for n in (adapter_names_ or layer.active_adapters) if n in layer.lora_A]
                if not names:
                    continue
                try:
                    layer.merge(safe_merge=True, adapter_names=names)
                except ValueError as exc:
                    raise ValueError(f"fusing {name}: {exc}") from None
                merged.append(layer)
    except ValueError:
        # all or nothing: undo the layers fused before the failure
        for layer in merged:
            while layer.merged:
                layer.unmerge()
        raise


def unfuse_lora(pipe) -> None:
    """Undo `fuse_lora`: subtract the merged adapters from the base weights."""
    for model in _models(pipe).values():
        for layer in lora_layers(model).values():
            while layer.merged:
                layer.unmerge()
