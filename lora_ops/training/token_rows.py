"""Trainable token rows: the text encoder's embedding table with only the new placeholder tokens' rows trained.

Phase 1 of pivotal tuning wraps the embedding (`wrap_token_embedding`); every other row stays bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TokenEmbedding(nn.Module):
    """The text encoder's token embedding with trainable rows for a few new tokens.

    Every other row is read from the frozen base table, so training changes nothing else by construction.
    `rows` is (n_tokens, dim) float32.
    """

    def __init__(self, base: nn.Embedding, token_ids: Sequence[int]):
        super().__init__()
        self.base = base
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=base.weight.device)
        self.register_buffer("ids", ids, persistent=False)
        lookup = torch.full((base.num_embeddings,), -1, dtype=torch.long, device=ids.device)
        lookup[ids] = torch.arange(len(ids), device=ids.device)
        self.register_buffer("lookup", lookup, persistent=False)
        self.rows = nn.Parameter(base.weight.detach()[ids].float().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)  # (b, L, dim)
        slot = self.lookup[input_ids]  # (b, L), -1 for ordinary tokens
        rows = self.rows[slot.clamp(min=0)].to(out.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), rows, out)

    @torch.no_grad()
    def write_back(self) -> None:
        self.base.weight[self.ids] = self.rows.to(self.base.weight.dtype)


def _embedding_parent(text_encoder: nn.Module) -> tuple[nn.Module, str]:
    current = text_encoder.get_input_embeddings()
    for module in text_encoder.modules():
        for attr, child in module.named_children():
            if child is current:
                return module, attr
    raise ValueError("could not find the text encoder's token embedding module")


def wrap_token_embedding(text_encoder: nn.Module, token_ids: Sequence[int]) -> TokenEmbedding:
    parent, attr = _embedding_parent(text_encoder)
    wrapper = TokenEmbedding(getattr(parent, attr), token_ids)
    setattr(parent, attr, wrapper)
    return wrapper


def unwrap_token_embedding(text_encoder: nn.Module) -> None:
    parent, attr = _embedding_parent(text_encoder)
    wrapper = getattr(parent, attr)
    if isinstance(wrapper, TokenEmbedding):
        wrapper.write_back()
        setattr(parent, attr, wrapper.base)


# ---- pivotal tuning ---------------------------------------------------------------------------------------
