"""`torch.compile` of the UNet for training, with an eager fallback when the compiler stack fails."""

from __future__ import annotations

import torch
from torch import nn


def resolve_compile(mode: str, device: torch.device) -> str:
    """The compile mode to use: "auto" is "reduce-overhead" (CUDA graphs) on CUDA and "none" elsewhere."""
    if mode == "auto":
        return "reduce-overhead" if device.type == "cuda" else "none"
    return mode


class CompiledUNet:
    """The UNet's forward under `torch.compile`, falling back to eager (with a warning) if compiling fails.

    `mode` is a `ComputeSection.compile` mode other than "auto"/"none"; "trace" uses the "aot_eager" backend
    (graphs captured through dynamo and AOTAutograd, kernels eager).
    """

    def __init__(self, unet: nn.Module, mode: str, device: torch.device):
        self.unet, self.mode, self.device = unet, mode, device
        self.failed: str | None = None
        kwargs = {"backend": "aot_eager"} if mode == "trace" else {"mode": mode}
        try:
            self.compiled = torch.compile(unet, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler problem means: run eager
            self._fall_back(exc)

    def _fall_back(self, exc: BaseException) -> None:
        import warnings

        self.failed = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.compiled = None
        warnings.warn(f"torch.compile(mode={self.mode!r}) failed, training eagerly: {self.failed}", stacklevel=2)

    def step_begin(self) -> None:
        if self.compiled is not None and self.mode == "reduce-overhead" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            return self.unet(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if self.failed is not None or not _is_compile_error(exc):
                raise
            self._fall_back(exc)
            return self.unet(*args, **kwargs)


def _is_compile_error(exc: BaseException) -> bool:
    """An error of the compiler stack (dynamo, inductor, a missing C compiler or Triton), not of the model."""
    module = type(exc).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "torch._functorch", "triton")) or isinstance(
        exc, (ImportError, OSError, NotImplementedError)
    )
