"""The original lora_diffusion file format: read it onto a model, and write it back.

A lora_diffusion file names modules by their index in the order the original code met them: walking
`model.modules()`, and inside each module of a target class, its `named_modules()`. That order is a
property of the model, so it is rebuilt from the model itself (`targets.preset_targets`), never from a
stored table. The metadata records the target class names per component, the rank per index, and
`<token>: "<embed>"` for learned tokens stored under the token string.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .convert import convert_legacy_to_native, convert_native_to_legacy
from .lora_file import COMPONENTS, LoraFile, atomic_write, check_shapes, lora_from_state_dict
from .targets import PRESETS, canonical_name, preset_targets

# one concept, several class names: CLIP attention implementations, and "CrossAttention", the pre-0.12
# diffusers name of "Attention"
_CLASS_ALIASES = {
    "CLIPSdpaAttention": "CLIPAttention",
    "CLIPFlashAttention2": "CLIPAttention",
    "CrossAttention": "Attention",
}
_PRESET_OF = {"unet": ("unet", "unet-extended"), "text_encoder": ("text_encoder",)}


def _norm(classes) -> set[str]:
    return {_CLASS_ALIASES.get(c, c) for c in classes}


def preset_for_classes(component: str, classes: list[str]) -> str:
    """The preset of `component` whose target classes are `classes` (up to aliases)."""
    for preset in _PRESET_OF[component]:
        if _norm(classes) == _norm(PRESETS[preset][0]):
            return preset
    raise ValueError(f"{component} target classes {sorted(classes)} match no known preset ({sorted(PRESETS)})")


def _ff_before_attn2(names: list[str]) -> list[str]:
    """Reorder each transformer block's modules as attn1, ff, attn2 (stable inside each group).

    diffusers before its BasicTransformerBlock rewrite registered `ff` between `attn1` and `attn2`, so
    files trained then number the GEGLU projection right after attn1's four projections.
    """
    rank = {"attn1": 0, "ff": 1, "attn2": 2}
    out: list[str] = []
    block, run = None, []
    for name in names + [""]:
        m = re.match(r"(.*\.transformer_blocks\.\d+)\.(\w+)\.", name)
        key = m.group(1) if m else None
        if key != block or key is None:
            out.extend(sorted(run, key=lambda n: rank.get(n[len(block) + 1 :].split(".")[0], 3)) if block else run)
            run, block = [], key
        run.append(name)
    return [n for n in out if n]


ORDERS = ("model", "ff-before-attn2")


def legacy_module_names(
    models: Mapping[str, nn.Module], metadata: Mapping[str, str] | None = None, order: str = "model"
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Canonical module names per component in the original traversal order, and the target classes.

    Args:
        models: {"unet": UNet, "text_encoder": CLIP text model} (meta-device skeletons are enough).
        metadata: a lora_diffusion file's metadata; its `unet` / `text_encoder` class lists choose the
            preset (default: the original defaults, attention + GEGLU and CLIPAttention).
        order: "model" (the model's own module order) or "ff-before-attn2" (the order of diffusers
            versions that registered a transformer block's `ff` before `attn2`, as in files trained
            with them, e.g. the published lora_diffusion examples).
    """
    if order not in ORDERS:
        raise ValueError(f"order={order!r} is not one of {ORDERS}")
    names, classes = {}, {}
    for comp in COMPONENTS:
        model = models.get(comp)
        if model is None:
            continue
        if metadata and metadata.get(comp):
            file_classes = json.loads(metadata[comp])
            preset = preset_for_classes(comp, file_classes)
        else:
            preset = comp
            file_classes = sorted(PRESETS[preset][0] - {"CLIPSdpaAttention", "CLIPFlashAttention2"})
        found = [canonical_name(comp, n) for n in preset_targets(model, preset)]
        names[comp] = _ff_before_attn2(found) if order == "ff-before-attn2" else found
        classes[comp] = file_classes
    return names, classes


def read_legacy(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], models: Mapping[str, nn.Module] | None
) -> LoraFile:
    """A lora_diffusion state dict as a LoraFile with real module names, shapes checked against `models`.

    With models=None the modules keep their index names (`unet:<i>`): fine for inspection only.
    """
    if models is None:
        lora = lora_from_state_dict(convert_legacy_to_native(tensors, metadata, None))
        lora.metadata = {"source_format": "lora_diffusion"}
        return lora
    errors = []
    for order in ORDERS:  # the traversal order whose shapes fit every tensor
        names, _ = legacy_module_names(models, metadata, order)
        missing = [c for c in COMPONENTS if any(k.startswith(f"{c}:") for k in tensors) and c not in names]
        if missing:
            raise ValueError(f"the file has {missing} LoRA but no model was given for it")
        try:
            lora = lora_from_state_dict(convert_legacy_to_native(tensors, metadata, names))
            check_shapes(lora, models)
        except ValueError as exc:
            errors.append(f"{order} order: {exc}")
            continue
        lora.metadata = {"source_format": "lora_diffusion", "legacy_order": order}
        return lora
    raise ValueError("lora_diffusion file does not fit the model in any traversal order: " + "; ".join(errors))


def write_legacy(path: str | Path, lora: LoraFile, models: Mapping[str, nn.Module], order: str = "model") -> Path:
    """Write `lora` in the lora_diffusion format (atomically). It must cover a whole preset per component.

    Args:
        order: module numbering, see `legacy_module_names` ("model": the model's own order).
    """
    from safetensors.torch import save_file

    check_shapes(lora, models)
    meta_in = {}
    for comp in COMPONENTS:
        mods = lora.component(comp)
        if not mods:
            continue
        # choose the preset whose traversal list is exactly this LoRA's module set
        for preset in _PRESET_OF[comp]:
            names = [canonical_name(comp, n) for n in preset_targets(models[comp], preset)]
            if set(names) == set(mods):
                meta_in[comp] = json.dumps(sorted(PRESETS[preset][0]))
                break
    names, classes = legacy_module_names(models, meta_in, order)
    names = {c: n for c, n in names.items() if lora.component(c)}
    tensors, meta = convert_native_to_legacy(lora.state_dict(), names, classes)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
