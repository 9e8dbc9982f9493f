"""Where work runs: the `auto` device and device names, resolved the same way by every command and step."""

from __future__ import annotations


def resolve_device(name: str) -> str:
    """`auto` -> "cuda" if available, else "mps" if available, else "cpu"; any other name as given.

    Imports torch only when `name` is `auto`, so command-line parsing stays fast.
    """
    if name != "auto":
        return name
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"
