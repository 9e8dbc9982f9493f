"""A1111 / diffusers textual-inversion embeddings: `string_to_param["*"]` (.pt), `emb_params`
(.safetensors) or diffusers' `{"<token>": (n, dim)}`."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .keys import show_keys


def convert_a1111_embedding_to_tokens(obj: Mapping, token: str) -> dict[str, torch.Tensor]:
    """An A1111/diffusers embedding (`string_to_param`, `emb_params`, or one tensor) -> {token: (dim,)}.

    An embedding of n > 1 vectors becomes tokens `token`, `token_1`, … (diffusers' convention).
    """
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
    if not isinstance(rows, torch.Tensor) or rows.ndim not in (1, 2):
        raise ValueError(f"embedding tensor has shape {getattr(rows, 'shape', None)}; expected (n, dim) or (dim,)")
    rows = rows.reshape(-1, rows.shape[-1])
    return {token if i == 0 else f"{token}_{i}": row.clone() for i, row in enumerate(rows)}


def convert_tokens_to_a1111_embedding(tokens: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{token: (dim,)} -> `{"emb_params": (n, dim)}` (A1111 safetensors embedding, tokens in order)."""
    if not tokens:
        raise ValueError("tokens is empty: nothing to write as an embedding")
    return {"emb_params": torch.stack([v.float() for v in tokens.values()]).contiguous()}
