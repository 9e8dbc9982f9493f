"""The shapes world: a Stable Diffusion pretrained on drawn shapes, its scorers, and held-out concepts.

`pretrained("sd")` is the shipped base model (a diffusers folder), `pretrained("clip")`, `"dino"` and
`"evaluator"` its scorers; `world` draws images, `quality` measures what a LoRA learned, `pretrain`
rebuilds every model (`lora-ops shapes pretrain`).
"""

from __future__ import annotations

import json
from pathlib import Path

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
PARTS = ("sd", "clip", "dino", "evaluator")


def pretrained(part: str = "sd", root: str | Path | None = None) -> Path:
    """The folder of one shipped model: "sd" (the base), "clip", "dino" or "evaluator"."""
    if part not in PARTS:
        raise ValueError(f"part={part!r} is not one of {PARTS}")
    root = Path(root) if root is not None else PRETRAINED_DIR
    if not (root / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{root}: no shapes-world models (manifest.json missing); build them with `lora-ops shapes pretrain`"
        )
    return root / part


def manifest(root: str | Path | None = None) -> dict:
    """The manifest of the shipped models (files with sha256, command, versions, checks)."""
    root = Path(root) if root is not None else PRETRAINED_DIR
    return json.loads(pretrained("sd", root).parent.joinpath("manifest.json").read_text())
