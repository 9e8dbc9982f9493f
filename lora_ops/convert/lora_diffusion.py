"""The original lora_diffusion layout: `unet:<i>:up|down` numbered in the model's traversal order (the
order itself lives in `lora_ops.legacy`), learned tokens as plain `<token>` rows, ΔW = up @ down."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch

from ..lora_file import COMPONENTS, TOKEN_PREFIX
from .keys import native_pairs, show_keys


def convert_legacy_to_native(
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None,
    module_names: Mapping[str, list[str]] | None,
) -> dict[str, torch.Tensor]:
    """lora_diffusion keys (`unet:<i>:up|down`, `<token>`) -> native keys (ΔW = up @ down, scale 1).

    Args:
        module_names: per component, the targeted module names in the original traversal order
            (`lora_ops.legacy.legacy_module_names`); None keeps `<component>:<i>` as the name (for
            inspection only: such a LoRA cannot be loaded onto a model).
    """
    metadata = metadata or {}
    groups: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        m = re.fullmatch(r"(unet|text_encoder):(\d+):(up|down)", key)
        if m:
            groups.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = tensor
        elif metadata.get(key) == "<embed>" or (tensor.ndim == 1 and ":" not in key):
            out[TOKEN_PREFIX + key] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"detected lora_diffusion layout, but these keys do not match it: {show_keys(unknown)}")
    for comp in COMPONENTS:
        indices = sorted(i for c, i in groups if c == comp)
        if not indices:
            continue
        if indices != list(range(len(indices))):
            raise ValueError(f"{comp}: module indices are not 0..{len(indices) - 1}: {indices[:10]}")
        names = None if module_names is None else module_names.get(comp)
        if names is not None and len(names) != len(indices):
            raise ValueError(
                f"{comp}: the file has {len(indices)} modules, the model's traversal order has {len(names)}: "
                "it was made for another architecture or another target set"
            )
        for i in indices:
            pair = groups[(comp, i)]
            if set(pair) != {"up", "down"}:
                raise ValueError(f"{comp}:{i}: has {sorted(pair)} but needs up and down")
            name = f"{comp}:{i}" if names is None else names[i]
            out[f"{comp}.{name}.lora_A.weight"] = pair["down"]
            out[f"{comp}.{name}.lora_B.weight"] = pair["up"]
    return out


def convert_native_to_legacy(
    state_dict: Mapping[str, torch.Tensor],
    module_names: Mapping[str, list[str]],
    target_classes: Mapping[str, list[str]],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Native -> lora_diffusion keys and metadata. The LoRA must cover exactly the traversal list.

    Args:
        module_names: per component, the module names in the original traversal order.
        target_classes: per component, the class names recorded in the metadata.
    """
    pairs, tokens, unknown = native_pairs(state_dict)
    if unknown:
        raise ValueError(f"detected native layout, but these keys do not match it: {show_keys(unknown)}")
    out: dict[str, torch.Tensor] = {}
    meta: dict[str, str] = {}
    for comp in COMPONENTS:
        have = {n for c, n in pairs if c == comp}
        if not have:
            continue
        names = list(module_names.get(comp, []))
        if have != set(names):
            missing, extra = sorted(set(names) - have), sorted(have - set(names))
            raise ValueError(
                f"{comp}: the lora_diffusion format numbers every module of its target classes; this LoRA "
                f"lacks {show_keys(missing, 3)} and has extra {show_keys(extra, 3)}"
            )
        meta[comp] = json.dumps(sorted(target_classes[comp]))
        for i, name in enumerate(names):
            out[f"{comp}:{i}:down"] = pairs[(comp, name)]["lora_A"]
            out[f"{comp}:{i}:up"] = pairs[(comp, name)]["lora_B"]
            meta[f"{comp}:{i}:rank"] = str(pairs[(comp, name)]["lora_A"].shape[0])
    for token, vector in tokens.items():
        out[token] = vector
        meta[token] = "<embed>"
    return out, meta
