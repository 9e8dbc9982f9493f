"""Loading Stable Diffusion 1.x/2.x pipelines and their components from a hub id or a local folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

Task = Literal["text2img", "img2img", "inpaint"]


@dataclass
class ModelInfo:
    """What a loaded base model is: family, prediction type, inpainting or not."""

    name: str
    family: Literal["sd1", "sd2", "unknown"]
    prediction_type: str
    inpainting: bool
    cross_attention_dim: int


def describe(pipe_or_unet, name: str = "") -> ModelInfo:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    family = {768: "sd1", 1024: "sd2"}.get(cross, "unknown")
    scheduler = getattr(pipe_or_unet, "scheduler", None)
    prediction = scheduler.config.get("prediction_type", "epsilon") if scheduler is not None else "epsilon"
    return ModelInfo(name, family, prediction, unet.config.in_channels == 9, cross)


def _check_source(model: str | Path) -> str:
    model = str(model)
    path = Path(model)
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"{model}: a folder, but not a diffusers model folder (no model_index.json)")
    elif model.count("/") != 1 or model.startswith(("/", ".")):
        raise ValueError(f"{model}: no such folder, and not a hub id of the form 'org/name'")
    return model


def load_pipeline(
    model: str | Path,
    task: Task = "text2img",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    **kwargs: Any,
):
    """A diffusers Stable Diffusion pipeline for `task` from a hub id or a local diffusers folder.

    The safety checker is not loaded (pipelines here are for training and evaluation). An inpainting
    model (9-channel UNet) is required for task="inpaint".
    """
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    source = _check_source(model)
    classes = {
        "text2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }
    if task not in classes:
        raise ValueError(f"task={task!r} is not one of {sorted(classes)}")
    # diffusers renamed `torch_dtype` to `dtype` (and warns on the old name on every load); older ones know only it
    from diffusers.pipelines import pipeline_utils

    dtype_kw = {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}
    try:
        pipe = classes[task].from_pretrained(
            source, safety_checker=None, requires_safety_checker=False, **dtype_kw, **kwargs
        )
    except OSError as exc:
        raise ValueError(f"could not load model {source!r}: {str(exc).splitlines()[0]}") from None
    info = describe(pipe, source)
    if task == "inpaint" and not info.inpainting:
        raise ValueError(f"{source}: task='inpaint' needs an inpainting model (9-channel UNet)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def as_task(pipe, task: Task):
    """The same components (shared, not copied) as a pipeline for another task."""
    from diffusers import (
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )

    cls = {
        "text2img": StableDiffusionPipeline,
        "img2img": StableDiffusionImg2ImgPipeline,
        "inpaint": StableDiffusionInpaintPipeline,
    }[task]
    if isinstance(pipe, cls):
        return pipe
    out = cls(**pipe.components)
    out.set_progress_bar_config(disable=True)
    return out
