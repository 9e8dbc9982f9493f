"""Image generation with a base model plus zero or more LoRAs: text-to-image, image-to-image, inpainting."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import make_grid
from .lora_file import load_lora
from .models import as_task, load_pipeline
from .precision import torch_dtype
from .runtime import patch_pipeline

Task = Literal["text2img", "img2img", "inpaint"]


@dataclass
class LoraUse:
    """One LoRA to apply: file, UNet scale, text-encoder scale."""

    path: str
    unet_scale: float = 1.0
    text_encoder_scale: float = 1.0

    @classmethod
    def parse(cls, spec: str) -> LoraUse:
        """`file.safetensors`, `file.safetensors:0.8` or `file.safetensors:0.8:0.5` (unet:text_encoder)."""
        # a path may contain ':' itself; only trailing numeric fields are scales
        path, values = spec, []
        while len(values) < 2 and re.fullmatch(r".+:[-+]?[0-9.]+(e[-+]?[0-9]+)?", path, re.IGNORECASE):
            path, number = path.rsplit(":", 1)
            values.insert(0, float(number))
        unet = values[0] if values else 1.0
        text = values[1] if len(values) > 1 else unet
        return cls(path, unet, text)


@dataclass
class GenerateConfig:
    """What to generate.

    Args:
        model: base model (hub id, diffusers folder or one-file checkpoint `.safetensors` / `.ckpt`).
        prompts: one or more prompts.
        loras: LoRAs with their scales.
        task: "text2img", "img2img" (needs init_image) or "inpaint" (needs init_image, mask_image and an
            inpainting model).
        seeds: one image per prompt per seed.
        steps, guidance_scale, negative_prompt, height, width, strength: the usual diffusers arguments
            (strength for img2img/inpaint).
        device, dtype: where to run.
        model_config: for a one-file checkpoint: a diffusers folder or hub id of the same architecture (its
            configs and tokenizer); None: diffusers infers them from the hub.
    """

    model: str
    prompts: Sequence[str]
    loras: Sequence[LoraUse] = field(default_factory=list)
    task: Task = "text2img"
    init_image: str | None = None
    mask_image: str | None = None
    seeds: Sequence[int] = (0,)
    steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    strength: float = 0.75
    device: str = "cpu"
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    model_config: str | None = None

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("prompts: give at least one prompt")
        if self.task not in ("text2img", "img2img", "inpaint"):
            raise ValueError(f"task={self.task!r} is not one of text2img, img2img, inpaint")
        if self.task in ("img2img", "inpaint") and not self.init_image:
            raise ValueError(f"task={self.task!r} needs init_image")
        if self.task == "inpaint" and not self.mask_image:
            raise ValueError("task='inpaint' needs mask_image")
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} must be at least 1")
        if not math.isfinite(self.guidance_scale):
            raise ValueError(f"guidance_scale={self.guidance_scale} must be finite")
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength={self.strength} must be in (0, 1]")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")


def _open_image(path: str, mode: str) -> Image.Image:
    try:
        return Image.open(path).convert(mode)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not read image {path!r}: {exc}") from None


def generate(config: GenerateConfig, pipe=None) -> list[Image.Image]:
    """Generate one image per (prompt, seed), in that order. `pipe` reuses an already loaded pipeline."""
    if pipe is None:
        loras = [load_lora(use.path) for use in config.loras]  # a bad file fails before the model loads
        pipe = load_pipeline(
            config.model, device=config.device, dtype=torch_dtype(config.dtype), config=config.model_config
        )
        for i, (use, lora) in enumerate(zip(config.loras, loras)):
            patch_pipeline(pipe, lora, f"lora{i}", use.unet_scale, use.text_encoder_scale)
    pipe = as_task(pipe, config.task)
    kwargs = dict(num_inference_steps=config.steps, guidance_scale=config.guidance_scale)
    if config.negative_prompt:
        kwargs["negative_prompt"] = config.negative_prompt
    if config.task == "text2img":
        kwargs.update(height=config.height, width=config.width)
    else:
        init = _open_image(config.init_image, "RGB")
        if config.height and config.width:
            init = init.resize((config.width, config.height))
        kwargs.update(image=init, strength=config.strength)
        if config.task == "inpaint":
            kwargs.update(
                mask_image=_open_image(config.mask_image, "L").resize(init.size), height=init.height, width=init.width
            )
    images = []
    jobs = [(p, s) for p in config.prompts for s in config.seeds]
    for prompt, seed in tqdm(jobs, desc="generate", disable=len(jobs) < 2):
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images.append(pipe(prompt, generator=generator, **kwargs).images[0])
    return images


def save_images(images: Sequence[Image.Image], config: GenerateConfig, out_dir: str | Path) -> tuple[list[Path], Path]:
    """Write `<i>_<prompt-slug>_s<seed>.png` files and `grid.png` (rows: prompts, columns: seeds)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    jobs = [(p, s) for p in config.prompts for s in config.seeds]
    for i, (image, (prompt, seed)) in enumerate(zip(images, jobs)):
        slug = re.sub(r"[^a-zA-Z0-9]+", "-", prompt).strip("-")[:40] or "prompt"
        path = out_dir / f"{i:03d}_{slug}_s{seed}.png"
        image.save(path)
        paths.append(path)
    grid = make_grid(images, cols=len(config.seeds), row_labels=None, col_labels=[f"seed {s}" for s in config.seeds])
    grid_path = out_dir / "grid.png"
    grid.save(grid_path)
    return paths, grid_path
