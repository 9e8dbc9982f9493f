"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `<output_dir>/checkpoints/<phase>-<step:06d>/` with
- `lora.safetensors`: the native file at that step (LoRA + tokens, fp32), usable on its own;
- `state.pt`: trainable tensors, optimizer, lr scheduler, gradient scaler, every RNG state (torch, CUDA,
  python `random`, numpy, the trainer's generators, the data sampler) and the step.
It is written to a hidden temporary folder and renamed into place, so a folder with the final name is
always complete. `state.pt` is read back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..lora_file import LoraFile, save_lora

PHASES = ("inversion", "tuning", "dreambooth")
_NAME = re.compile(r"^(inversion|tuning|dreambooth)-(\d{6})$")


def checkpoint_order(name: str) -> tuple[int, int] | None:
    """(phase index, step) of a checkpoint folder name `<phase>-<step:06d>`, which sorts checkpoints in training
    order; None for any other name."""
    m = _NAME.match(name)
    return (PHASES.index(m.group(1)), int(m.group(2))) if m else None


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def global_rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), python `random` and numpy global RNG states, in a weights_only-loadable form."""
    version, values, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": (version, list(values), gauss),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_global_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output_dir: str | Path, phase: str, step: int, lora: LoraFile, state: dict[str, Any]) -> Path:
    """Write one checkpoint atomically (temporary folder, then rename); returns its folder."""
    if phase not in PHASES:
        raise ValueError(f"phase={phase!r} is not one of {PHASES}")
    root = checkpoint_dir(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{phase}-{step:06d}"
    tmp = root / f".tmp-{phase}-{step:06d}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        save_lora(tmp / "lora.safetensors", lora, dtype="fp32")
        torch.save({**state, "phase": phase, "step": step}, tmp / "state.pt")
        if final.exists():  # re-saving a step (a rerun): replace it whole
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in training order (phase order, then step)."""
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        order = checkpoint_order(path.name)
        if order and path.is_dir() and (path / "state.pt").is_file() and (path / "lora.safetensors").is_file():
            found.append((order, path))
    return [p for _, p in sorted(found)]


def resolve_resume(resume: str | Path | None, output_dir: str | Path) -> Path | None:
    """The checkpoint folder to resume from: None, "auto" (latest complete one, or None) or a folder."""
    if resume is None:
        return None
    if str(resume) == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path.is_dir() and (path / "state.pt").is_file() and checkpoint_order(path.name)):
        raise ValueError(f"resume={str(resume)!r} is not a complete checkpoint folder (<phase>-<step>/state.pt)")
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The state dict of a checkpoint folder (trusted tensors only: weights_only)."""
    path = Path(path)
    try:
        return torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # a torn or foreign file
        raise ValueError(f"{path}: unreadable checkpoint state ({type(exc).__name__}: {exc})") from None
