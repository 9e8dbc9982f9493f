"""Pretrain the shapes world: a Stable Diffusion (VAE, UNet, CLIP text encoder) and its scorers.

    lora-ops shapes pretrain --out DIR [--seed 0] [--steps-scale 1.0]

One seeded command trains, in order (each with a progress bar):
1. the VAE (AutoencoderKL) on fresh renders of every concept (a VAE that never saw a colour cannot draw it);
2. the evaluator (CNN: shape incl. "none", colour, style) on fresh renders of every concept, half of them
   decoded from perturbed VAE latents so that it knows what generated images look like;
3. the UNet and the CLIP text encoder together, from scratch, on the *known* concepts only (cached
   latents; captions "a red circle", 20% "a circle" without the colour and 10% empty for classifier-free
   guidance; min-SNR-5 weighting; EMA of the UNet);
4. a small CLIP (CLIPModel, contrastive image -> caption) for CLIP-T and CLIP-I;
5. a ViT (ViTModel, supervised on shape/colour/style) for the DINO slot;
then checks each against fresh renders and writes `manifest.json` (files with sha256, the command,
versions, wall times, check results) last.

The output is `DIR/sd` (a diffusers StableDiffusionPipeline folder), `DIR/clip`, `DIR/dino`,
`DIR/evaluator`. The shipped copy is `lora_ops/shapes/pretrained/`.

One module per model: `vae`, `judge` (the evaluator), `unet` (UNet + text encoder), `clip`, `dino`; `config`
and `data` are shared.
"""

from __future__ import annotations

import json
import platform
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from ...hashing import sha256_file
from ..evaluator import ShapesEvaluator
from ..world import ALL_SHAPES, COLOURS, STYLES, caption, known_specs
from .clip import check_clip, train_clip
from .config import COMPONENTS, PretrainConfig
from .dino import train_dino
from .judge import check_evaluator, train_evaluator
from .unet import make_tokenizer, save_pipeline, train_unet
from .vae import train_vae

__all__ = ["COMPONENTS", "PretrainConfig", "check_clip", "check_evaluator", "pretrain"]


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def pretrain(config: PretrainConfig, command: str = "") -> Path:
    """Train the models of the shapes world into `config.output_dir`; returns the folder.

    `command` is recorded in the manifest (the command line that reproduces the run). Components not in
    `config.components` are copied from the existing output. Everything is written to a staging folder
    and moved into place at the end, manifest last.
    """
    from ..quality import base_accuracy

    cfg = config
    t_start = time.monotonic()
    out = cfg.output_dir
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    previous = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    times: dict[str, float] = dict(previous.get("wall_seconds", {}))
    times.pop("total", None)

    def seeded(name: str):
        """Each component's own generators, so that components can be rebuilt one at a time."""
        k = COMPONENTS.index(name)
        torch.manual_seed(cfg.seed * 1000 + k)
        return np.random.default_rng([cfg.seed, k]), torch.Generator().manual_seed(cfg.seed * 1000 + k)

    def build(name: str, fn, *args):
        t0 = time.monotonic()
        result = fn(*args, *seeded(name))
        times[name] = round(time.monotonic() - t0, 1)
        return result

    def reuse(*parts: str) -> None:
        for part in parts:
            shutil.copytree(out / part, staging / part)

    try:
        tokenizer = make_tokenizer(staging / ".tokenizer")
        if "vae" in cfg.components:
            vae = build("vae", train_vae, cfg)
        else:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(out / "sd" / "vae")
        if "evaluator" in cfg.components:
            build("evaluator", train_evaluator, cfg, vae).save_pretrained(staging / "evaluator")
        else:
            reuse("evaluator")
        if "unet" in cfg.components:
            unet, text_encoder = build("unet", train_unet, cfg, vae, tokenizer)
            save_pipeline(staging / "sd", vae, unet, text_encoder, tokenizer)
        else:
            reuse("sd")
        if "clip" in cfg.components:
            clip, processor = build("clip", train_clip, cfg, tokenizer)
            clip.save_pretrained(staging / "clip")
            processor.save_pretrained(staging / "clip")
        else:
            reuse("clip")
        if "dino" in cfg.components:
            vit, vit_processor = build("dino", train_dino, cfg)
            vit.save_pretrained(staging / "dino")
            vit_processor.save_pretrained(staging / "dino")
        else:
            reuse("dino")
        shutil.rmtree(staging / ".tokenizer")

        evaluator = ShapesEvaluator.from_pretrained(staging / "evaluator")
        n_seeds = max(1, cfg.check_images // 25)
        checks = {
            "evaluator": check_evaluator(evaluator, cfg.check_images, seed=cfg.seed + 7),
            "clip": check_clip(staging / "clip", cfg.check_images, seed=cfg.seed + 8),
            "base": base_accuracy(staging / "sd", staging / "evaluator", seeds=range(n_seeds)),
        }
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {
            "name": "shapes-world",
            "command": command,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "output_dir"},
            "versions": _versions(),
            "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
            "rebuilt": list(cfg.components),
            "wall_seconds": {**times, "this_run": round(time.monotonic() - t_start, 1)},
            "checks": checks,
            "concepts": {
                "shapes": list(ALL_SHAPES),
                "colours": list(COLOURS),
                "styles": list(STYLES),
                "known": [caption(s) for s in known_specs()],
            },
            "files": [
                {"path": p.relative_to(staging).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
                for p in files
            ],
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks completion
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
