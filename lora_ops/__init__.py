"""lora_ops: LoRA for Stable Diffusion UNet and CLIP text encoder.

Injection and runtime patching, pivotal tuning and DreamBooth training, exact merging, SVD distillation
and resizing, format conversion, dataset preprocessing and evaluation.
"""

# Names are imported on first use (PEP 562), so that `import lora_ops` and `lora-ops --help` stay fast:
# torch, diffusers and transformers load only when something that needs them is used.
import importlib as _importlib

from .quiet import quiet_known_warnings as _quiet

_quiet()  # a logging filter only (no imports): library users and the steps see no known noise either

_EXPORTS = {
    "export_diffusers": "diffusers_export",
    "DistillConfig": "distill",
    "distill": "distill",
    "train_dreambooth": "training.dreambooth",
    "EvaluateConfig": "evaluate",
    "EvaluationResult": "evaluate",
    "evaluate_loras": "evaluate",
    "select_best": "evaluate",
    "detect_format": "formats",
    "read_any": "formats",
    "write_any": "formats",
    "GenerateConfig": "generate",
    "LoraUse": "generate",
    "generate": "generate",
    "make_grid": "images",
    "save_gif": "images",
    "LoraConfig": "inject",
    "extract_lora": "inject",
    "inject_lora": "inject",
    "load_adapter": "inject",
    "lora_layers": "inject",
    "LoraFile": "lora_file",
    "LoraModule": "lora_file",
    "load_lora": "lora_file",
    "read_safetensors": "lora_file",
    "save_lora": "lora_file",
    "add_to_pipeline": "merge",
    "join_loras": "merge",
    "load_joined": "merge",
    "merge_loras": "merge",
    "ModelInfo": "models",
    "as_task": "models",
    "describe": "models",
    "load_pipeline": "models",
    "PreprocessConfig": "preprocess",
    "PreprocessResult": "preprocess",
    "preprocess_dataset": "preprocess",
    "ResizeConfig": "resize",
    "resize_lora": "resize",
    "adapter_names": "runtime",
    "enable_lora": "runtime",
    "fuse_lora": "runtime",
    "patch_pipeline": "runtime",
    "remove_lora": "runtime",
    "set_scales": "runtime",
    "unfuse_lora": "runtime",
    "save_single_file": "single_file",
    "PRESETS": "targets",
    "preset_targets": "targets",
    "resolve_targets": "targets",
    "add_tokens": "tokens",
    "apply_token_embeddings": "tokens",
    "init_token_embeddings": "tokens",
    "parse_tokens": "tokens",
    "read_token_embeddings": "tokens",
    "run_inversion": "training.pti",
    "run_tuning": "training.pti",
    "train_pti": "training.pti",
    "DreamBoothConfig": "training.config",
    "PTIConfig": "training.config",
    "TrainResult": "training.loop",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(_importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    try:
        return _importlib.import_module(f".{name}", __name__)  # a submodule, e.g. lora_ops.shapes
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


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
