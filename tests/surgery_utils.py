"""Helpers shared by the model-surgery tests: random LoRAs on a model's targets, tiny-pipeline images."""

from __future__ import annotations

import torch
from torch import nn

from lora_ops.lora_file import LoraFile, LoraModule
from lora_ops.targets import canonical_name, preset_targets

PROMPT = "a photo of <s1><s2> on the beach"


def random_module(layer: nn.Module, r: int, gen: torch.Generator, scale: float = 0.05) -> LoraModule:
    """Random non-zero factors that fit `layer` (Linear or Conv2d)."""
    if isinstance(layer, nn.Conv2d):
        a = torch.randn(r, layer.in_channels, *layer.kernel_size, generator=gen)
        b = torch.randn(layer.out_channels, r, 1, 1, generator=gen)
    else:
        a = torch.randn(r, layer.in_features, generator=gen)
        b = torch.randn(layer.out_features, r, generator=gen)
    return LoraModule(a * scale, b * scale)


def random_lora(
    pipe,
    seed: int = 0,
    r: int = 4,
    unet: str | None = "unet",
    text: bool = True,
    tokens: bool = True,
    every: int = 1,
) -> LoraFile:
    """A LoRA with random factors on the preset targets (every `every`-th module), optionally tokens."""
    gen = torch.Generator().manual_seed(seed)
    lora = LoraFile(metadata={"base_model": "tiny"})
    second = getattr(pipe, "text_encoder_2", None) if not isinstance(pipe, dict) else pipe.get("text_encoder_2")
    presets = [("unet", unet), ("text_encoder", "text_encoder" if text else None)]
    presets.append(("text_encoder_2", "text_encoder" if text and second is not None else None))  # SDXL
    for comp, preset in presets:
        if preset is None:
            continue
        model = getattr(pipe, comp) if not isinstance(pipe, dict) else pipe[comp]
        for name in preset_targets(model, preset)[::every]:
            lora.component(comp)[canonical_name(comp, name)] = random_module(model.get_submodule(name), r, gen)
    if tokens:
        model = pipe.text_encoder if not isinstance(pipe, dict) else pipe["text_encoder"]
        dim = model.get_input_embeddings().weight.shape[1]
        lora.tokens = {t: torch.randn(dim, generator=gen) for t in ("<s1>", "<s2>")}
        if second is not None:  # SDXL: each token's row in the second text encoder too
            dim_2 = second.get_input_embeddings().weight.shape[1]
            lora.tokens_2 = {t: torch.randn(dim_2, generator=gen) for t in lora.tokens}
    return lora


def run_pipe(pipe, prompt: str = PROMPT, steps: int = 1):
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=steps, height=32, width=32, output_type="np", generator=g).images
