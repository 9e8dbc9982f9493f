"""File sizes of native LoRA files for SD 1.5 (UNet attention + GEGLU, CLIP attention, two tokens).

    python benchmarks/lora_sizes.py [--ranks 1 4 16]

Builds the SD 1.5 shapes on the meta device (no weights), fills LoRA factors of each rank with random
values, saves fp32 and fp16 files and prints their sizes.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from lora_ops import LoraFile, LoraModule, preset_targets, save_lora
from lora_ops.targets import canonical_name
from lora_ops.tiny import build_models


def lora_for(unet, text_encoder, r: int) -> LoraFile:
    lora = LoraFile(tokens={"<s1>": torch.randn(768), "<s2>": torch.randn(768)})
    for component, model, preset in (("unet", unet, "unet"), ("text_encoder", text_encoder, "text_encoder")):
        for name in preset_targets(model, preset):
            layer = model.get_submodule(name)
            mod = LoraModule(torch.randn(r, layer.in_features), torch.randn(layer.out_features, r))
            lora.component(component)[canonical_name(component, name)] = mod
    return lora


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    with torch.device("meta"):
        models = build_models("sd15")
        unet, text_encoder = models["unet"], models["text_encoder"]
    print("| rank | modules (UNet + text encoder) | fp32 | fp16 |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for r in args.ranks:
            lora = lora_for(unet, text_encoder, r)
            sizes = {}
            for dtype in ("fp32", "fp16"):
                path = save_lora(Path(tmp) / f"r{r}-{dtype}.safetensors", lora, dtype=dtype)
                sizes[dtype] = path.stat().st_size / 1e6
            n = f"{len(lora.unet)} + {len(lora.text_encoder)}"
            print(f"| {r} | {n} | {sizes['fp32']:.2f} MB | {sizes['fp16']:.2f} MB |")


if __name__ == "__main__":
    main()
