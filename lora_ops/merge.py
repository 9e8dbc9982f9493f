"""Combining LoRAs with exact maths: into a model (upl), into one LoRA (lpl), side by side (ljl).

- `add_to_pipeline` (upl): W ← W + s · B A for every module, in float32, cast back to the weight's dtype;
  learned tokens are added to the tokenizer and embedding table.
- `merge_loras` (lpl): ΔW = Σ wᵢ Bᵢ Aᵢ exactly, by concatenating ranks: A = [A₁; A₂; …],
  B = [w₁B₁, w₂B₂, …]. Optionally compressed by SVD to a rank, reporting each module's error.
  The original project summed up and down factors separately (B = Σ wᵢBᵢ, A = Σ wᵢAᵢ), which adds the
  cross terms wᵢwⱼ BᵢAⱼ; it is kept as mode "legacy-sum-factors" for reproducing old merges only.
- `join_loras` (ljl): the same concatenation at weight 1, with each input's rank slice recorded in the
  metadata (`parts`), so `load_joined` can load every part as its own adapter with its own scales.
  A reader that ignores `parts` gets the sum of the parts at scale 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from .formats import lora_dims
from .lora_file import COMPONENTS, LoraFile, LoraModule, check_shapes, require_finite
from .models import components
from .resize import ResizeConfig, ResizeReport, resize_module
from .runtime import patch_pipeline
from .targets import get_module
from .tokens import apply_lora_tokens

MergeMode = Literal["concat", "svd", "legacy-sum-factors"]


def check_compatible(loras: Sequence[LoraFile], allow_mixed_bases: bool = False) -> None:
    """Refuse LoRAs of different model families (SD1 vs SD2 widths) or different recorded base models."""
    dims = [lora_dims(lora) for lora in loras]
    for key in ("cross_attention_dim", "text_dim"):
        seen = {d[key] for d in dims if d[key] is not None}
        if len(seen) > 1:
            names = {768: "SD1 (768)", 1024: "SD2 (1024)"}
            raise ValueError(
                f"mixed model families: {key} differs between inputs ({', '.join(names.get(v, str(v)) for v in sorted(seen))})"
            )
    bases = {str(lora.metadata.get("base_model") or "") for lora in loras} - {""}
    if len(bases) > 1 and not allow_mixed_bases:
        raise ValueError(
            f"mismatched bases: the inputs were trained on {sorted(bases)}; pass allow_mixed_bases=True "
            "(--allow-mixed-bases) if you know they share weights"
        )


def _check_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"weights={weights}: need one weight per input ({n})")
    if not all(torch.isfinite(torch.tensor(w)) for w in weights):
        raise ValueError(f"weights={weights} must be finite numbers")
    return weights


def _union_tokens(loras: Sequence[LoraFile]) -> dict[str, dict[str, torch.Tensor]]:
    """{"tokens": ..., "tokens_2": ...}: every input's learned tokens (SDXL: the rows of both encoders)."""
    out: dict[str, dict[str, torch.Tensor]] = {"tokens": {}, "tokens_2": {}}
    for i, lora in enumerate(loras):
        for field_name in out:
            tokens = out[field_name]
            for token, vector in getattr(lora, field_name).items():
                if token in tokens and not torch.equal(tokens[token].float(), vector.float()):
                    raise ValueError(
                        f"token {token!r} is in several inputs with different embeddings (input {i}); "
                        "rename it in one of them before combining"
                    )
                tokens[token] = vector
    return out


def _concat(mods: Sequence[LoraModule], weights: Sequence[float], where: str) -> LoraModule:
    shapes = {(m.out_features, *m.lora_A.shape[1:]) for m in mods}
    if len(shapes) > 1:
        raise ValueError(f"{where}: the inputs' ΔW shapes differ {sorted(shapes)}: they are for different models")
    a = torch.cat([m.lora_A.float() for m in mods], dim=0)  # (Σr, in[, kh, kw])
    b = torch.cat([m.lora_B.float() * w for m, w in zip(mods, weights, strict=True)], dim=1)  # (out, Σr[, 1, 1])
    return LoraModule(a, b)


def merge_loras(
    loras: Sequence[LoraFile],
    weights: Sequence[float] | None = None,
    mode: MergeMode = "concat",
    rank: int | None = None,
    allow_mixed_bases: bool = False,
) -> tuple[LoraFile, ResizeReport | None]:
    """Weighted merge ΔW = Σ wᵢ ΔWᵢ of two or more LoRAs (lpl).

    Args:
        weights: one per input (default 1/n each, the original's 0.5 / 0.5 for two).
        mode: "concat" (exact, rank Σ rᵢ), "svd" (exact concat, then the best rank-`rank`
            approximation per module, with its error reported), "legacy-sum-factors" (the original's
            B = Σ wᵢBᵢ, A = Σ wᵢAᵢ; not ΔW = Σ wᵢ ΔWᵢ; needs equal ranks).
        rank: target rank of mode "svd".
    Modules present in only some inputs come from those inputs alone; ranks may differ per input.
    Returns the merged LoRA and, for mode "svd", the per-module report.
    """
    if mode not in ("concat", "svd", "legacy-sum-factors"):
        raise ValueError(f"mode={mode!r} is not one of concat, svd, legacy-sum-factors")
    if len(loras) < 2:
        raise ValueError(f"merging needs two or more LoRAs, got {len(loras)}")
    if mode == "svd" and rank is None:
        raise ValueError("mode='svd' needs rank=")
    weights = _check_weights(weights, len(loras))
    check_compatible(loras, allow_mixed_bases)
    out = LoraFile(**_union_tokens(loras))
    report = ResizeReport() if mode == "svd" else None
    for comp in COMPONENTS:
        names = list(dict.fromkeys(n for lora in loras for n in lora.component(comp)))
        for name in names:
            have = [
                (lora.component(comp)[name], w)
                for lora, w in zip(loras, weights, strict=True)
                if name in lora.component(comp)
            ]
            mods, ws = [m for m, _ in have], [w for _, w in have]
            where = f"{comp}.{name}"
            if mode == "legacy-sum-factors":
                if len({m.r for m in mods}) > 1:
                    raise ValueError(f"{where}: legacy-sum-factors needs equal ranks, got {[m.r for m in mods]}")
                a = sum(m.lora_A.float() * w for m, w in have)
                b = sum(m.lora_B.float() * w for m, w in have)
                out.component(comp)[name] = LoraModule(a, b)
                continue
            merged = _concat(mods, ws, where)
            if mode == "svd":
                merged, rep = resize_module(merged, ResizeConfig(mode="rank", rank=rank))
                report.modules[where] = rep
                report.total_sq += rep.norm**2
                report.kept_sq += rep.norm**2 - rep.error**2
            out.component(comp)[name] = merged
    base = next((lora.metadata.get("base_model") for lora in loras if lora.metadata.get("base_model")), "")
    out.metadata = {"base_model": base, "merge": {"mode": mode, "weights": weights, "rank": rank}}
    return out, report


def join_loras(
    loras: Sequence[LoraFile], names: Sequence[str] | None = None, allow_mixed_bases: bool = False
) -> LoraFile:
    """Join LoRAs into one file whose parts keep independent scales (ljl); see `load_joined`.

    Args:
        names: one adapter name per part (default part0, part1, …).
    """
    if len(loras) < 2:
        raise ValueError(f"joining needs two or more LoRAs, got {len(loras)}")
    names = list(names) if names is not None else [f"part{i}" for i in range(len(loras))]
    if len(names) != len(loras) or len(set(names)) != len(names):
        raise ValueError(f"names={names}: need one distinct name per input ({len(loras)})")
    check_compatible(loras, allow_mixed_bases)
    out = LoraFile(**_union_tokens(loras))
    parts = [
        {"name": n, "slices": {c: {} for c in COMPONENTS}, "tokens": list(lora.tokens)}
        for n, lora in zip(names, loras, strict=True)
    ]
    for comp in COMPONENTS:
        for module in dict.fromkeys(n for lora in loras for n in lora.component(comp)):
            start, mods = 0, []
            for part, lora in zip(parts, loras, strict=True):
                mod = lora.component(comp).get(module)
                if mod is None:
                    continue
                part["slices"][comp][module] = [start, start + mod.r]
                start += mod.r
                mods.append(mod)
            out.component(comp)[module] = _concat(mods, [1.0] * len(mods), f"{comp}.{module}")
    base = next((lora.metadata.get("base_model") for lora in loras if lora.metadata.get("base_model")), "")
    out.metadata = {"base_model": base, "parts": parts}
    return out


def split_parts(lora: LoraFile) -> dict[str, LoraFile]:
    """The parts of a joined LoRA (see `join_loras`), each a LoraFile of its own."""
    parts = lora.metadata.get("parts")
    if not parts:
        raise ValueError("this LoRA has no 'parts' metadata: it was not made by join_loras / `lora-ops add ljl`")
    out = {}
    for part in parts:
        one = LoraFile(
            tokens={t: lora.tokens[t] for t in part["tokens"]},
            tokens_2={t: lora.tokens_2[t] for t in part["tokens"] if t in lora.tokens_2},
            metadata={"base_model": lora.metadata.get("base_model", "")},
        )
        for comp in COMPONENTS:
            for module, (start, stop) in part["slices"][comp].items():
                mod = lora.component(comp)[module]
                one.component(comp)[module] = LoraModule(mod.lora_A[start:stop], mod.lora_B[:, start:stop])
        out[part["name"]] = one
    return out


def load_joined(pipe, lora: LoraFile, scales: Mapping[str, float | tuple[float, float]] | None = None) -> list[str]:
    """Load every part of a joined LoRA as its own adapter (named as the part); returns the names.

    Args:
        scales: per part, one scale for UNet and text encoder, or (unet, text_encoder); default 1.
            Change them later with `runtime.set_scales(pipe, part_name, unet=, text_encoder=)`.
    """
    parts = split_parts(lora)
    scales = dict(scales or {})
    unknown = set(scales) - set(parts)
    if unknown:
        raise ValueError(f"scales for unknown parts {sorted(unknown)}; parts are {list(parts)}")
    for name, part in parts.items():
        s = scales.get(name, 1.0)
        unet_scale, te_scale = s if isinstance(s, tuple) else (s, s)
        patch_pipeline(pipe, part, adapter_name=name, unet_scale=unet_scale, text_encoder_scale=te_scale)
    return list(parts)


@torch.no_grad()
def add_to_pipeline(
    pipe, lora: LoraFile, unet_scale: float = 1.0, text_encoder_scale: float = 1.0, load_tokens: bool = True
) -> int:
    """Merge `lora` into the pipeline's weights in place (upl): W ← W + scale · ΔW, tokens added.

    Everything is checked (module names, shapes, token widths) before any weight changes. Returns the
    number of modules changed.

    Args:
        load_tokens: add the learned tokens to the tokenizer and embedding table (False: leave the
            vocabulary alone, e.g. when the tokens travel as a separate embedding file).
    """
    for name, value in (("unet_scale", unet_scale), ("text_encoder_scale", text_encoder_scale)):
        if not isinstance(value, (int, float)) or not torch.isfinite(torch.tensor(float(value))):
            raise ValueError(f"{name}={value!r} must be a finite number")
    models = components(pipe)
    check_shapes(lora, models)
    require_finite(lora.state_dict(), "add_to_pipeline: the LoRA")
    # every merged weight is computed and checked before any is written: no half-merged model
    merged = []
    for comp in models:
        scale = unet_scale if comp == "unet" else text_encoder_scale
        for name, mod in lora.component(comp).items():
            layer = get_module(models[comp], name)
            weight = getattr(layer, "base_layer", layer).weight
            new = (weight.float() + scale * mod.delta().to(weight.device)).to(weight.dtype)
            require_finite(new, f"add_to_pipeline: {comp}.{name} after merging at scale {scale}")
            merged.append((weight, new))
    if lora.tokens and load_tokens:
        apply_lora_tokens(pipe, lora)
    for weight, new in merged:
        weight.copy_(new)
    return len(merged)
