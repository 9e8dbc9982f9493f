"""diffusers / PEFT layouts: `pytorch_lora_weights.safetensors` (current and older diffusers key names,
`lora_adapter_metadata`) and PEFT adapters (`adapter_config.json` scales, rank/alpha patterns, rsLoRA)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping

import torch

from ..lora_file import COMPONENTS
from ..targets import canonical_name, pattern_value
from .keys import native_pairs, show_keys


def convert_native_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native -> `pytorch_lora_weights.safetensors` keys (tokens dropped: they go to embedding files).

    The scale is already folded into lora_B, so the file needs no alpha metadata.
    """
    pairs, _, unknown = native_pairs(state_dict)
    if unknown:
        raise ValueError(f"detected native layout, but these keys do not match it: {show_keys(unknown)}")
    out = {}
    for (comp, name), pair in pairs.items():
        out[f"{comp}.{name}.lora_A.weight"] = pair["lora_A"]
        out[f"{comp}.{name}.lora_B.weight"] = pair["lora_B"]
    return out


def convert_diffusers_to_native(
    state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> dict[str, torch.Tensor]:
    """diffusers/PEFT LoRA keys -> native keys, folding peft's alpha / r into lora_B.

    Accepts `unet.<m>.lora_A.weight` / `lora_B.weight` (current diffusers), `<m>.lora.down.weight` /
    `lora.up.weight` and `lora_linear_layer.down/up` (older diffusers), and `.alpha` entries of older
    files. `metadata["lora_adapter_metadata"]` (peft config per component) sets alpha and r.
    """
    peft_meta = {}
    if metadata and metadata.get("lora_adapter_metadata"):
        peft_meta = json.loads(metadata["lora_adapter_metadata"])
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    alphas: dict[tuple[str, str], float] = {}
    unknown = []
    for key, tensor in state_dict.items():
        comp, _, rest = key.partition(".")
        if comp not in COMPONENTS:
            unknown.append(key)
            continue
        m = re.fullmatch(r"(.+?)\.(?:lora_(A|B)\.weight|(?:lora|lora_linear_layer)\.(down|up)\.weight|(alpha))", rest)
        if not m:
            unknown.append(key)
            continue
        name = m.group(1).replace(".processor.", ".").replace("to_out_lora", "to_out.0")
        for short, full in (("to_q_lora", "to_q"), ("to_k_lora", "to_k"), ("to_v_lora", "to_v")):
            name = re.sub(rf"\b{short}$", full, name)
        if comp == "text_encoder":
            name = canonical_name(comp, name)
        if m.group(4):
            alphas[(comp, name)] = float(tensor.item())
            continue
        part = {"A": "lora_A", "B": "lora_B", "down": "lora_A", "up": "lora_B"}[m.group(2) or m.group(3)]
        pairs.setdefault((comp, name), {})[part] = tensor
    if unknown:
        raise ValueError(f"detected diffusers/PEFT layout, but these keys do not match it: {show_keys(unknown)}")
    out = {}
    for (comp, name), pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{comp}.{name}: has {sorted(pair)} but needs both lora_A and lora_B")
        r = pair["lora_A"].shape[0]
        alpha = alphas.get((comp, name))
        if alpha is None and peft_meta:
            live = name.removeprefix("text_model.")
            r_cfg = pattern_value(live, peft_meta.get(f"{comp}.rank_pattern", {}), peft_meta.get(f"{comp}.r", r))
            alpha = pattern_value(
                live, peft_meta.get(f"{comp}.alpha_pattern", {}), peft_meta.get(f"{comp}.lora_alpha", r_cfg)
            )
            if r_cfg != r:
                raise ValueError(f"{comp}.{name}: lora_adapter_metadata says r={r_cfg}, the tensors have r={r}")
        scale = 1.0 if alpha is None else alpha / r
        out[f"{comp}.{name}.lora_A.weight"] = pair["lora_A"]
        out[f"{comp}.{name}.lora_B.weight"] = pair["lora_B"] if scale == 1.0 else pair["lora_B"].float() * scale
    return out


# ---------------------------------------------------------------- PEFT adapters

PEFT_PREFIX = "base_model.model."
# first module-name segments of a UNet2DConditionModel and of a CLIP text model (with or without `text_model.`)
_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "time_embedding", "add_embedding")
_TEXT_ROOTS = ("text_model", "encoder", "embeddings", "final_layer_norm")
_PEFT_KEY = re.compile(r"(.+?)\.(lora_A|lora_B|lora_magnitude_vector)(?:\.([A-Za-z0-9_-]+))?\.weight")


def peft_component(name: str) -> str | None:
    """ "unet" or "text_encoder" from a module name of a PEFT adapter (None when neither fits)."""
    root = name.split(".", 1)[0]
    if root in _UNET_ROOTS:
        return "unet"
    if root in _TEXT_ROOTS:
        return "text_encoder"
    return None


def _peft_scale(name: str, r: int, config: Mapping, where: str) -> float:
    """peft's scale of one module: lora_alpha / r (or / sqrt(r) with rsLoRA), patterns included."""
    r_cfg = pattern_value(name, config.get("rank_pattern") or {}, config.get("r", r))
    alpha = pattern_value(name, config.get("alpha_pattern") or {}, config.get("lora_alpha", r_cfg))
    if int(r_cfg) != r:
        raise ValueError(f"{where}: the adapter config says r={r_cfg}, the tensors have r={r}")
    return float(alpha) / (r**0.5 if config.get("use_rslora") else r)


def check_peft_config(config: Mapping, where: str) -> None:
    """Refuse what a LoRA file cannot hold: other PEFT methods, DoRA, trained biases, saved full modules."""
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise ValueError(f"{where}: peft_type={kind!r}: only LoRA adapters are supported (not LoHa/LoKr/IA3/...)")
    if config.get("use_dora"):
        raise ValueError(f"{where}: a DoRA adapter (use_dora=true): its magnitude vectors have no LoRA equivalent")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise ValueError(f"{where}: the adapter trains biases (bias={config.get('bias')!r}); a LoRA cannot hold them")
    if config.get("modules_to_save"):
        raise ValueError(f"{where}: the adapter saves whole modules ({config['modules_to_save']}); a LoRA cannot")


def convert_peft_to_native(
    state_dict: Mapping[str, torch.Tensor],
    configs: Mapping[str, Mapping],
) -> dict[str, torch.Tensor]:
    """PEFT adapter keys -> native keys, folding each module's scale into lora_B.

    Accepts what `PeftModel.save_pretrained` writes (`base_model.model.<m>.lora_A.weight`) and what
    diffusers' `save_lora_adapter` writes (`<m>.lora_A.weight`), with an optional adapter-name segment
    (`lora_A.default.weight`). `configs` maps a component ("unet", "text_encoder") or "*" (either; the
    component is then told by the module names) to its peft LoraConfig as a dict. A key may start with
    `<component>/` to name its component (a folder holding one adapter per component).
    """
    for comp, config in configs.items():
        check_peft_config(config, f"adapter config ({comp})")
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    adapters, unknown = set(), []
    for key, tensor in state_dict.items():
        comp, sep, rest = key.partition("/")
        if not sep:
            comp, rest = None, key
        m = _PEFT_KEY.fullmatch(rest.removeprefix(PEFT_PREFIX))
        if not m:
            unknown.append(key)
            continue
        name, part, adapter = m.groups()
        if part == "lora_magnitude_vector":
            raise ValueError(f"{key}: a DoRA magnitude vector; DoRA adapters have no LoRA equivalent")
        comp = comp or peft_component(name)
        if comp not in COMPONENTS:
            raise ValueError(f"{key}: cannot tell whether {name!r} is a UNet or a text-encoder module")
        adapters.add(adapter)
        pairs.setdefault((comp, name), {})[part] = tensor
    if unknown:
        raise ValueError(f"detected a PEFT adapter, but these keys are not LoRA factors: {show_keys(unknown)}")
    if len(adapters) > 1:
        raise ValueError(f"the file holds several adapters ({sorted(a or 'default' for a in adapters)}): save one")
    out = {}
    for (comp, name), pair in sorted(pairs.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{comp}.{name}: has {sorted(pair)} but needs both lora_A and lora_B")
        config = configs.get(comp) or configs.get("*") or {}
        live = name.removeprefix("text_model.")
        scale = _peft_scale(live, pair["lora_A"].shape[0], config, f"{comp}.{name}")
        full = canonical_name(comp, name)
        out[f"{comp}.{full}.lora_A.weight"] = pair["lora_A"]
        out[f"{comp}.{full}.lora_B.weight"] = pair["lora_B"] if scale == 1.0 else pair["lora_B"].float() * scale
    return out
