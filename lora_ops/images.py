"""Image grids and animations for results people look at (samples, alpha sweeps, contact sheets)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def to_pil(image) -> Image.Image:
    """PIL image from a PIL image, or an (H, W, 3) float array in [0, 1] / uint8 array."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    return Image.fromarray(array).convert("RGB")


def make_grid(
    images: Sequence,
    cols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    cell: int | None = None,
) -> Image.Image:
    """Lay `images` out row by row in a grid with `cols` columns and optional labels.

    Args:
        cell: side of each square cell in pixels (default: the first image's width, at least 64).
    """
    if not images:
        raise ValueError("make_grid needs at least one image")
    if cols < 1:
        raise ValueError(f"cols={cols} must be positive")
    pil = [to_pil(im) for im in images]
    cell = cell or max(64, pil[0].width)
    rows = (len(pil) + cols - 1) // cols
    font = ImageFont.load_default()
    left = 8 + max((int(font.getlength(t)) for t in row_labels), default=0) if row_labels else 0
    top = 16 if col_labels else 0
    grid = Image.new("RGB", (left + cols * cell, top + rows * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, im in enumerate(pil):
        r, c = divmod(i, cols)
        grid.paste(im.resize((cell, cell), Image.Resampling.LANCZOS), (left + c * cell, top + r * cell))
    for c, text in enumerate(col_labels or []):
        draw.text((left + c * cell + 2, 2), str(text), fill="black", font=font)
    for r, text in enumerate(row_labels or []):
        draw.text((2, top + r * cell + cell // 2 - 6), str(text), fill="black", font=font)
    return grid


def save_gif(frames: Sequence, path: str | Path, duration_ms: int = 250, size: int | None = None) -> Path:
    """An animated GIF of `frames` (looping), e.g. an alpha sweep from scale 0 to 1."""
    if not frames:
        raise ValueError("save_gif needs at least one frame")
    pil = [to_pil(f) for f in frames]
    if size:
        pil = [f.resize((size, size), Image.Resampling.LANCZOS) for f in pil]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil[0].save(path, save_all=True, append_images=pil[1:], duration=duration_ms, loop=0)
    return path
