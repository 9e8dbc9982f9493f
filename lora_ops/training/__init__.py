"""Training: pivotal tuning (textual inversion, then LoRA) and DreamBooth LoRA, one concept per module.

- `config`: the options of every trainer (`PTIConfig`, `DreamBoothConfig`: the recipe's own options and the
  sections `data`, `lora`, `optim`, `compute`, `runtime`; the runtime section alone may change on resume);
- `options`: how a config is built: help text, sections, flat names (the original flags), checks, files;
- `trainee`: the base model loaded for training, and how pixels and prompts become UNet inputs;
- `batches`: sources of images drawn into micro-batches;
- `objective`: the loss of one micro-batch and the loss measured on a dataset;
- `compile`: the compiled UNet with its eager fallback;
- `lora`: adapters injected for training and the native file of a run's state;
- `token_rows`: the embedding table with only the new tokens' rows trained (phase 1);
- `loop`: one optimisation phase (`run_phase`), shared by the trainers;
- `checkpoints`: resumable checkpoints;
- `pti`, `dreambooth`: the trainers.

The public names (`train_pti`, `run_inversion`, `run_tuning`, `train_dreambooth`, `PTIConfig`,
`DreamBoothConfig`, `TrainResult`) are `lora_ops`'s, imported on first use.
"""
