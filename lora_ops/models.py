"""Loading Stable Diffusion 1.x/2.x and SDXL pipelines and their components from a hub id, a local folder or a
one-file checkpoint.

An SDXL base is told apart by its folder (`model_index.json` names an SDXL pipeline, or a second text
encoder), by a one-file checkpoint's keys (a second text encoder, `conditioner.embedders.1.`) and by its UNet
(text-time additional embeddings); the same tasks load the SDXL pipelines.

One-file checkpoints (`.safetensors` / `.ckpt` in the original layout, as community models are shared) load
through diffusers' `from_single_file`. It takes the model's configs and tokenizer from `config` (a diffusers
folder or hub id of the same architecture); without one, diffusers infers the architecture and fetches its
configs from the hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

Task = Literal["text2img", "img2img", "inpaint"]
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


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


def is_single_file(model: str | Path) -> bool:
    """`model` is a one-file checkpoint (an existing `.safetensors` or `.ckpt` file)."""
    path = Path(str(model))
    return path.suffix in CHECKPOINT_SUFFIXES and path.is_file()


def _checkpoint_keys(path: Path) -> list[str]:
    """The tensor names of a one-file checkpoint (safetensors: without reading the tensors)."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"{path}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a pickle that needs code, or not a torch file at all
        raise ValueError(f"{path}: not a loadable checkpoint ({str(exc).splitlines()[0]})") from None
    return list(state.get("state_dict", state)) if isinstance(state, dict) else []


def _single_file_is_sdxl(path: Path) -> bool:
    keys = _checkpoint_keys(path)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise ValueError(
            f"{path}: not a one-file Stable Diffusion checkpoint (no `model.diffusion_model.*` weights); "
            f"first keys: {keys[:3]}. A LoRA or an embedding is loaded onto a base model, not as one"
        )
    return any(k.startswith("conditioner.embedders.1.") for k in keys)


def source_is_sdxl(model: str | Path, **kwargs: Any) -> bool:
    """Whether the folder, hub id or one-file checkpoint `model` holds an SDXL pipeline, from its
    model_index.json or its keys (no weights read)."""
    from diffusers import DiffusionPipeline

    if is_single_file(model):
        return _single_file_is_sdxl(Path(str(model)))
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
    if is_single_file(path):
        return model
    if path.suffix in CHECKPOINT_SUFFIXES and not path.exists():
        raise ValueError(f"{model}: no such checkpoint file")
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
    config: str | Path | None = None,
    **kwargs: Any,
):
    """A diffusers Stable Diffusion (or SDXL) pipeline for `task` from a hub id, a local diffusers folder or a
    one-file checkpoint (`.safetensors` / `.ckpt`).

    The safety checker is not loaded (pipelines here are for training and evaluation). An inpainting
    model (9-channel UNet) is required for task="inpaint".

    Args:
        config: for a one-file checkpoint: a diffusers folder or hub id of the same architecture, whose
            configs, tokenizers and scheduler the pipeline takes (diffusers' `from_single_file(config=)`);
            None: diffusers infers them (from the hub).
    """
    if task not in ("text2img", "img2img", "inpaint"):
        raise ValueError(f"task={task!r} is not one of ['img2img', 'inpaint', 'text2img']")
    source = _check_source(model)
    single = is_single_file(source)
    if config is not None and not single:
        raise ValueError(f"config={str(config)!r} is for one-file checkpoints; {source} is a model folder or hub id")
    hub_kwargs = {k: v for k, v in kwargs.items() if k in ("revision", "cache_dir", "local_files_only", "token")}
    sdxl = source_is_sdxl(source, **hub_kwargs)
    cls = _pipeline_classes(sdxl)[task]
    # diffusers renamed `torch_dtype` to `dtype` (and warns on the old name on every load); older ones know only it
    from diffusers.pipelines import pipeline_utils

    dtype_kw = {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}
    if not sdxl:  # SDXL pipelines have no safety checker
        kwargs = {"safety_checker": None, "requires_safety_checker": False, **kwargs}
    if single:
        pipe = _from_single_file(cls, source, config, {**dtype_kw, **kwargs})
    else:
        try:
            pipe = cls.from_pretrained(source, **dtype_kw, **kwargs)
        except OSError as exc:
            raise ValueError(f"could not load model {source!r}: {str(exc).splitlines()[0]}") from None
    info = describe(pipe, source)
    if task == "inpaint" and not info.inpainting:
        raise ValueError(f"{source}: task='inpaint' needs an inpainting model (9-channel UNet)")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _from_single_file(cls, source: str, config: str | Path | None, kwargs: dict):
    """`cls.from_single_file`, with errors that say what to pass."""
    if config is not None:
        config = str(config)
        if Path(config).exists():
            if not (Path(config) / "model_index.json").is_file():
                raise ValueError(f"config={config!r}: a folder, but not a diffusers model folder (no model_index.json)")
            kwargs = {"local_files_only": True, **kwargs}
        kwargs = {"config": config, **kwargs}
    try:
        return cls.from_single_file(source, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        hint = (
            "; the configs and tokenizer come from the hub unless you pass config= (--single_file_config): a "
            "diffusers folder or hub id of the same architecture"
            if config is None
            else f"; is config={config!r} of the same architecture?"
        )
        raise ValueError(f"could not load the checkpoint {source!r}: {str(exc).splitlines()[0]}{hint}") from None


def as_task(pipe, task: Task):
    """The same components (shared, not copied) as a pipeline for another task."""
    cls = _pipeline_classes(is_sdxl(pipe))[task]
    if isinstance(pipe, cls):
        return pipe
    out = cls(**pipe.components)
    out.set_progress_bar_config(disable=True)
    return out
