"""Pure conversions between LoRA key layouts: `convert_<src>_to_<dst>(state_dict[, metadata]) -> dict`, one
module per format family (`diffusers` with PEFT, `kohya`, `lora_diffusion`, `embeddings`).

Every function takes and returns plain `{key: tensor}` dicts (and string metadata where the format
keeps information there); nothing here reads files or models. The scale rule of each format:

- native (lora_ops) and diffusers/PEFT: ΔW = lora_B @ lora_A; a diffusers file may carry
  `lora_adapter_metadata` (peft `r`, `lora_alpha`, patterns): then ΔW = alpha / r · B A, and reading
  folds alpha / r into lora_B.
- PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`, or diffusers' `save_lora_adapter`
  file): ΔW = lora_alpha / r · B A per module (rank_pattern / alpha_pattern; rsLoRA: / sqrt(r)).
- kohya / A1111 / ComfyUI: ΔW = alpha / r · lora_up @ lora_down (missing `.alpha`: alpha = r). Writing
  stores alpha = r, so the factors are copied bit for bit. SDXL files name UNet modules in the original
  (sgm) block layout and the text encoders `lora_te1_` / `lora_te2_`.
- lora_diffusion (legacy): ΔW = up @ down (scale 1), modules numbered in the traversal order of the
  model (see `lora_ops.legacy`).
- A1111 embeddings: rows of `string_to_param["*"]` (.pt) or `emb_params` (.safetensors), (n, dim); SDXL
  embeddings `clip_l` (n, 768) and `clip_g` (n, 1280), the rows of the two text encoders.
"""

from .diffusers import (
    PEFT_PREFIX,
    check_peft_config,
    convert_diffusers_to_native,
    convert_native_to_diffusers,
    convert_peft_to_native,
    peft_component,
)
from .embeddings import (
    convert_a1111_embedding_to_tokens,
    convert_sdxl_embedding_to_tokens,
    convert_tokens_to_a1111_embedding,
    convert_tokens_to_sdxl_embedding,
    is_sdxl_embedding,
)
from .keys import native_pairs, second_tokens, show_keys
from .kohya import (
    BUNDLE_PREFIX,
    KOHYA_PREFIX,
    SDXL_KOHYA_PREFIX,
    convert_kohya_to_native,
    convert_native_to_kohya,
    is_sdxl_kohya,
    kohya_name,
)
from .lora_diffusion import convert_legacy_to_native, convert_native_to_legacy

__all__ = [
    "BUNDLE_PREFIX",
    "KOHYA_PREFIX",
    "PEFT_PREFIX",
    "SDXL_KOHYA_PREFIX",
    "check_peft_config",
    "convert_a1111_embedding_to_tokens",
    "convert_diffusers_to_native",
    "convert_kohya_to_native",
    "convert_legacy_to_native",
    "convert_native_to_diffusers",
    "convert_native_to_kohya",
    "convert_native_to_legacy",
    "convert_peft_to_native",
    "convert_sdxl_embedding_to_tokens",
    "convert_tokens_to_a1111_embedding",
    "convert_tokens_to_sdxl_embedding",
    "is_sdxl_embedding",
    "is_sdxl_kohya",
    "kohya_name",
    "native_pairs",
    "second_tokens",
    "peft_component",
    "show_keys",
]
