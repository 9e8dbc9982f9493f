"""Pure conversions between LoRA key layouts: `convert_<src>_to_<dst>(state_dict[, metadata]) -> dict`.

Every function takes and returns plain `{key: tensor}` dicts (and string metadata where the format
keeps information there); nothing here reads files or models. The scale rule of each format:

- native (lora_ops) and diffusers/PEFT: ΔW = lora_B @ lora_A; a diffusers file may carry
  `lora_adapter_metadata` (peft `r`, `lora_alpha`, patterns): then ΔW = alpha / r · B A, and reading
  folds alpha / r into lora_B.
- PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`, or diffusers' `save_lora_adapter`
  file): ΔW = lora_alpha / r · B A per module (rank_pattern / alpha_pattern; rsLoRA: / sqrt(r)).
- kohya / A1111 / ComfyUI: ΔW = alpha / r · lora_up @ lora_down (missing `.alpha`: alpha = r). Writing
  stores alpha = r, so the factors are copied bit for bit.
- lora_diffusion (legacy): ΔW = up @ down (scale 1), modules numbered in the traversal order of the
  model (see `lora_ops.legacy`).
- A1111 embeddings: rows of `string_to_param["*"]` (.pt) or `emb_params` (.safetensors), (n, dim).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping

import torch

from .lora_file import COMPONENTS, TOKEN_PREFIX
from .targets import canonical_name, pattern_value

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
BUNDLE_PREFIX = "bundle_emb."

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


def _show(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    return f"{keys[:n]}{' …' if len(keys) > n else ''} ({len(keys)} keys)"


def _native_pairs(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """{(component, module): {"lora_A"/"lora_B": tensor}}, {token: (dim,)}, unknown keys."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    tokens: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if key.startswith(TOKEN_PREFIX):
            tokens[key[len(TOKEN_PREFIX) :]] = tensor
            continue
        comp, _, rest = key.partition(".")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if comp in COMPONENTS and m:
            pairs.setdefault((comp, m.group(1)), {})[m.group(2)] = tensor
        else:
            unknown.append(key)
    for (comp, name), pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{comp}.{name}: has {sorted(pair)} but needs both lora_A and lora_B")
    return pairs, tokens, unknown


# ---------------------------------------------------------------- diffusers / PEFT


def convert_native_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native -> `pytorch_lora_weights.safetensors` keys (tokens dropped: they go to embedding files).

    The scale is already folded into lora_B, so the file needs no alpha metadata.
    """
    pairs, _, unknown = _native_pairs(state_dict)
    if unknown:
        raise ValueError(f"detected native layout, but these keys do not match it: {_show(unknown)}")
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
        raise ValueError(f"detected diffusers/PEFT layout, but these keys do not match it: {_show(unknown)}")
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
        raise ValueError(f"detected a PEFT adapter, but these keys are not LoRA factors: {_show(unknown)}")
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


# ---------------------------------------------------------------- kohya / A1111 / ComfyUI


def kohya_name(component: str, name: str) -> str:
    """`unet`, `down_blocks.0.attentions.0.proj_in` -> `lora_unet_down_blocks_0_attentions_0_proj_in`."""
    if component not in KOHYA_PREFIX:
        raise ValueError(f"{component}: kohya names of SDXL's second text encoder (lora_te2_) are not supported")
    return KOHYA_PREFIX[component] + name.replace(".", "_")


def convert_native_to_kohya(
    state_dict: Mapping[str, torch.Tensor], include_tokens: bool = True
) -> dict[str, torch.Tensor]:
    """Native -> kohya keys: lora_down = lora_A, lora_up = lora_B, alpha = r (scale 1, factors unchanged).

    Learned tokens become A1111 bundled embeddings `bundle_emb.<token>.string_to_param.*` of shape
    (1, dim) (diffusers' kohya loader rejects these keys: pass include_tokens=False for it).
    """
    pairs, tokens, unknown = _native_pairs(state_dict)
    if unknown:
        raise ValueError(f"detected native layout, but these keys do not match it: {_show(unknown)}")
    out = {}
    for (comp, name), pair in pairs.items():
        base = kohya_name(comp, name)
        out[f"{base}.lora_down.weight"] = pair["lora_A"]
        out[f"{base}.lora_up.weight"] = pair["lora_B"]
        out[f"{base}.alpha"] = torch.tensor(float(pair["lora_A"].shape[0]))
    if include_tokens:
        for token, vector in tokens.items():
            out[f"{BUNDLE_PREFIX}{token}.string_to_param.*"] = vector.reshape(1, -1)
    return out


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


def convert_kohya_to_native(
    state_dict: Mapping[str, torch.Tensor], module_names: Mapping[str, Iterable[str]] | None = None
) -> dict[str, torch.Tensor]:
    """kohya keys -> native keys, folding alpha / r into lora_B (missing alpha: alpha = r).

    Args:
        module_names: canonical module names per component ({"unet": [...], "text_encoder": [...]});
            when given, every kohya name must be one of them (exact inverse). Without it, names are
            rebuilt from the compound words of diffusers/CLIP module names.
    """
    lookup = {}
    for comp, names in (module_names or {}).items():
        lookup.update({kohya_name(comp, n): (comp, n) for n in names})
    groups: dict[str, dict[str, torch.Tensor]] = {}
    tokens: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if key.startswith(BUNDLE_PREFIX):
            m = re.fullmatch(re.escape(BUNDLE_PREFIX) + r"(.+)\.string_to_param\.\*", key)
            if not m:
                unknown.append(key)
                continue
            rows = tensor.reshape(-1, tensor.shape[-1])
            for i, row in enumerate(rows):
                tokens[m.group(1) if i == 0 else f"{m.group(1)}_{i}"] = row
            continue
        m = re.fullmatch(r"(lora_(?:unet|te)_[^.]+)\.(lora_down\.weight|lora_up\.weight|alpha)", key)
        if not m:
            unknown.append(key)
            continue
        groups.setdefault(m.group(1), {})[m.group(2)] = tensor
    if unknown:
        raise ValueError(
            f"detected kohya layout, but these keys do not match it (LyCORIS/LoHa/LoKr/DoRA are not "
            f"supported): {_show(unknown)}"
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
    for token, vector in tokens.items():
        out[TOKEN_PREFIX + token] = vector
    return out


# ---------------------------------------------------------------- lora_diffusion (legacy)


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
        raise ValueError(f"detected lora_diffusion layout, but these keys do not match it: {_show(unknown)}")
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
    pairs, tokens, unknown = _native_pairs(state_dict)
    if unknown:
        raise ValueError(f"detected native layout, but these keys do not match it: {_show(unknown)}")
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
                f"lacks {_show(missing, 3)} and has extra {_show(extra, 3)}"
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


# ---------------------------------------------------------------- A1111 textual-inversion embeddings


def convert_a1111_embedding_to_tokens(obj: Mapping, token: str) -> dict[str, torch.Tensor]:
    """An A1111/diffusers embedding (`string_to_param`, `emb_params`, or one tensor) -> {token: (dim,)}.

    An embedding of n > 1 vectors becomes tokens `token`, `token_1`, … (diffusers' convention).
    """
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise ValueError(f"embedding string_to_param has keys {list(params)[:5]}, expected '*'")
        rows = params["*"]
    elif "emb_params" in obj:
        rows = obj["emb_params"]
    elif len(obj) == 1:
        rows = next(iter(obj.values()))
    else:
        raise ValueError(f"not a textual-inversion embedding: keys {_show(obj)}")
    if not isinstance(rows, torch.Tensor) or rows.ndim not in (1, 2):
        raise ValueError(f"embedding tensor has shape {getattr(rows, 'shape', None)}; expected (n, dim) or (dim,)")
    rows = rows.reshape(-1, rows.shape[-1])
    return {token if i == 0 else f"{token}_{i}": row.clone() for i, row in enumerate(rows)}


def convert_tokens_to_a1111_embedding(tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{token: (dim,)} -> `{"emb_params": (n, dim)}` (A1111 safetensors embedding, tokens in order)."""
    if not tokens:
        raise ValueError("tokens is empty: nothing to write as an embedding")
    return {"emb_params": torch.stack([v.float() for v in tokens.values()]).contiguous()}
