"""Image files: which suffixes each folder holds, and the one decoder every reader uses.

A training dataset (what `preprocess` writes and the trainer, DreamBooth's class images and the evaluator
read) holds `DATASET_SUFFIXES` images with `.txt` captions and `.mask.png` masks; preprocessing also reads
the `INPUT_SUFFIXES` of raw photos.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DATASET_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
INPUT_SUFFIXES = (*DATASET_SUFFIXES, ".bmp", ".tif", ".tiff")
MASK_SUFFIX = ".mask.png"
CAPTION_SUFFIX = ".txt"
# what a tracker logs as a picture
PICTURE_SUFFIXES = (*DATASET_SUFFIXES, ".gif")


def is_image(path: str | Path, suffixes: Iterable[str] = DATASET_SUFFIXES) -> bool:
    """An image file by name (one of `suffixes`), not a mask and not hidden."""
    name = Path(path).name.lower()
    return name.endswith(tuple(suffixes)) and not name.endswith(MASK_SUFFIX) and not name.startswith(".")


def list_images(directory: str | Path, suffixes: Iterable[str] = DATASET_SUFFIXES) -> list[Path]:
    """The image files of a folder (`is_image`), sorted by name; [] for a missing folder."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and is_image(p, suffixes))


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode as RGB: transparency (RGBA, LA, P with transparency) composited over white, 16-bit and
    32-bit greyscale (I;16, I, F) scaled to 8 bits from their value range, CMYK, L and 1 converted."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _open(path: str | Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return (ImageOps.exif_transpose(img) or img).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path}: not a readable {what} ({exc})") from None


def load_image(path: str | Path) -> Image.Image:
    """An image file as RGB with its EXIF orientation applied (`to_rgb` for the modes).

    Raises ValueError naming the file for anything PIL cannot decode.
    """
    return to_rgb(_open(path, "image"))


def load_mask(path: str | Path) -> Image.Image:
    """A mask file as 8-bit greyscale ("L"): 255 = the subject (weight 1), 0 = background."""
    return to_rgb(_open(path, "mask image")).convert("L")
