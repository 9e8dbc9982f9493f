"""Training: pivotal tuning (textual inversion, then LoRA) and DreamBooth LoRA, one concept per module.

- `config`: the options of every trainer (`TrainConfig`, `PTIConfig`, `DreamBoothConfig`; runtime options
  are the ones that may change on resume);
- `trainee`: the base model loaded for training, and how pixels and prompts become UNet inputs;
- `batches`: sources of images drawn into micro-batches;
- `objective`: the loss of one micro-batch and the loss measured on a dataset;
- `compile`: the compiled UNet with its eager fallback;
- `lora`: adapters injected for training and the native file of a run's state;
- `loop`: one optimisation phase (`run_phase`), shared by the trainers;
- `checkpoints`: resumable checkpoints;
- `pti`, `dreambooth`: the trainers.
"""

# imported on first use (PEP 562): `lora_ops.training.config` alone (the CLI's parsers) needs no torch
import importlib as _importlib

_EXPORTS = {
    "DreamBoothConfig": "config",
    "PTIConfig": "config",
    "TrainConfig": "config",
    "load_config_file": "config",
    "train_dreambooth": "dreambooth",
    "TrainResult": "loop",
    "run_inversion": "pti",
    "run_tuning": "pti",
    "train_pti": "pti",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(_importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
