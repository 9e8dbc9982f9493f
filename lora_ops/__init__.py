"""lora_ops: LoRA for Stable Diffusion UNet and CLIP text encoder.

Injection and runtime patching, pivotal tuning and DreamBooth training, exact merging, SVD distillation
and resizing, format conversion, dataset preprocessing and evaluation.
"""

from .diffusers_export import export_diffusers
from .distill import DistillConfig, distill
from .dreambooth import train_dreambooth
from .evaluate import EvaluateConfig, EvaluationResult, evaluate_loras, select_best
from .formats import detect_format, read_any, write_any
from .generate import GenerateConfig, LoraUse, generate
from .images import make_grid, save_gif
from .inject import LoraConfig, extract_lora, inject_lora, load_adapter, lora_layers
from .lora_file import LoraFile, LoraModule, load_lora, read_safetensors, save_lora
from .merge import add_to_pipeline, join_loras, load_joined, merge_loras
from .models import ModelInfo, as_task, describe, load_pipeline
from .preprocess import PreprocessConfig, PreprocessResult, preprocess_dataset
from .resize import ResizeConfig, resize_lora
from .runtime import (
    adapter_names,
    enable_lora,
    fuse_lora,
    patch_pipeline,
    remove_lora,
    set_scales,
    unfuse_lora,
)
from .single_file import save_single_file
from .targets import PRESETS, preset_targets, resolve_targets
from .tiny import make_tiny_model
from .tiny_vision import make_tiny_preprocess_models
from .tokens import add_tokens, apply_token_embeddings, init_token_embeddings, parse_tokens, read_token_embeddings
from .train import run_inversion, run_tuning, train_pti
from .train_config import DreamBoothConfig, PTIConfig
from .train_loop import TrainResult

__all__ = [
    "PRESETS",
    "DistillConfig",
    "DreamBoothConfig",
    "EvaluateConfig",
    "EvaluationResult",
    "GenerateConfig",
    "LoraConfig",
    "LoraFile",
    "LoraModule",
    "LoraUse",
    "ModelInfo",
    "PTIConfig",
    "PreprocessConfig",
    "PreprocessResult",
    "ResizeConfig",
    "TrainResult",
    "adapter_names",
    "add_to_pipeline",
    "add_tokens",
    "apply_token_embeddings",
    "as_task",
    "describe",
    "detect_format",
    "distill",
    "enable_lora",
    "evaluate_loras",
    "export_diffusers",
    "extract_lora",
    "fuse_lora",
    "generate",
    "init_token_embeddings",
    "inject_lora",
    "join_loras",
    "load_adapter",
    "load_joined",
    "load_lora",
    "load_pipeline",
    "lora_layers",
    "make_grid",
    "make_tiny_model",
    "make_tiny_preprocess_models",
    "merge_loras",
    "parse_tokens",
    "patch_pipeline",
    "preprocess_dataset",
    "preset_targets",
    "read_any",
    "read_safetensors",
    "read_token_embeddings",
    "remove_lora",
    "resize_lora",
    "resolve_targets",
    "run_inversion",
    "run_tuning",
    "save_gif",
    "save_lora",
    "save_single_file",
    "select_best",
    "set_scales",
    "train_dreambooth",
    "train_pti",
    "unfuse_lora",
    "write_any",
]
