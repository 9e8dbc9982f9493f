"""Precision names every command takes ("fp32", "fp16", "bf16") and the torch dtypes they stand for."""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: str, flag: str = "dtype") -> torch.dtype:
    """The torch dtype of a precision name; ValueError naming `flag` for anything else."""
    try:
        return DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"{flag}={name!r} is not one of {list(DTYPES)}") from None
