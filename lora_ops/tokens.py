"""Learned tokens: placeholder tokens added to a CLIP tokenizer and their rows in the text encoder.

Each placeholder token (e.g. `<s1>`) is one new vocabulary entry with one embedding vector; a
multi-vector concept is several tokens used together (`<s1><s2>`), as in the original project.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def parse_tokens(spec: str | Sequence[str]) -> list[str]:
    """`"<s1>|<s2>"` or `["<s1>", "<s2>"]` -> `["<s1>", "<s2>"]`; rejects empty or repeated tokens."""
    tokens = [t.strip() for t in spec.split("|")] if isinstance(spec, str) else [str(t) for t in spec]
    if not tokens or any(not t for t in tokens):
        raise ValueError(f"placeholder tokens {spec!r}: every token must be a non-empty string")
    if len(set(tokens)) != len(tokens):
        raise ValueError(f"placeholder tokens {spec!r}: a token is repeated")
    return tokens


def _own_tokens(tokenizer) -> set[str]:
    """Tokens added to the tokenizer after its base vocabulary (not its special tokens)."""
    special = set(tokenizer.all_special_tokens)
    return {t for t in tokenizer.get_added_vocab() if t not in special}


def add_tokens(tokenizer, text_encoder, tokens: Sequence[str]) -> list[int]:
    """Add `tokens` to `tokenizer`, grow the text encoder's embedding table; returns their ids.

    Idempotent: a token added before (by this function) keeps its id. A token that is part of the
    base vocabulary is an error, since training it would change an existing word.
    """
    vocab = tokenizer.get_vocab()
    own = _own_tokens(tokenizer)
    for token in tokens:
        if token in vocab and token not in own:
            raise ValueError(f"token {token!r} is already in the tokenizer's vocabulary; choose another placeholder")
    new = [t for t in tokens if t not in own]
    if new:
        tokenizer.add_tokens(new)
    embeddings = text_encoder.get_input_embeddings()
    # only grow: a tokenizer may be smaller than the embedding table (never shrink a real model)
    if len(tokenizer) > embeddings.num_embeddings:
        text_encoder.resize_token_embeddings(len(tokenizer))
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def init_token_embeddings(
    tokenizer,
    text_encoder,
    tokens: Sequence[str],
    initializer: str | Sequence[str] | None = None,
    norm: float | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """Initialise the rows of `tokens` from initializer words, or randomly with a chosen norm.

    Args:
        initializer: one word per token ("dog|toy"), one word for all, or None for random rows.
            A word that tokenizes into several pieces uses their mean.
        norm: target L2 norm of random rows; default: the mean norm of the existing rows.
    """
    weight = text_encoder.get_input_embeddings().weight
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    with torch.no_grad():
        if initializer is None or initializer == "":
            if norm is None:
                norm = weight[: len(tokenizer) - len(tokens)].norm(dim=-1).mean().item()
            if not (norm > 0 and torch.isfinite(torch.tensor(norm))):
                raise ValueError(f"norm={norm} must be a positive finite number")
            rows = torch.randn(len(ids), weight.shape[1], generator=generator, dtype=torch.float32)
            rows = rows / rows.norm(dim=-1, keepdim=True) * norm
            weight[ids] = rows.to(weight.dtype)
            return
        words = parse_tokens(initializer) if isinstance(initializer, str) else list(initializer)
        if len(words) == 1:
            words = words * len(tokens)
        if len(words) != len(tokens):
            raise ValueError(f"initializer {initializer!r}: give one word, or one per token ({len(tokens)})")
        for token_id, word in zip(ids, words):
            pieces = tokenizer(word, add_special_tokens=False).input_ids
            if not pieces:
                raise ValueError(f"initializer word {word!r} tokenizes to nothing")
            weight[token_id] = weight[pieces].float().mean(dim=0).to(weight.dtype)


def check_token_rows(text_encoder, embeddings: Mapping[str, torch.Tensor], name: str) -> None:
    """Raise ValueError naming the token if a row is not a finite vector of `text_encoder`'s width."""
    width = text_encoder.get_input_embeddings().weight.shape[1]
    for token, vector in embeddings.items():
        if vector.ndim != 1 or vector.shape[0] != width:
            raise ValueError(
                f"token {token!r} has an embedding of shape {tuple(vector.shape)}; {name} needs ({width},)"
            )
        if not torch.isfinite(vector).all():
            raise ValueError(f"token {token!r} has a non-finite embedding")


def apply_token_embeddings(tokenizer, text_encoder, embeddings: Mapping[str, torch.Tensor]) -> list[int]:
    """Add (idempotently) and set learned token embeddings; returns their ids.

    Raises ValueError if a vector's size differs from the text encoder's embedding width.
    """
    check_token_rows(text_encoder, embeddings, "this text encoder")
    ids = add_tokens(tokenizer, text_encoder, list(embeddings))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for token_id, vector in zip(ids, embeddings.values()):
            weight[token_id] = vector.to(device=weight.device, dtype=weight.dtype)
    return ids


def read_token_embeddings(tokenizer, text_encoder, tokens: Sequence[str]) -> dict[str, torch.Tensor]:
    """The current embedding rows of `tokens`, as float32 CPU tensors of shape (dim,)."""
    weight = text_encoder.get_input_embeddings().weight
    out = {}
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token not in _own_tokens(tokenizer):
            raise ValueError(f"token {token!r} is not an added token of this tokenizer")
        out[token] = weight[token_id].detach().float().cpu().clone()
    return out


def text_pairs(model) -> dict[str, tuple]:
    """{component: (tokenizer, text encoder)} of a pipeline (or anything with the same attributes):
    text_encoder, and SDXL's text_encoder_2 with its tokenizer_2."""
    pairs = {"text_encoder": (model.tokenizer, model.text_encoder)}
    if getattr(model, "text_encoder_2", None) is not None:
        pairs["text_encoder_2"] = (model.tokenizer_2, model.text_encoder_2)
    return pairs


def apply_lora_tokens(model, lora) -> dict[str, list[int]]:
    """Add a LoraFile's learned tokens to every text encoder of `model`; returns their ids per encoder.

    An SDXL model needs each token's row in both encoders (`lora.tokens` and `lora.tokens_2`); a file with
    rows for one encoder only, or SDXL rows for a one-encoder model, is refused before anything changes.
    """
    if not lora.tokens:
        return {}
    lora.check_tokens()
    pairs = text_pairs(model)
    tables = lora.token_tables()
    if set(tables) != set(pairs):
        have = "both SDXL text encoders" if "text_encoder_2" in tables else "one text encoder"
        need = "SDXL model needs rows for both (clip_l and clip_g)" if "text_encoder_2" in pairs else (
            "model has one text encoder (not SDXL)")  # fmt: skip
        raise ValueError(f"the learned tokens {list(lora.tokens)} have rows for {have}; this {need}")
    for name, table in tables.items():  # every table first, so that a misfit changes nothing
        check_token_rows(pairs[name][1], table, name)
    return {name: apply_token_embeddings(*pairs[name], table) for name, table in tables.items()}


def read_lora_tokens(model, tokens: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {token: row}} of `tokens` in every text encoder of `model` (see `read_token_embeddings`)."""
    return {name: read_token_embeddings(tok, te, tokens) for name, (tok, te) in text_pairs(model).items()}
