"""Export a LoRA for plain diffusers: `pipe.load_lora_weights(dir)` + `pipe.load_textual_inversion(...)`.

The native file itself is refused by `load_lora_weights` because of its `token_embeddings.*` keys, so
the export splits it: `pytorch_lora_weights.safetensors` (LoRA only, scale folded in, no alpha
metadata needed) and one embedding file per learned token:

    pipe.load_lora_weights(out_dir)
    pipe.load_textual_inversion(out_dir / "s1.safetensors", token="<s1>")

An SDXL token's file holds its rows in both text encoders, `{"clip_l": (1, d1), "clip_g": (1, d2)}`, loaded
into each with its tokenizer (as for diffusers' advanced SDXL script's embeddings):

    state = safetensors.torch.load_file(out_dir / "s1.safetensors")
    pipe.load_textual_inversion(state["clip_l"], token="<s1>", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token="<s1>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from safetensors.torch import save_file

from .convert import convert_native_to_diffusers, convert_tokens_to_sdxl_embedding
from .lora_file import LoraFile, atomic_write

WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def token_file_name(token: str) -> str:
    """A file name for a token: `<s1>` -> `s1.safetensors` (characters unsafe in file names dropped)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "", token) or "token"
    return f"{stem}.safetensors"


def export_diffusers(
    lora: LoraFile, out_dir: str | Path, weight_name: str = WEIGHT_NAME, tokens: bool = True, token_prefix: str = ""
) -> dict[str, Path]:
    """Write the diffusers files for `lora` into `out_dir`; returns {"lora": path, <token>: path, …}.

    Each token file (`<token_prefix><token>.safetensors`) holds `{"emb_params": (1, dim)}`; load it with
    `load_textual_inversion(path, token=t)` (SDXL: `clip_l` and `clip_g`, see the module docstring).
    """
    out_dir = Path(out_dir)
    names = [token_prefix + token_file_name(t) for t in lora.tokens]
    if len(set(names)) != len(names):
        raise ValueError(f"tokens {list(lora.tokens)} map to clashing file names {names}")
    paths: dict[str, Path] = {}
    if lora.unet or lora.text_encoder or lora.text_encoder_2:
        tensors = {
            k: v.detach().float().cpu().contiguous() for k, v in convert_native_to_diffusers(lora.state_dict()).items()
        }
        meta = {
            "format": "pt",
            "base_model": str(lora.metadata.get("base_model", "")),
            "tokens": json.dumps(list(lora.tokens)),
        }
        paths["lora"] = atomic_write(out_dir / weight_name, lambda tmp: save_file(tensors, tmp, metadata=meta))
    elif not lora.tokens:
        raise ValueError("lora holds no LoRA modules and no tokens: nothing to export")
    if tokens:
        for (token, vector), name in zip(lora.tokens.items(), names, strict=True):
            if lora.tokens_2:
                emb = convert_tokens_to_sdxl_embedding({token: vector}, {token: lora.tokens_2[token]})
            else:
                emb = {"emb_params": vector.detach().float().cpu().reshape(1, -1).contiguous()}
            paths[token] = atomic_write(
                out_dir / name, lambda tmp, emb=emb, token=token: save_file(emb, tmp, metadata={"token": token})
            )
    return paths
