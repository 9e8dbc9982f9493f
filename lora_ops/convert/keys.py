"""The native key layout shared by every conversion: `<component>.<module>.lora_A|lora_B.weight` and
`<token prefix><token>` rows, and the short key listings error messages show."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from ..lora_file import COMPONENTS, TOKEN_PREFIX, TOKEN_PREFIX_2


def show_keys(keys: Iterable[str], n: int = 5) -> str:
    keys = list(keys)
    return f"{keys[:n]}{' …' if len(keys) > n else ''} ({len(keys)} keys)"


def native_pairs(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict, dict, list[str]]:
    """{(component, module): {"lora_A"/"lora_B": tensor}}, {token: (dim,)}, unknown keys.

    The token rows of SDXL's second text encoder (`token_embeddings_2.*`) are `second_tokens`'s to read;
    here they count as known keys and are left out.
    """
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    tokens: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        if key.startswith(TOKEN_PREFIX):
            tokens[key[len(TOKEN_PREFIX) :]] = tensor
            continue
        if key.startswith(TOKEN_PREFIX_2):
            continue
        comp, _, rest = key.partition(".")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", rest)
        if comp in COMPONENTS and m:
            pairs.setdefault((comp, m.group(1)), {})[m.group(2)] = tensor
        else:
            unknown.append(key)
    for (comp, name), pair in pairs.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{comp}.{name}: has {sorted(pair)} but needs both lora_A and lora_B")
    return pairs, tokens, unknown


def second_tokens(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{token: (dim_2,)}: the learned tokens' rows in SDXL's second text encoder (native keys)."""
    return {k[len(TOKEN_PREFIX_2) :]: v for k, v in state_dict.items() if k.startswith(TOKEN_PREFIX_2)}
