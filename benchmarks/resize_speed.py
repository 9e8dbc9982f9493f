"""Resize speed: an SD 1.5-shaped rank-128 LoRA on every seed target (UNet attention + GEGLU, text-encoder
attention: the modules of the published lora_diffusion example) re-ranked to 8. Prints the seconds.

    .venv/bin/python benchmarks/resize_speed.py [--rank-in 128] [--rank-out 8] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from lora_ops.lora_file import LoraFile, LoraModule
from lora_ops.resize import ResizeConfig, resize_lora
from lora_ops.targets import canonical_name, preset_targets
from lora_ops.tiny import _ARCH_CONFIGS


def sd15_lora(rank: int) -> LoraFile:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = _ARCH_CONFIGS["sd15"]
    with torch.device("meta"):  # names and shapes only
        models = {
            "unet": UNet2DConditionModel(**cfg["unet"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**cfg["text"])),
        }
    g = torch.Generator().manual_seed(0)
    lora = LoraFile()
    for comp, preset in (("unet", "unet"), ("text_encoder", "text_encoder")):
        for name in preset_targets(models[comp], preset):
            layer = models[comp].get_submodule(name)
            a = torch.randn(rank, layer.in_features, generator=g) * 0.01
            b = torch.randn(layer.out_features, rank, generator=g) * 0.01
            lora.component(comp)[canonical_name(comp, name)] = LoraModule(a, b)
    return lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank-in", type=int, default=128)
    parser.add_argument("--rank-out", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lora = sd15_lora(args.rank_in)
    start = time.perf_counter()
    _, report = resize_lora(lora, ResizeConfig(mode="rank", rank=args.rank_out), progress=False)
    seconds = time.perf_counter() - start
    n = len(lora.unet) + len(lora.text_encoder)
    print(
        f"resize {n} modules rank {args.rank_in} -> {args.rank_out} on {args.threads} threads: {seconds:.2f} s "
        f"(kept energy {report.energy:.4f})"
    )


if __name__ == "__main__":
    main()
