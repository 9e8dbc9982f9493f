"""Which modules get LoRA: presets from the original lora_diffusion project, or explicit names/patterns.

A preset names module *classes*; every Linear (and, for the extended preset, Conv2d) inside a module of
one of those classes is a target. Walking `model.named_modules()` in order reproduces the original
project's traversal order, which its file format uses as the module index.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

# class names as in lora_diffusion: UNET_DEFAULT_TARGET_REPLACE, UNET_EXTENDED_TARGET_REPLACE,
# TEXT_ENCODER_DEFAULT_TARGET_REPLACE ("CrossAttention" is the pre-0.12 diffusers name of "Attention")
PRESETS: dict[str, tuple[frozenset[str], tuple[type[nn.Module], ...]]] = {
    "unet": (frozenset({"CrossAttention", "Attention", "GEGLU"}), (nn.Linear,)),
    "unet-extended": (
        frozenset({"ResnetBlock2D", "CrossAttention", "Attention", "GEGLU"}),
        (nn.Linear, nn.Conv2d),
    ),
    "text_encoder": (frozenset({"CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2"}), (nn.Linear,)),
}


def _base_layer(module: nn.Module) -> nn.Module:
    """The wrapped layer of a peft LoRA layer, else the module itself."""
    return getattr(module, "base_layer", module)


def _peft_internal(name: str) -> bool:
    """Modules peft adds inside a LoRA layer (the wrapped layer, the adapters' own Linear/Conv2d)."""
    return ".lora_" in name or name.endswith(".base_layer") or ".base_layer." in name


def preset_targets(model: nn.Module, preset: str) -> list[str]:
    """Full module names targeted by `preset`, in the original project's traversal order.

    The original walked `model.modules()`, and for each module whose class is in the preset, that
    module's `named_modules()`, keeping Linear/Conv2d children. A module is listed once.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r} is not one of {sorted(PRESETS)}")
    classes, kinds = PRESETS[preset]
    names: list[str] = []
    seen: set[str] = set()
    for parent_name, parent in model.named_modules():
        if type(parent).__name__ not in classes:
            continue
        for child_name, child in parent.named_modules():
            if not child_name or _peft_internal("." + child_name):
                continue
            if isinstance(_base_layer(child), kinds) and not isinstance(child, nn.ModuleDict):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if full not in seen:
                    seen.add(full)
                    names.append(full)
    return names


def pattern_value(name: str, pattern: Mapping[str, Any], default: Any) -> Any:
    """The value of the first key of a peft `rank_pattern` / `alpha_pattern` that matches module `name`.

    peft's rule: a key matches a name that equals it or ends in `.<key>`, the key read as a regular expression.
    """
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def resolve_targets(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Turn a preset name, or a list of module names / regular expressions, into full module names.

    Each list entry matches a module whose full name equals it, ends with `.<entry>`, or fully
    matches it as a regular expression. Only Linear and Conv2d modules can be targets.
    Raises ValueError naming an entry that matches nothing, with close matches.
    """
    if isinstance(targets, str):
        return preset_targets(model, targets)
    layers = {
        n: m
        for n, m in model.named_modules()
        if n and isinstance(_base_layer(m), (nn.Linear, nn.Conv2d)) and not _peft_internal(n)
    }
    names: list[str] = []
    for entry in targets:
        pattern = re.compile(entry) if any(c in entry for c in "*[]()|^$+?\\") else None
        hits = [
            n for n in layers if n == entry or n.endswith("." + entry) or (pattern is not None and pattern.fullmatch(n))
        ]
        if not hits:
            # compare with every dotted tail ("to_q", "attn1.to_q", ...) so short names find short names
            tails = {".".join(n.split(".")[i:]) for n in layers for i in range(len(n.split(".")))}
            close = difflib.get_close_matches(entry, sorted(tails), n=5, cutoff=0.6)
            hint = f"; close matches: {close}" if close else ""
            raise ValueError(f"target module {entry!r} matches no Linear/Conv2d module of {type(model).__name__}{hint}")
        names.extend(h for h in hits if h not in names)
    return names


def canonical_name(component: str, name: str) -> str:
    """The module name written to files: text-encoder names keep the `text_model.` prefix.

    transformers 5 dropped the `text_model` wrapper from CLIPTextModel; every LoRA format in the wild
    (diffusers, kohya, lora_diffusion) still names text-encoder modules `text_model.encoder.layers...`.
    """
    if component in ("text_encoder", "text_encoder_2") and not name.startswith("text_model."):
        return "text_model." + name
    return name


def live_name(model: nn.Module, name: str) -> str:
    """The name of a canonical module name inside `model` (strips `text_model.` where the model lacks it)."""
    if name.startswith("text_model.") and not hasattr(model, "text_model"):
        return name[len("text_model.") :]
    return name


def get_module(model: nn.Module, name: str) -> nn.Module | None:
    """The module named `name` (canonical or live), or None."""
    try:
        return model.get_submodule(live_name(model, name))
    except AttributeError:
        return None
