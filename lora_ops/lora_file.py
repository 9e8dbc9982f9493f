"""The native LoRA file: one safetensors file with UNet LoRA, text-encoder LoRA, learned tokens, metadata.

Layout (format version 1):

    unet.<module>.lora_A.weight             (r, in) or (r, in, kh, kw) for Conv2d
    unet.<module>.lora_B.weight             (out, r) or (out, r, 1, 1)
    text_encoder.<module>.lora_A.weight     module names as `text_model.encoder.layers.0.self_attn.q_proj`
    text_encoder.<module>.lora_B.weight
    text_encoder_2.<module>.lora_A.weight   SDXL's second text encoder, named the same way
    text_encoder_2.<module>.lora_B.weight
    token_embeddings.<token>                (dim,) one row per learned token
    token_embeddings_2.<token>              (dim_2,) its row in SDXL's second text encoder (SDXL only)

The scale is folded into lora_B: ΔW = lora_B @ lora_A exactly (alpha = r). That is the diffusers/PEFT
layout, so `pipe.load_lora_weights` reads the LoRA part of the same file. Metadata (all strings): format,
format_version, base_model, targets, ranks, alphas (as trained, before folding), tokens, dtype,
training_config and its sha256 (config_hash), lora_ops_version.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .precision import torch_dtype

FORMAT = "lora_ops"
FORMAT_VERSION = 1
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TOKEN_PREFIX = "token_embeddings."
TOKEN_PREFIX_2 = "token_embeddings_2."


@dataclass
class LoraModule:
    """One LoRA'd layer: ΔW = lora_B @ lora_A (scale already folded in).

    Args:
        lora_A: (r, in) for Linear, (r, in, kh, kw) for Conv2d.
        lora_B: (out, r) for Linear, (out, r, 1, 1) for Conv2d.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor

    def __post_init__(self):
        if self.lora_A.shape[0] != self.lora_B.shape[1]:
            raise ValueError(
                f"lora_A {tuple(self.lora_A.shape)} and lora_B {tuple(self.lora_B.shape)} disagree on the rank"
            )

    @property
    def r(self) -> int:
        return self.lora_A.shape[0]

    @property
    def is_conv(self) -> bool:
        return self.lora_A.ndim == 4

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense ΔW in float32: (out, in) or (out, in, kh, kw)."""
        a = self.lora_A.float().flatten(1)  # (r, in*kh*kw)
        b = self.lora_B.float().flatten(1)  # (out, r)
        return (b @ a).reshape(self.lora_B.shape[0], *self.lora_A.shape[1:])


@dataclass
class LoraFile:
    """Everything one native file holds. Module names are canonical (see `targets.canonical_name`)."""

    unet: dict[str, LoraModule] = field(default_factory=dict)
    text_encoder: dict[str, LoraModule] = field(default_factory=dict)
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    # SDXL's second text encoder (OpenCLIP bigG); last so positional construction keeps its meaning
    text_encoder_2: dict[str, LoraModule] = field(default_factory=dict)
    # the learned tokens' rows in SDXL's second text encoder (same tokens as `tokens`; empty for SD 1.x/2.x)
    tokens_2: dict[str, torch.Tensor] = field(default_factory=dict)

    def token_tables(self) -> dict[str, dict[str, torch.Tensor]]:
        """{text encoder component: {token: row}} of the learned tokens (text_encoder_2 only for SDXL files)."""
        tables = {"text_encoder": self.tokens}
        if self.tokens_2:
            tables["text_encoder_2"] = self.tokens_2
        return tables

    def check_tokens(self) -> None:
        """An SDXL file's tokens have a row in each text encoder: the same tokens in both tables."""
        if self.tokens_2 and list(self.tokens_2) != list(self.tokens):
            raise ValueError(
                f"the learned tokens differ between the text encoders: {list(self.tokens)} in text_encoder, "
                f"{list(self.tokens_2)} in text_encoder_2 (an SDXL token needs a row in each, in the same order)"
            )

    def component(self, name: str) -> dict[str, LoraModule]:
        if name not in COMPONENTS:
            raise ValueError(f"component={name!r} is not one of {COMPONENTS}")
        return getattr(self, name)

    def ranks(self) -> dict[str, dict[str, int]]:
        return {c: {n: m.r for n, m in self.component(c).items()} for c in COMPONENTS}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors in the native (diffusers/PEFT) key layout."""
        out: dict[str, torch.Tensor] = {}
        for comp in COMPONENTS:
            for name, mod in self.component(comp).items():
                out[f"{comp}.{name}.lora_A.weight"] = mod.lora_A
                out[f"{comp}.{name}.lora_B.weight"] = mod.lora_B
        for token, vector in self.tokens.items():
            out[TOKEN_PREFIX + token] = vector
        for token, vector in self.tokens_2.items():
            out[TOKEN_PREFIX_2 + token] = vector
        return out


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of a JSON-serialisable config, key order independent."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lora-pipeline")
    except PackageNotFoundError:
        return "0+unknown"


def atomic_write(path: str | Path, write) -> Path:
    """Call `write(tmp_path)` and rename into place, so readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask applied)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_lora(path: str | Path, lora: LoraFile, dtype: Literal["fp32", "fp16", "bf16"] = "fp32") -> Path:
    """Write `lora` as a native safetensors file (atomically); returns the path.

    Args:
        dtype: storage precision of the LoRA factors and tokens.
    """
    cast = torch_dtype(dtype)
    lora.check_tokens()
    tensors = {k: v.detach().to("cpu", cast).contiguous() for k, v in lora.state_dict().items()}
    for key, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise ValueError(f"refusing to save {key}: it holds non-finite values (inf/NaN after {dtype} cast?)")
    meta = dict(lora.metadata)
    training_config = meta.pop("training_config", {})
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "base_model": str(meta.pop("base_model", "")),
        "targets": json.dumps(meta.pop("targets", {})),
        "ranks": json.dumps(lora.ranks()),
        "alphas": json.dumps(meta.pop("alphas", {})),
        "tokens": json.dumps(list(lora.tokens)),
        "dtype": dtype,
        "training_config": json.dumps(training_config, sort_keys=True, default=str),
        "config_hash": config_hash(training_config),
        "lora_ops_version": _version(),
    }
    for key, value in meta.items():
        if key in header or key in ("ranks", "dtype", "format", "format_version", "config_hash"):
            continue  # derived from the tensors / this save, never from stale metadata
        header[key] = value if isinstance(value, str) else json.dumps(value)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=header))


def non_finite(tensors: Any, prefix: str = "") -> list[str]:
    """Names of the floating-point tensors holding NaN or Inf in a (nested) dict or list of tensors."""
    if isinstance(tensors, torch.Tensor):
        return [prefix] if tensors.is_floating_point() and not torch.isfinite(tensors).all() else []
    if isinstance(tensors, Mapping):
        items = tensors.items()
    elif isinstance(tensors, (list, tuple)):
        items = enumerate(tensors)
    else:
        return []
    return [bad for key, value in items for bad in non_finite(value, f"{prefix}.{key}" if prefix else str(key))]


def require_finite(tensors: Any, where: str) -> None:
    """Raise ValueError naming the tensors of `tensors` that hold NaN or Inf (weights, alphas, embeddings)."""
    bad = non_finite(tensors)
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        named = f" in {', '.join(bad[:5])}{more}" if bad != [""] else ""
        raise ValueError(
            f"{where}: non-finite values (NaN/Inf){named}; the weights are broken "
            "(diverged training or a bad export): refusing to use them"
        )


def read_safetensors(path: str | Path, finite: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, with one clear error for anything else (a bad header,
    truncation, and with `finite` any NaN/Inf tensor, named)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        header_bytes = fh.read(n) if 0 < n <= min(size - 8, 100_000_000) else b""
    try:
        header = json.loads(header_bytes)
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (no valid header)")
    end = max((_check_entry(path, k, v)[1] for k, v in header.items() if k != "__metadata__"), default=0)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError(f"{path}: bad safetensors header: __metadata__ must map strings to strings")
    if 8 + n + end > size:
        raise ValueError(f"{path}: truncated safetensors file ({size} bytes, header promises {8 + n + end})")
    try:
        tensors = load_file(path)
    except SafetensorError as exc:
        raise ValueError(f"{path}: unreadable safetensors file: {exc}") from None
    if finite:
        require_finite(tensors, str(path))
    return tensors, dict(meta)


def _check_entry(path: Path, key: str, entry: Any) -> tuple[int, int]:
    """The (start, end) data offsets of one header entry, or ValueError naming the file and the entry."""
    bad = f"{path}: bad safetensors header entry {key!r}"
    if not isinstance(entry, dict):
        raise ValueError(f"{bad}: expected an object with dtype, shape and data_offsets, got {type(entry).__name__}")
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
    if missing:
        raise ValueError(f"{bad}: missing {', '.join(missing)}")
    offsets, shape = entry["data_offsets"], entry["shape"]
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise ValueError(f"{bad}: data_offsets must be two non-negative integers [start, end], got {offsets!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise ValueError(f"{bad}: shape must be a list of non-negative integers, got {shape!r}")
    if not isinstance(entry["dtype"], str):
        raise ValueError(f"{bad}: dtype must be a string, got {entry['dtype']!r}")
    return offsets[0], offsets[1]


def _parse_json(meta: Mapping[str, str], key: str, default):
    try:
        return json.loads(meta[key]) if key in meta else default
    except ValueError:
        return meta[key]


def lora_from_state_dict(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> LoraFile:
    """Build a LoraFile from native keys; raises ValueError naming keys that do not fit the layout."""
    metadata = dict(metadata or {})
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    lora = LoraFile()
    unknown = []
    for key, tensor in tensors.items():
        if key.startswith(TOKEN_PREFIX):
            lora.tokens[key[len(TOKEN_PREFIX) :]] = tensor
            continue
        if key.startswith(TOKEN_PREFIX_2):
            lora.tokens_2[key[len(TOKEN_PREFIX_2) :]] = tensor
            continue
        comp, _, rest = key.partition(".")
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.weight"
            if comp in COMPONENTS and rest.endswith(suffix):
                pairs.setdefault((comp, rest[: -len(suffix)]), {})[part] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"keys that are not native LoRA keys: {unknown[:5]}{' …' if len(unknown) > 5 else ''}")
    for (comp, name), pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{comp}.{name}: has {sorted(pair)} but needs both lora_A and lora_B")
        lora.component(comp)[name] = LoraModule(pair["lora_A"], pair["lora_B"])
    if "tokens" in metadata:  # keep the token order the file recorded
        order = [t for t in _parse_json(metadata, "tokens", []) if t in lora.tokens]
        lora.tokens = {t: lora.tokens[t] for t in order + [t for t in lora.tokens if t not in order]}
    if lora.tokens_2 and set(lora.tokens_2) == set(lora.tokens):
        lora.tokens_2 = {t: lora.tokens_2[t] for t in lora.tokens}
    lora.check_tokens()
    lora.metadata = {k: _parse_json(metadata, k, None) for k in metadata}
    for key in ("ranks", "tokens", "dtype", "format", "format_version", "config_hash", "lora_ops_version"):
        lora.metadata.pop(key, None)
    return lora


def load_lora(path: str | Path) -> LoraFile:
    """Read a native LoRA file. Other formats: see `lora_ops.formats.read_any`."""
    tensors, metadata = read_safetensors(path)
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{path}: not a native lora_ops file (format={metadata.get('format')!r}); "
            "convert it first with `lora-ops convert`"
        )
    return lora_from_state_dict(tensors, metadata)


def check_shapes(lora: LoraFile, models: Mapping[str, nn.Module]) -> None:
    """Every module exists in the model and its factors fit the layer; ValueError naming the first misfit."""
    from .targets import get_module

    for comp in COMPONENTS:
        model = models.get(comp)
        for name, mod in lora.component(comp).items():
            layer = None if model is None else get_module(model, name)
            if layer is None:
                raise ValueError(f"{comp} has no module {name!r}: this LoRA was made for another architecture")
            layer = getattr(layer, "base_layer", layer)
            if isinstance(layer, nn.Conv2d):
                want = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
            elif isinstance(layer, nn.Linear):
                want = (layer.out_features, layer.in_features)
            else:
                raise ValueError(f"{comp}.{name} is a {type(layer).__name__}; LoRA needs Linear or Conv2d")
            got = (mod.out_features, *mod.lora_A.shape[1:])
            if got != want or (mod.is_conv and tuple(mod.lora_B.shape[2:]) != (1, 1)):
                raise ValueError(
                    f"{comp}.{name}: ΔW shape {got} (lora_A {tuple(mod.lora_A.shape)}, lora_B "
                    f"{tuple(mod.lora_B.shape)}) does not fit the layer's weight {want}"
                )
    for comp, tokens in lora.token_tables().items():
        te = models.get(comp)
        if tokens and te is not None:
            dim = te.get_input_embeddings().weight.shape[1]
            for token, vector in tokens.items():
                if tuple(vector.shape) != (dim,):
                    raise ValueError(f"token {token!r} has shape {tuple(vector.shape)}; {comp} needs ({dim},)")
