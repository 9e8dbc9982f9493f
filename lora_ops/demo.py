"""The library end to end on the tiny model: build, inject LoRA, save, reload, and sweep the LoRA scale.

    python -m lora_ops.demo --out out/demo

Writes `alpha_grid.png` (one prompt at LoRA scales 0, 0.25, 0.5, 0.75, 1.0) and `alpha_sweep.gif`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .images import make_grid, save_gif
from .inject import LoraConfig, extract_lora, inject_lora
from .lora_file import LoraFile, load_lora, save_lora
from .models import load_pipeline
from .runtime import patch_pipeline, set_scales
from .tiny import make_tiny_model
from .tokens import add_tokens, init_token_embeddings, read_token_embeddings

SCALES = (0.0, 0.25, 0.5, 0.75, 1.0)
PROMPT = "a photo of <s1><s2> on the beach"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/demo", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    start = time.perf_counter()

    print("1/4 building the tiny model (random weights, offline)")
    model_dir = make_tiny_model(out / "tiny-model", arch="tiny", seed=args.seed)

    print("2/4 injecting LoRA (UNet + text encoder) and learned tokens <s1> <s2>")
    pipe = load_pipeline(model_dir)
    torch.manual_seed(args.seed)
    inject_lora(pipe.unet, LoraConfig(target_modules="unet", r=4, init="random"))
    inject_lora(pipe.text_encoder, LoraConfig(target_modules="text_encoder", r=4, init="random"))
    tokens = ["<s1>", "<s2>"]
    add_tokens(pipe.tokenizer, pipe.text_encoder, tokens)
    init_token_embeddings(pipe.tokenizer, pipe.text_encoder, tokens, initializer=None)
    lora = LoraFile(
        unet=extract_lora(pipe.unet, "unet"),
        text_encoder=extract_lora(pipe.text_encoder, "text_encoder"),
        tokens=read_token_embeddings(pipe.tokenizer, pipe.text_encoder, tokens),
        metadata={"base_model": str(model_dir), "targets": {"unet": "unet", "text_encoder": "text_encoder"}},
    )
    path = save_lora(out / "demo_lora.safetensors", lora)
    print(f"    saved {path} ({path.stat().st_size / 1024:.1f} KiB)")

    print("3/4 loading it back into a fresh pipeline")
    fresh = load_pipeline(model_dir)
    patch_pipeline(fresh, load_lora(path))

    print(f"4/4 sweeping the LoRA scale {SCALES} on {PROMPT!r}")
    frames = []
    for scale in SCALES:
        set_scales(fresh, unet=scale, text_encoder=scale)
        generator = torch.Generator().manual_seed(args.seed)
        image = fresh(PROMPT, num_inference_steps=10, height=64, width=64, generator=generator).images[0]
        frames.append(image)
    grid = make_grid(frames, cols=len(SCALES), col_labels=[f"scale {s}" for s in SCALES], cell=128)
    grid_path = out / "alpha_grid.png"
    grid.save(grid_path)
    gif_path = save_gif(frames, out / "alpha_sweep.gif", size=128)
    print(f"done in {time.perf_counter() - start:.1f}s")
    print(f"grid: {grid_path.resolve()}")
    print(f"gif:  {gif_path.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
