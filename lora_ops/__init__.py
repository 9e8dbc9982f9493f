"""lora_ops: LoRA for Stable Diffusion UNet and CLIP text encoder."""

from .images import make_grid, save_gif
from .inject import LoraConfig, extract_lora, inject_lora, load_adapter, lora_layers
from .lora_file import LoraFile, LoraModule, load_lora, read_safetensors, save_lora
from .models import ModelInfo, as_task, describe, load_pipeline
from .runtime import (
    adapter_names,
    enable_lora,
    fuse_lora,
    patch_pipeline,
    remove_lora,
    set_scales,
    unfuse_lora,
)
from .targets import PRESETS, preset_targets, resolve_targets
from .tiny import make_tiny_model
from .tokens import add_tokens, apply_token_embeddings, init_token_embeddings, parse_tokens, read_token_embeddings

__all__ = [
    "PRESETS",
    "LoraConfig",
    "LoraFile",
    "LoraModule",
    "ModelInfo",
    "adapter_names",
    "add_tokens",
    "apply_token_embeddings",
    "as_task",
    "describe",
    "enable_lora",
    "extract_lora",
    "fuse_lora",
    "init_token_embeddings",
    "inject_lora",
    "load_adapter",
    "load_lora",
    "load_pipeline",
    "lora_layers",
    "make_grid",
    "make_tiny_model",
    "parse_tokens",
    "patch_pipeline",
    "preset_targets",
    "read_safetensors",
    "read_token_embeddings",
    "remove_lora",
    "resolve_targets",
    "save_gif",
    "save_lora",
    "set_scales",
    "unfuse_lora",
]
