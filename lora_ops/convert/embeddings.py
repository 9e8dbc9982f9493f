"""A1111 / diffusers textual-inversion embeddings: `string_to_param["*"]` (.pt), `emb_params`
(.safetensors) or diffusers' `{"<token>": (n, dim)}`; SDXL embeddings `{"clip_l": (n, 768), "clip_g": (n, 1280)}`
(one row per vector in each text encoder, as A1111, ComfyUI and diffusers' advanced SDXL script write them)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .keys import show_keys

SDXL_KEYS = {"clip_l", "clip_g"}


def _rows(rows, what: str) -> torch.Tensor:
    if not isinstance(rows, torch.Tensor) or rows.ndim not in (1, 2):
        raise ValueError(f"{what} has shape {getattr(rows, 'shape', None)}; expected (n, dim) or (dim,)")
    return rows.reshape(-1, rows.shape[-1])


def _named(rows: torch.Tensor, token: str) -> dict[str, torch.Tensor]:
    return {token if i == 0 else f"{token}_{i}": row.clone() for i, row in enumerate(rows)}


def is_sdxl_embedding(obj: Mapping) -> bool:
    return set(obj) >= SDXL_KEYS


def convert_sdxl_embedding_to_tokens(
    obj: Mapping, token: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """An SDXL embedding `{"clip_l": (n, d1), "clip_g": (n, d2)}` -> ({token: (d1,)}, {token: (d2,)}): the rows of
    the first and the second text encoder (n > 1: tokens `token`, `token_1`, …)."""
    first, second = _rows(obj.get("clip_l"), "clip_l"), _rows(obj.get("clip_g"), "clip_g")
    if first.shape[0] != second.shape[0]:
        raise ValueError(f"SDXL embedding: clip_l has {first.shape[0]} vectors but clip_g {second.shape[0]}")
    return _named(first, token), _named(second, token)


def convert_tokens_to_sdxl_embedding(
    tokens: Mapping[str, torch.Tensor], tokens_2: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The two encoders' rows -> `{"clip_l": (n, d1), "clip_g": (n, d2)}` (tokens in order)."""
    if not tokens:
        raise ValueError("tokens is empty: nothing to write as an embedding")
    if list(tokens_2) != list(tokens):
        raise ValueError(f"an SDXL embedding needs each token in both encoders: {list(tokens)} vs {list(tokens_2)}")
    return {
        "clip_l": torch.stack([v.float() for v in tokens.values()]).contiguous(),
        "clip_g": torch.stack([v.float() for v in tokens_2.values()]).contiguous(),
    }


def convert_a1111_embedding_to_tokens(obj: Mapping, token: str) -> dict[str, torch.Tensor]:
    """An A1111/diffusers embedding (`string_to_param`, `emb_params`, or one tensor) -> {token: (dim,)}.

    An embedding of n > 1 vectors becomes tokens `token`, `token_1`, … (diffusers' convention).
    """
    if set(obj) >= SDXL_KEYS:
        raise ValueError("an SDXL embedding (clip_l and clip_g): read it with convert_sdxl_embedding_to_tokens")
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        if not isinstance(params, Mapping) or "*" not in params:
            raise ValueError(f"embedding string_to_param has keys {list(params)[:5]}, expected '*'")
        rows = params["*"]
    elif "emb_params" in obj:
        rows = obj["emb_params"]
    elif len(obj) == 1:
        rows = next(iter(obj.values()))
    else:
        raise ValueError(f"not a textual-inversion embedding: keys {show_keys(obj)}")
    return _named(_rows(rows, "embedding tensor"), token)


def convert_tokens_to_a1111_embedding(tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{token: (dim,)} -> `{"emb_params": (n, dim)}` (A1111 safetensors embedding, tokens in order)."""
    if not tokens:
        raise ValueError("tokens is empty: nothing to write as an embedding")
    return {"emb_params": torch.stack([v.float() for v in tokens.values()]).contiguous()}
