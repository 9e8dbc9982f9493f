"""kohya / A1111 / ComfyUI layout: `lora_unet_<module>` / `lora_te_<module>` with `lora_down`, `lora_up` and
`alpha` (ΔW = alpha / r · up @ down), learned tokens as A1111 bundled embeddings (`bundle_emb.*`).

SD 1.x/2.x files spell UNet modules with diffusers' names (kohya trains those on a diffusers UNet). SDXL files
spell them in the original (sgm) UNet's layout, because kohya trains SDXL on that UNet: `input_blocks.<i>.<j>`,
`middle_block.<j>`, `output_blocks.<i>.<j>`, ResNet layers `in_layers.2` / `out_layers.3` / `emb_layers.1` /
`skip_connection`, and the two text encoders are `lora_te1_` (CLIP ViT-L) and `lora_te2_` (OpenCLIP bigG).
The block indices follow from `layers_per_block` and which up blocks hold attention, so the SDXL mapping
takes the UNet's config (`lora_ops.original_layout`, shared with one-file checkpoints).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping

import torch

from ..lora_file import TOKEN_PREFIX, TOKEN_PREFIX_2
from ..original_layout import original_unet_name
from .keys import native_pairs, second_tokens, show_keys

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
BUNDLE_PREFIX = "bundle_emb."
_KEY = re.compile(r"(lora_(?:unet|te|te1|te2)_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)")
# first words of sgm UNet module names: a kohya UNet key starting with one is in the SDXL (sgm) layout
_SGM_ROOTS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")

# underscore-joined words of diffusers / CLIP module names; used to undo kohya's "." -> "_" without a model
_COMPOUNDS = sorted(
    [
        "down_blocks",
        "up_blocks",
        "mid_block",
        "transformer_blocks",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "proj_in",
        "proj_out",
        "time_emb_proj",
        "conv_shortcut",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "linear_1",
        "linear_2",
        "add_embedding",
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "final_layer_norm",
        "layer_norm1",
        "layer_norm2",
        "text_projection",
    ],
    key=lambda w: -w.count("_"),
)


def is_sdxl_kohya(keys: Iterable[str]) -> bool:
    """A kohya file made for SDXL: keys of the two text encoders or UNet keys in the sgm layout."""
    return any(
        k.startswith(("lora_te1_", "lora_te2_")) or k.removeprefix("lora_unet_").startswith(_SGM_ROOTS)
        for k in keys
        if k.startswith(("lora_te1_", "lora_te2_", "lora_unet_"))
    )


# ---------------------------------------------------------------- names both ways


def kohya_name(component: str, name: str, sdxl_unet: Mapping | None = None) -> str:
    """The kohya name of one module: `unet`, `down_blocks.0.attentions.0.proj_in` ->
    `lora_unet_down_blocks_0_attentions_0_proj_in` (SD 1.x/2.x), or with `sdxl_unet` (the SDXL UNet's config)
    the SDXL spelling: `lora_unet_input_blocks_1_1_proj_in`, `lora_te1_…`, `lora_te2_…`."""
    if sdxl_unet is None:
        if component not in KOHYA_PREFIX:
            raise ValueError(f"{component}: SDXL's second text encoder needs the SDXL layout (sdxl_unet=)")
        return KOHYA_PREFIX[component] + name.replace(".", "_")
    if component == "unet":
        name = original_unet_name(name, sdxl_unet)
    return SDXL_KOHYA_PREFIX[component] + name.replace(".", "_")


def _unkohya(flat: str) -> str:
    """Undo "." -> "_" with the compound words of diffusers/CLIP module names."""
    words = flat.split("_")
    out, i = [], 0
    while i < len(words):
        for compound in _COMPOUNDS:
            parts = compound.split("_")
            if words[i : i + len(parts)] == parts:
                out.append(compound)
                i += len(parts)
                break
        else:
            out.append(words[i])
            i += 1
    return ".".join(out)


def _lookup(module_names: Mapping[str, Iterable[str]], sdxl_unet: Mapping | None) -> dict[str, tuple[str, str]]:
    """kohya name -> (component, module) for every module; for SDXL both the sgm spelling and the
    diffusers-named one some SDXL trainers write (`lora_unet_down_blocks_…`, read by diffusers and ComfyUI)."""
    lookup = {}
    for comp, names in module_names.items():
        for name in names:
            if sdxl_unet is not None and comp == "unet":
                lookup[KOHYA_PREFIX["unet"] + name.replace(".", "_")] = (comp, name)
                with contextlib.suppress(ValueError):  # outside the sgm blocks: only the diffusers spelling names it
                    lookup[kohya_name(comp, name, sdxl_unet)] = (comp, name)
            else:
                lookup[kohya_name(comp, name, sdxl_unet)] = (comp, name)
    return lookup


# ---------------------------------------------------------------- conversions


def convert_native_to_kohya(
    state_dict: Mapping[str, torch.Tensor], include_tokens: bool = True, sdxl_unet: Mapping | None = None
) -> dict[str, torch.Tensor]:
    """Native -> kohya keys: lora_down = lora_A, lora_up = lora_B, alpha = r (scale 1, factors unchanged).

    Learned tokens become A1111 bundled embeddings `bundle_emb.<token>.string_to_param.*` of shape
    (1, dim), an SDXL token `bundle_emb.<token>.clip_l` and `.clip_g` (as A1111, ComfyUI and OneTrainer spell
    the two encoders' rows) (diffusers' kohya loader rejects these keys: pass include_tokens=False for it).

    Args:
        sdxl_unet: the config of the SDXL UNet the LoRA belongs to: names in kohya's SDXL layout. None: the
            SD 1.x/2.x layout.
    """
    pairs, tokens, unknown = native_pairs(state_dict)
    if unknown:
        raise ValueError(f"detected native layout, but these keys do not match it: {show_keys(unknown)}")
    out = {}
    for (comp, name), pair in pairs.items():
        base = kohya_name(comp, name, sdxl_unet)
        out[f"{base}.lora_down.weight"] = pair["lora_A"]
        out[f"{base}.lora_up.weight"] = pair["lora_B"]
        out[f"{base}.alpha"] = torch.tensor(float(pair["lora_A"].shape[0]))
    if include_tokens:
        tokens_2 = second_tokens(state_dict)
        for token, vector in tokens.items():
            if tokens_2:
                out[f"{BUNDLE_PREFIX}{token}.clip_l"] = vector.reshape(1, -1)
                out[f"{BUNDLE_PREFIX}{token}.clip_g"] = tokens_2[token].reshape(1, -1)
            else:
                out[f"{BUNDLE_PREFIX}{token}.string_to_param.*"] = vector.reshape(1, -1)
    return out


def convert_kohya_to_native(
    state_dict: Mapping[str, torch.Tensor],
    module_names: Mapping[str, Iterable[str]] | None = None,
    sdxl_unet: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """kohya keys -> native keys, folding alpha / r into lora_B (missing alpha: alpha = r).

    Args:
        module_names: canonical module names per component ({"unet": [...], "text_encoder": [...]});
            when given, every kohya name must be one of them (exact inverse). Without it, names are
            rebuilt from the compound words of diffusers/CLIP module names (SD 1.x/2.x only: SDXL's
            block indices need the model).
        sdxl_unet: the config of the SDXL UNet `module_names` come from (None: an SD 1.x/2.x model).
    """
    sdxl_file = is_sdxl_kohya(state_dict)
    if sdxl_file and module_names is None:
        raise ValueError("an SDXL kohya file names UNet blocks by index: reading it needs the model's module names")
    if sdxl_file and sdxl_unet is None:
        raise ValueError("this kohya file is for SDXL (lora_te1_/lora_te2_ or input_blocks keys); the model is not")
    lookup = _lookup(module_names or {}, sdxl_unet)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    tables: dict[str, dict[str, torch.Tensor]] = {TOKEN_PREFIX: {}, TOKEN_PREFIX_2: {}}
    unknown = []
    for key, tensor in state_dict.items():
        if key.startswith(BUNDLE_PREFIX):
            m = re.fullmatch(re.escape(BUNDLE_PREFIX) + r"(.+)\.(string_to_param\.\*|clip_l|clip_g)", key)
            if not m:
                unknown.append(key)
                continue
            table = tables[TOKEN_PREFIX_2 if m.group(2) == "clip_g" else TOKEN_PREFIX]
            rows = tensor.reshape(-1, tensor.shape[-1])
            for i, row in enumerate(rows):
                table[m.group(1) if i == 0 else f"{m.group(1)}_{i}"] = row
            continue
        m = _KEY.fullmatch(key)
        if not m:
            unknown.append(key)
            continue
        groups.setdefault(m.group(1), {})[m.group(2)] = tensor
    if unknown:
        raise ValueError(
            f"detected kohya layout, but these keys do not match it (LyCORIS/LoHa/LoKr/DoRA are not "
            f"supported): {show_keys(unknown)}"
        )
    out = {}
    for base, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            raise ValueError(f"{base}: has {sorted(parts)} but needs lora_down.weight and lora_up.weight")
        if lookup:
            if base not in lookup:
                raise ValueError(f"{base}: no module of the model has this kohya name")
            comp, name = lookup[base]
        else:
            comp = "unet" if base.startswith("lora_unet_") else "text_encoder"
            name = _unkohya(base[len(KOHYA_PREFIX[comp]) :])
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        r = down.shape[0]
        alpha = float(parts["alpha"].item()) if "alpha" in parts else float(r)
        scale = alpha / r
        out[f"{comp}.{name}.lora_A.weight"] = down
        out[f"{comp}.{name}.lora_B.weight"] = up if scale == 1.0 else up.float() * scale
    for prefix, table in tables.items():
        for token, vector in table.items():
            out[prefix + token] = vector
    return out
