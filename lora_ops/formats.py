"""LoRA and embedding files in every supported format: detect, read into a `LoraFile`, write.

Formats: "native" (lora_ops), "diffusers" (diffusers `pytorch_lora_weights.safetensors`), "peft" (a PEFT
adapter folder `adapter_config.json` + `adapter_model.safetensors`, one such folder per component under
`unet/` and `text_encoder/`, or the file diffusers' `save_lora_adapter` writes), "kohya" (kohya / A1111 /
ComfyUI), "lora_diffusion" (the original project's format, `.safetensors` or its `.pt` list of tensors),
"a1111_embedding" (`.pt` or `.safetensors` textual-inversion embedding). A diffusers LoRA folder is read
with the token embedding files beside its weights.
Pickled `.pt` files are read only with `torch.load(weights_only=True)`: a pickle that needs code to
load is refused.
"""

from __future__ import annotations

import functools
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from torch import nn

from .convert import (
    BUNDLE_PREFIX,
    convert_a1111_embedding_to_tokens,
    convert_diffusers_to_native,
    convert_kohya_to_native,
    convert_native_to_kohya,
    convert_peft_to_native,
    convert_sdxl_embedding_to_tokens,
    convert_tokens_to_a1111_embedding,
    convert_tokens_to_sdxl_embedding,
    is_sdxl_embedding,
    is_sdxl_kohya,
    peft_component,
)
from .lora_file import (
    COMPONENTS,
    FORMAT,
    LoraFile,
    atomic_write,
    lora_from_state_dict,
    read_safetensors,
    require_finite,
    save_lora,
)
from .models import components, is_sdxl_unet
from .targets import canonical_name

Format = Literal["native", "diffusers", "peft", "kohya", "lora_diffusion", "a1111_embedding"]
FORMATS: tuple[str, ...] = ("native", "diffusers", "peft", "kohya", "lora_diffusion", "a1111_embedding")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
_PEFT_FACTOR = re.compile(r".+\.lora_[AB](\.[A-Za-z0-9_-]+)?\.weight")


def detect_format(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> str:
    """The format of a state dict, from its metadata and key layout; ValueError if none fits."""
    metadata = metadata or {}
    keys = list(tensors)
    if metadata.get("format") == FORMAT:
        return "native"
    if not keys:
        raise ValueError("the file holds no tensors")
    if any(re.fullmatch(r"(unet|text_encoder):\d+:(up|down)", k) for k in keys):
        return "lora_diffusion"
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", BUNDLE_PREFIX)) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys):
        return "diffusers"
    if set(keys) <= {
        "emb_params",
        "string_to_param",
        "string_to_token",
        "name",
        "step",
        "sd_checkpoint",
        "sd_checkpoint_name",
    } and ("emb_params" in keys or "string_to_param" in keys):
        return "a1111_embedding"
    if set(keys) == {"clip_l", "clip_g"}:  # an SDXL embedding (A1111, ComfyUI, diffusers' advanced SDXL script)
        return "a1111_embedding"
    if len(keys) == 1 and getattr(tensors[keys[0]], "ndim", 0) in (1, 2) and keys[0].startswith("<"):
        # diffusers' save_textual_inversion: {"<token>": (n, dim)}
        return "a1111_embedding"
    if keys[0].startswith("base_model.model.") or (
        all(_PEFT_FACTOR.fullmatch(k) for k in keys) and peft_component(keys[0]) is not None
    ):
        return "peft"  # PeftModel.save_pretrained, or diffusers' save_lora_adapter (no component prefix)
    raise ValueError(f"unknown key layout: none of {list(FORMATS)} fits; first keys: {keys[:5]} ({len(keys)} keys)")


def _load_pt(path: Path) -> Any:
    """torch.load with weights_only=True; a pickle that needs code is refused with a clear message."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, ModuleNotFoundError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"{path}: refused: this pickle needs arbitrary code to load ({first[:200]}); only plain "
            "tensors, dicts and lists are read (torch.load weights_only=True). Convert it where you trust it."
        ) from None


def read_raw(path: str | Path) -> tuple[str, dict[str, Any], dict[str, str]]:
    """(format, tensors, metadata) of a `.safetensors`, `.pt`, `.bin` or `.ckpt` LoRA/embedding file."""
    path = Path(path)
    if path.is_dir():
        return _read_folder(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.suffix in (".pt", ".bin", ".ckpt", ".pth"):
        obj = _load_pt(path)
        require_finite(obj, str(path))
        if isinstance(obj, (list, tuple)):
            # the original project's .pt: [up, down, up, down, …] in traversal order
            if len(obj) % 2 or not all(isinstance(t, torch.Tensor) for t in obj):
                raise ValueError(f"{path}: a list, but not the lora_diffusion [up, down, …] tensor list")
            comp = "text_encoder" if "text_encoder" in path.name else "unet"
            tensors = {}
            for i in range(len(obj) // 2):
                tensors[f"{comp}:{i}:up"], tensors[f"{comp}:{i}:down"] = obj[2 * i], obj[2 * i + 1]
            return "lora_diffusion", tensors, {}
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict or embedding")
        if "string_to_param" in obj:
            return "a1111_embedding", obj, {}
        if (
            obj
            and all(isinstance(v, torch.Tensor) and v.ndim == 1 for v in obj.values())
            and not any(k.startswith(("unet", "text_encoder", "lora_")) for k in obj)
        ):
            # learned_embeds.bin of diffusers' textual inversion: {token: (dim,)}
            return "a1111_embedding", obj, {}
        return detect_format(obj, {}), obj, {}
    tensors, metadata = read_safetensors(path)
    return detect_format(tensors, metadata), tensors, metadata


def _peft_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, config) of one PEFT adapter folder."""
    try:
        config = json.loads((folder / PEFT_CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{folder / PEFT_CONFIG}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{folder / PEFT_CONFIG}: not a PEFT adapter config (a JSON object)")
    weights = next((folder / n for n in PEFT_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder}: has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}")
    if weights.suffix == ".bin":
        tensors = _load_pt(weights)
        if not isinstance(tensors, dict):
            raise ValueError(f"{weights}: holds a {type(tensors).__name__}, not a state dict")
        require_finite(tensors, str(weights))
    else:
        tensors, _ = read_safetensors(weights)
    return tensors, config


def _read_folder(path: Path) -> tuple[str, dict[str, Any], dict[str, str]]:
    """A PEFT adapter folder (or one per component), or a diffusers LoRA folder."""
    if (path / PEFT_CONFIG).is_file():
        tensors, config = _peft_adapter(path)
        configs = {"*": config}
    elif any((path / c / PEFT_CONFIG).is_file() for c in COMPONENTS):
        tensors, configs = {}, {}
        for comp in COMPONENTS:
            if (path / comp / PEFT_CONFIG).is_file():
                part, configs[comp] = _peft_adapter(path / comp)
                tensors.update({f"{comp}/{k}": v for k, v in part.items()})
    elif (path / DIFFUSERS_WEIGHTS).is_file():
        return read_raw(path / DIFFUSERS_WEIGHTS)
    else:
        raise ValueError(
            f"{path}: a folder, but not a LoRA: no {PEFT_CONFIG} (a PEFT adapter), no unet/ or text_encoder/ "
            f"adapter folders, and no {DIFFUSERS_WEIGHTS} (a diffusers LoRA folder)"
        )
    if not tensors:
        raise ValueError(f"{path}: the adapter holds no tensors")
    metadata = {"peft_config": json.dumps(configs)}
    base = next((c.get("base_model_name_or_path") for c in configs.values() if c.get("base_model_name_or_path")), None)
    if base:
        metadata["base_model"] = str(base)
    return "peft", tensors, metadata


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, Any]:
    """Adapter configs by component ("*": either) from a folder's `peft_config` or a file's peft metadata."""
    if metadata.get("peft_config"):
        return json.loads(metadata["peft_config"])
    if metadata.get("lora_adapter_metadata"):  # diffusers' save_lora_adapter: one flat LoraConfig
        return {"*": json.loads(metadata["lora_adapter_metadata"])}
    return {"*": {}}  # no config: alpha = r, scale 1


def _add_embedding(lora: LoraFile, tensors: Mapping[str, Any], token: str) -> None:
    """Add an embedding's tokens to `lora` (an SDXL embedding's rows to both encoders' tables)."""
    if is_sdxl_embedding(tensors):
        first, second = convert_sdxl_embedding_to_tokens(tensors, token)
        lora.tokens.update(first)
        lora.tokens_2.update(second)
    else:
        lora.tokens.update(convert_a1111_embedding_to_tokens(tensors, token))


def _folder_tokens(path: Path, lora: LoraFile) -> None:
    """Add the token embeddings a diffusers LoRA folder holds beside its weights (`<token>.safetensors`)."""
    for emb in sorted(path.glob("*.safetensors")):
        if emb.name == DIFFUSERS_WEIGHTS:
            continue
        fmt, tensors, metadata = read_raw(emb)
        if fmt == "a1111_embedding":
            only = next(iter(tensors)) if len(tensors) == 1 else ""
            token = metadata.get("token") or (only if only.startswith("<") else f"<{emb.stem}>")
            _add_embedding(lora, tensors, token)


def model_skeletons(base: Any) -> dict[str, nn.Module]:
    """{"unet", "text_encoder"[, "text_encoder_2"]} modules of `base`: a pipeline, a dict of modules, or a
    diffusers folder.

    From a folder the modules are built from the configs on the meta device (names and shapes only, no
    weights): enough to name and check LoRA modules, instant even for SD 1.5 and SDXL.
    """
    if hasattr(base, "unet") and hasattr(base, "text_encoder"):
        return components(base)
    if isinstance(base, Mapping):
        return dict(base)
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(base)
    if not (folder / "unet" / "config.json").is_file() or not (folder / "text_encoder" / "config.json").is_file():
        raise ValueError(f"base={str(base)!r} is not a diffusers model folder (needs unet/ and text_encoder/ configs)")
    with torch.device("meta"):
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
        }
        if (folder / "text_encoder_2" / "config.json").is_file():
            config_2 = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            models["text_encoder_2"] = CLIPTextModelWithProjection(config_2)
    return models


@functools.cache
def sdxl_skeletons() -> dict[str, nn.Module]:
    """SDXL 1.0's UNet and text encoders on the meta device (names and shapes, no weights): the layout kohya SDXL
    files are read against and written in when no base model is given."""
    from .tiny import build_models

    with torch.device("meta"):
        return build_models("sdxl")


def _kohya_layout(models: Mapping[str, nn.Module] | None, sdxl: bool) -> tuple[Any, Any]:
    """(module names, SDXL UNet config or None) that kohya names are made from; SDXL 1.0's without a base."""
    if models is None and sdxl:
        models = sdxl_skeletons()
    if models is None:
        return None, None
    return module_names(models), models["unet"].config if is_sdxl_unet(models["unet"]) else None


def _fit_sdxl_1_0(convert: Any) -> Any:
    """Run `convert` against SDXL 1.0's layout, saying what to do when the LoRA is for another SDXL UNet."""
    from .lora_file import check_shapes

    try:
        lora = convert()
        check_shapes(lora, sdxl_skeletons())
    except ValueError as err:
        raise ValueError(
            f"{err}: kohya's SDXL names number the UNet's blocks, and without a base model they are SDXL 1.0's; "
            "this LoRA does not fit SDXL 1.0, so pass the base model it belongs to (base=/--base MODEL_DIR)"
        ) from None
    return lora


def _read_kohya(tensors: Mapping[str, Any], models: Mapping[str, nn.Module] | None) -> LoraFile:
    # an SDXL file against a non-SDXL base is refused by convert_kohya_to_native (names given, no SDXL config)
    names, sdxl_unet = _kohya_layout(models, is_sdxl_kohya(tensors))
    read = lambda: lora_from_state_dict(convert_kohya_to_native(tensors, names, sdxl_unet))  # noqa: E731
    return _fit_sdxl_1_0(read) if models is None and sdxl_unet is not None else read()


def _kohya_tensors(lora: LoraFile, base: Any, include_tokens: bool) -> dict[str, torch.Tensor]:
    models = model_skeletons(base) if base is not None else None
    _, sdxl_unet = _kohya_layout(models, lora_family(lora) == "sdxl")
    if models is None and sdxl_unet is not None:
        _fit_sdxl_1_0(lambda: lora)
    return convert_native_to_kohya(lora.state_dict(), include_tokens=include_tokens, sdxl_unet=sdxl_unet)


def module_names(models: Mapping[str, nn.Module]) -> dict[str, list[str]]:
    """Canonical names of every Linear/Conv2d per component (peft wrappers named as the wrapped layer)."""
    out = {}
    for comp, model in models.items():
        names = []
        for name, module in model.named_modules():
            if ".lora_" in name or not isinstance(module, (nn.Linear, nn.Conv2d)):
                continue
            names.append(canonical_name(comp, name.removesuffix(".base_layer")))
        out[comp] = names
    return out


def lora_from_raw(
    fmt: str, tensors: Mapping[str, Any], metadata: Mapping[str, str], base: Any = None, token: str = "<emb>"
) -> LoraFile:
    """A LoraFile from a detected raw state dict (see `read_raw`)."""
    from .legacy import read_legacy
    from .lora_file import check_shapes

    models = model_skeletons(base) if base is not None else None
    if fmt == "native":
        lora = lora_from_state_dict(tensors, metadata)
    elif fmt == "diffusers":
        lora = lora_from_state_dict(convert_diffusers_to_native(tensors, metadata))
    elif fmt == "peft":
        lora = lora_from_state_dict(convert_peft_to_native(tensors, _peft_configs(metadata)))
    elif fmt == "kohya":
        lora = _read_kohya(tensors, models)
    elif fmt == "lora_diffusion":
        if models is None:
            raise ValueError(
                "detected lora_diffusion layout: its modules are numbered in the model's traversal order, "
                "so reading it needs the base model (base=/--base MODEL_DIR)"
            )
        lora = read_legacy(tensors, metadata, models)
    elif fmt == "a1111_embedding":
        lora = LoraFile()
        _add_embedding(lora, tensors, token)
    else:
        raise ValueError(f"format={fmt!r} is not one of {FORMATS}")
    if fmt != "native":
        lora.metadata = {**_provenance(metadata), **lora.metadata, "source_format": fmt}
    if models is not None:
        check_shapes(lora, models)
    return lora


def _provenance(metadata: Mapping[str, str]) -> dict[str, Any]:
    out = {}
    base = metadata.get("base_model") or metadata.get("ss_sd_model_name")
    if base:
        out["base_model"] = base
    return out


def read_any(path: str | Path, base: Any = None, token: str | None = None) -> LoraFile:
    """Read a LoRA or embedding file (or a PEFT / diffusers LoRA folder) as a LoraFile (scale folded into lora_B).

    Args:
        base: the base model (folder, pipeline, or {"unet", "text_encoder"}); needed for lora_diffusion
            files, and used to check every module and shape when given.
        token: the token of an embedding (default: the token a `{"<token>": …}` file names, else
            `<file stem>`).
    """
    fmt, tensors, metadata = read_raw(path)
    if token is None:
        only = next(iter(tensors)) if len(tensors) == 1 else ""
        token = only if fmt == "a1111_embedding" and only.startswith("<") else f"<{Path(path).stem}>"
    lora = lora_from_raw(fmt, tensors, metadata, base, token)
    if Path(path).is_dir() and fmt == "diffusers":
        _folder_tokens(Path(path), lora)
    return lora


def provenance_metadata(lora: LoraFile) -> dict[str, str]:
    """String metadata every written file carries: base model, ranks, targets, tokens, config hash."""
    meta = {
        "base_model": str(lora.metadata.get("base_model", "")),
        "ranks": json.dumps(lora.ranks()),
        "targets": json.dumps(lora.metadata.get("targets", {c: sorted(lora.component(c)) for c in COMPONENTS})),
        "tokens": json.dumps(list(lora.tokens)),
    }
    if "config_hash" in lora.metadata:
        meta["config_hash"] = str(lora.metadata["config_hash"])
    return meta


def save_a1111_embedding(
    path: str | Path, tokens: Mapping[str, torch.Tensor], tokens_2: Mapping[str, torch.Tensor] | None = None
) -> Path:
    """Write tokens as one A1111 embedding `{"emb_params": (n, dim)}` (type its file stem in A1111); with
    `tokens_2` (SDXL: the rows of the second text encoder) `{"clip_l": (n, d1), "clip_g": (n, d2)}`."""
    tensors = (
        convert_tokens_to_sdxl_embedding(tokens, tokens_2) if tokens_2 else convert_tokens_to_a1111_embedding(tokens)
    )
    meta = {"tokens": json.dumps(list(tokens))}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


TOKEN_MODES = ("bundle", "separate", "none")


def write_any(path: str | Path, lora: LoraFile, fmt: str, base: Any = None, tokens: str = "bundle") -> Path:
    """Write `lora` in format `fmt` (atomically). lora_diffusion needs `base`; diffusers writes a folder
    (LoRA + one embedding per token) unless `path` ends in `.safetensors` (then the tokens go beside it as
    `<stem>.<token>.safetensors`)."""
    from .diffusers_export import export_diffusers
    from .legacy import write_legacy

    path = Path(path)
    require_finite(lora.state_dict(), f"refusing to write {path}")
    if fmt == "native":
        return save_lora(path, lora)
    if fmt == "diffusers":
        if path.suffix == ".safetensors":
            # one file holds the LoRA only; the learned tokens go beside it (`out.s1.safetensors`), never dropped
            return export_diffusers(lora, path.parent, weight_name=path.name, token_prefix=f"{path.stem}.")["lora"]
        return export_diffusers(lora, path)["lora"]
    if tokens not in TOKEN_MODES:
        raise ValueError(f"tokens={tokens!r} is not one of {TOKEN_MODES}")
    if fmt == "lora_diffusion" and lora_family(lora) == "sdxl":
        # the original project's format predates SDXL: no tool reads an SDXL LoRA in it
        raise ValueError(f"fmt={fmt!r}: the lora_diffusion format has no SDXL layout; use 'diffusers' or 'kohya'")
    if fmt == "kohya":
        # bundle: A1111 reads `bundle_emb.*` keys in the LoRA file (diffusers' load_lora_weights refuses them,
        # ComfyUI ignores them); separate: one A1111 embedding `<stem>.<token>.safetensors` per token beside it
        bundled = _kohya_tensors(lora, base, include_tokens=tokens == "bundle")
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in bundled.items()}
        if tokens == "separate":
            from .diffusers_export import token_file_name

            for token, vector in lora.tokens.items():
                second = {token: lora.tokens_2[token]} if lora.tokens_2 else None
                save_a1111_embedding(path.parent / f"{path.stem}.{token_file_name(token)}", {token: vector}, second)
        meta = {**provenance_metadata(lora), "ss_network_module": "networks.lora"}
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    if fmt == "lora_diffusion":
        if base is None:
            raise ValueError("writing lora_diffusion needs the base model (base=/--base MODEL_DIR) for module order")
        return write_legacy(path, lora, model_skeletons(base))
    if fmt == "a1111_embedding":
        if path.suffix != ".safetensors":
            raise ValueError(f"path={str(path)!r}: embeddings are written as .safetensors only")
        return save_a1111_embedding(path, lora.tokens, lora.tokens_2)
    raise ValueError(f"fmt={fmt!r} is not one of {FORMATS}")


def lora_dims(lora: LoraFile) -> dict[str, int | None]:
    """Cross-attention width (UNet attn2.to_k input) and text width seen in a LoRA (None if absent)."""
    cross = next((m.in_features for n, m in lora.unet.items() if n.endswith("attn2.to_k")), None)
    text = next((m.in_features for n, m in lora.text_encoder.items() if n.endswith("self_attn.q_proj")), None)
    if text is None and lora.tokens:
        text = next(iter(lora.tokens.values())).shape[-1]
    return {"cross_attention_dim": cross, "text_dim": text}


def lora_family(lora: LoraFile) -> str:
    """ "sdxl" (a second text encoder, or 2048-wide cross-attention), "sd1" (768-wide text), "sd2" (1024) or
    "unknown"."""
    dims = lora_dims(lora)
    if lora.text_encoder_2 or lora.tokens_2 or dims["cross_attention_dim"] == 2048:
        return "sdxl"
    width = dims["cross_attention_dim"] or dims["text_dim"]
    return {768: "sd1", 1024: "sd2"}.get(width, "unknown")
