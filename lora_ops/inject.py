"""Trainable LoRA adapters on a UNet or CLIP text encoder, built on peft.

`inject_lora` adds an adapter (peft `LoraLayer`s) to the targeted modules and returns the trainable
parameters; `extract_lora` reads an adapter back as `LoraModule`s with the scale folded in.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import peft
import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .lora_file import LoraModule
from .targets import canonical_name, get_module, live_name, pattern_value, resolve_targets

Init = Literal["gaussian", "kaiming", "random"]
_PEFT_INIT = {"gaussian": "gaussian", "kaiming": True, "random": False}


@dataclass
class LoraConfig:
    """How to add LoRA to one model.

    Args:
        target_modules: a preset ("unet", "unet-extended", "text_encoder") or a list of module names/regexes.
        r: rank.
        lora_alpha: scale numerator (ΔW = alpha / r · B A); None means alpha = r (scale 1, as the
            original lora_diffusion project).
        rank_pattern: per-module rank overrides, {module name or regex: r}.
        alpha_pattern: per-module alpha overrides.
        lora_dropout: dropout on the LoRA branch input.
        init: "gaussian" (A ~ N(0, 1/r), as lora_diffusion), "kaiming" (peft default) or "random"
            (B non-zero too: the adapter changes the output from the start; for tests).
    """

    target_modules: str | Sequence[str] = "unet"
    r: int = 4
    lora_alpha: float | None = None
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    lora_dropout: float = 0.0
    init: Init = "gaussian"

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r={self.r!r} must be a positive integer")
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora_alpha={self.lora_alpha!r} must be a positive finite number")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} must be in [0, 1)")
        if self.init not in _PEFT_INIT:
            raise ValueError(f"init={self.init!r} is not one of {sorted(_PEFT_INIT)}")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"rank_pattern[{key!r}]={value!r} must be a positive integer")


def _layer_dims(module: nn.Module) -> tuple[int, int]:
    """(in, out) of a Linear or Conv2d, with in counting the kernel (the max rank of its ΔW)."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * kh * kw // module.groups, module.out_channels
    return module.in_features, module.out_features


def inject_lora(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> list[nn.Parameter]:
    """Add a LoRA adapter to `model` in place; freeze everything else; return the adapter's parameters.

    Raises ValueError if a target matches nothing or a rank exceeds min(in, out) of its layer.
    """
    names = resolve_targets(model, config.target_modules)
    if not names:
        raise ValueError(f"target_modules={config.target_modules!r} matched no module of {type(model).__name__}")
    alpha = config.lora_alpha if config.lora_alpha is not None else config.r
    ranks, alphas = {}, {}
    for name in names:
        module = model.get_submodule(name)
        base = getattr(module, "base_layer", module)
        r = pattern_value(name, config.rank_pattern, config.r)
        fan_in, fan_out = _layer_dims(base)
        if r > min(fan_in, fan_out):
            raise ValueError(f"rank {r} for {name} exceeds min(in, out) = min({fan_in}, {fan_out})")
        ranks[name] = r
        # alpha defaults to the module's own rank, so that scale = 1 everywhere unless asked otherwise
        alphas[name] = pattern_value(name, config.alpha_pattern, alpha if config.lora_alpha is not None else r)
    peft_config = peft.LoraConfig(
        r=config.r,
        lora_alpha=alpha,
        target_modules=names,
        # anchored, escaped full names: peft matches pattern keys as `(.*\.)?(key)$`
        rank_pattern={f"^{re.escape(n)}$": r for n, r in ranks.items()},
        alpha_pattern={f"^{re.escape(n)}$": a for n, a in alphas.items()},
        lora_dropout=config.lora_dropout,
        init_lora_weights=_PEFT_INIT[config.init],
    )
    was_training = model.training
    model.requires_grad_(False)
    with warnings.catch_warnings():
        # several named adapters in one model are intended here (one per loaded LoRA file)
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        peft.inject_adapter_in_model(peft_config, model, adapter_name=adapter_name)
    model.train(was_training)
    params = []
    for name in names:
        layer = model.get_submodule(name)
        for part in (layer.lora_A[adapter_name], layer.lora_B[adapter_name]):
            for p in part.parameters():
                p.requires_grad_(True)
                params.append(p)
    return params


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Every peft LoRA layer of `model`, by module name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _scale(layer: LoraLayer, adapter: str) -> float:
    """alpha / r (or alpha / sqrt(r)): the scale of the adapter as trained, not the runtime multiplier."""
    if layer.use_rslora.get(adapter, False):
        return layer.lora_alpha[adapter] / math.sqrt(layer.r[adapter])
    return layer.lora_alpha[adapter] / layer.r[adapter]


def extract_lora(model: nn.Module, component: str, adapter_name: str = "default") -> dict[str, LoraModule]:
    """The adapter's weights as canonical-name -> LoraModule (float32, CPU, alpha/r folded into lora_B)."""
    out = {}
    for name, layer in lora_layers(model).items():
        if adapter_name not in layer.lora_A:
            continue
        a = layer.lora_A[adapter_name].weight.detach().float().cpu().clone()
        b = layer.lora_B[adapter_name].weight.detach().float().cpu() * _scale(layer, adapter_name)
        out[canonical_name(component, name)] = LoraModule(a, b.clone())
    return out


def check_adapter(
    model: nn.Module, modules: Mapping[str, LoraModule], adapter_name: str = "default", component: str = "model"
) -> None:
    """Raise ValueError if `modules` cannot be loaded into `model` as `adapter_name`; changes nothing.

    Names the first module the model lacks, or the first whose shapes differ (with both shapes).
    """
    for name, mod in modules.items():
        layer = get_module(model, name)
        if layer is None:
            raise ValueError(f"{component} has no module {name!r}: this LoRA was made for another architecture")
        base = getattr(layer, "base_layer", layer)
        if isinstance(base, nn.Conv2d):
            want_a = (mod.r, base.in_channels // base.groups, *base.kernel_size)
            want_b = (base.out_channels, mod.r, 1, 1)
        elif isinstance(base, nn.Linear):
            want_a, want_b = (mod.r, base.in_features), (base.out_features, mod.r)
        else:
            raise ValueError(f"{component}.{name} is a {type(base).__name__}; LoRA needs Linear or Conv2d")
        if tuple(mod.lora_A.shape) != want_a or tuple(mod.lora_B.shape) != want_b:
            raise ValueError(
                f"{component}.{name}: LoRA shapes lora_A {tuple(mod.lora_A.shape)}, lora_B "
                f"{tuple(mod.lora_B.shape)} do not fit the model's layer (needs {want_a}, {want_b}): "
                "this LoRA was made for another architecture"
            )
        if layer is not base and adapter_name in layer.lora_A:
            raise ValueError(f"adapter {adapter_name!r} is already loaded; remove it first or pick another name")


def load_adapter(
    model: nn.Module, modules: Mapping[str, LoraModule], adapter_name: str = "default", component: str = "model"
) -> None:
    """Inject an adapter shaped like `modules` (alpha = r per module) and copy the weights in.

    Checks every module before changing anything: a name the model lacks or a shape that differs is a
    ValueError naming the first mismatching module and both shapes.
    """
    check_adapter(model, modules, adapter_name, component)
    if not modules:
        return
    live = {live_name(model, n): m for n, m in modules.items()}
    config = LoraConfig(
        target_modules=list(live),
        r=max(m.r for m in live.values()),
        rank_pattern={n: m.r for n, m in live.items()},
        init="kaiming",
    )
    training = model.training
    inject_lora(model, config, adapter_name)
    model.requires_grad_(False)
    model.train(training)
    with torch.no_grad():
        for name, mod in live.items():
            layer = model.get_submodule(name)
            a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
            a.copy_(mod.lora_A.to(a.dtype))
            b.copy_(mod.lora_B.to(b.dtype))
