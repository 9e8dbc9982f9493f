"""Loading Stable Diffusion 1.x/2.x and SDXL pipelines and their components from a hub id or a local folder.

An SDXL base is told apart by its folder (`model_index.json` names an SDXL pipeline, or a second text
encoder) and by its UNet (text-time additional embeddings); the same tasks load the SDXL pipelines.
"""

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
    family: Literal["sd1", "sd2", "sdxl", "unknown"]
    prediction_type: str
    inpainting: bool
    cross_attention_dim: int


def describe(pipe_or_unet, name: str = "") -> ModelInfo:
    unet = getattr(pipe_or_unet, "unet", pipe_or_unet)
    cross = unet.config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (list, tuple)) else cross
    if is_sdxl_unet(unet):
        family = "sdxl"
    else:
        family = {768: "sd1", 1024: "sd2"}.get(cross, "unknown")
    scheduler = getattr(pipe_or_unet, "scheduler", None)
    prediction = scheduler.config.get("prediction_type", "epsilon") if scheduler is not None else "epsilon"
    return ModelInfo(name, family, prediction, unet.config.in_channels == 9, cross)


def is_sdxl_unet(unet) -> bool:
    """An SDXL UNet: conditioned on pooled text embeddings and size/crop numbers (text-time embeddings)."""
    return getattr(unet, "config", {}).get("addition_embed_type") == "text_time"


def is_sdxl(pipe) -> bool:
    """A pipeline (or anything with the components) of an SDXL model: two text encoders, a text-time UNet."""
    return getattr(pipe, "text_encoder_2", None) is not None and is_sdxl_unet(pipe.unet)


def components(pipe) -> dict[str, torch.nn.Module]:
    """The models LoRA can patch, by component name: unet, text_encoder, and text_encoder_2 (SDXL)."""
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        models["text_encoder_2"] = pipe.text_encoder_2
    return models


def source_is_sdxl(model: str | Path, **kwargs: Any) -> bool:
    """Whether the folder or hub id `model` holds an SDXL pipeline, from its model_index.json (no weights read)."""
    from diffusers import DiffusionPipeline

    source = _check_source(model)
    try:
        index = DiffusionPipeline.load_config(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load model {source!r}: {str(exc).splitlines()[0]}") from None
    return "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index


def _pipeline_classes(sdxl: bool) -> dict[str, type]:
    import diffusers

    names = {
        "text2img": "StableDiffusion{}Pipeline",
        "img2img": "StableDiffusion{}Img2ImgPipeline",
        "inpaint": "StableDiffusion{}InpaintPipeline",
    }
    return {task: getattr(diffusers, name.format("XL" if sdxl else "")) for task, name in names.items()}


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
    """A diffusers Stable Diffusion (or SDXL) pipeline for `task` from a hub id or a local diffusers folder.

    The safety checker is not loaded (pipelines here are for training and evaluation). An inpainting
    model (9-channel UNet) is required for task="inpaint".
    """
    if task not in ("text2img", "img2img", "inpaint"):
        raise ValueError(f"task={task!r} is not one of ['img2img', 'inpaint', 'text2img']")
    source = _check_source(model)
    hub_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "local_files_only", "token")}
    sdxl = source_is_sdxl(source, **hub_kwargs)
    cls = _pipeline_classes(sdxl)[task]
    # diffusers renamed `torch_dtype` to `dtype` (and warns on the old name on every load); older ones know only it
    from diffusers.pipelines import pipeline_utils

    dtype_kw = {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}
    if not sdxl:  # SDXL pipelines have no safety checker
        kwargs = {"safety_checker": None, "requires_safety_checker": False, **kwargs}
    try:
        pipe = cls.from_pretrained(source, **dtype_kw, **kwargs)
    except OSError as exc:
        raise ValueError(f"could not load model {source!r}: {str(exc).splitlines()[0]}") from None
    info = describe(pipe, source)
    if task == "inpaint" and not info.inpainting:
        raise ValueError(f"{source}: task='inpaint' needs an inpainting model (9-channel UNet)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def as_task(pipe, task: Task):
    """The same components (shared, not copied) as a pipeline for another task."""
    cls = _pipeline_classes(is_sdxl(pipe))[task]
    if isinstance(pipe, cls):
        return pipe
    out = cls(**pipe.components)
    out.set_progress_bar_config(disable=True)
    return out
