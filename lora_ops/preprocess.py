"""Turn a folder of subject images into a training dataset: captions, masks, square crops, a record.

The output is the layout the trainer reads: `<name>.png` (resolution x resolution RGB), `<name>.txt`
(caption), `<name>.mask.png` ("L", 255 on the subject), plus `dataset.json` (sha256 of every file,
models, parameters; written last) and `preview/contact_sheet.png` (images, masks and captions). The
folder appears complete or not at all: everything is written to a sibling folder, then renamed.
"""

from __future__ import annotations

import json
import platform
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .captioning import Captioner, check_model_source, edit_caption, load_pretrained
from .dataset import read_caption
from .hashing import sha256_file
from .image_files import INPUT_SUFFIXES, list_images, load_image
from .images import make_grid
from .masks import ClipSegMasker, FaceMasker, center_of_mass, square_box
from .outputs import check_disjoint, prepare_output, publish_output
from .precision import torch_dtype

RECORD = "dataset.json"  # the preprocessing record, written last
MaskKind = Literal["clipseg", "face", "none"]
CropKind = Literal["mask", "center"]
OnError = Literal["raise", "skip"]

__all__ = [
    "PreprocessConfig",
    "PreprocessResult",
    "Upscaler",
    "preprocess_dataset",
]


@dataclass
class PreprocessConfig:
    """What `preprocess_dataset` does.

    Args:
        input_dir: folder of images (png/jpg/jpeg/webp/bmp/tif); other files and `*.mask.png` are ignored.
        output_dir: dataset folder to write; must not exist or be empty unless `overwrite`.
        resolution: side of the square output images (the training resolution).
        caption_model: BLIP hub id or folder; None keeps `<stem>.txt` beside the input, or the file name.
        caption_prefix: text put before every caption (e.g. "a photo of <s1><s2>,").
        caption_token: learned token to put into captions (in place of a `caption_substitute` phrase,
            or in front when none matches).
        caption_substitute: phrases the token replaces (e.g. ("a man", "a person")).
        caption_max_tokens / caption_min_tokens: caption length bounds.
        mask: "clipseg" (text prompts), "face" (face detector) or "none" (all-white masks).
        mask_model: CLIPSeg hub id or folder.
        mask_prompts: phrases naming the subject for CLIPSeg.
        mask_threshold: None for soft masks, or a probability in (0, 1) for binary masks.
        mask_temperature: CLIPSeg logit temperature.
        crop: "mask" (square around the mask's center of mass) or "center".
        upscale_model: Swin2SR hub id or folder, used on images smaller than `resolution`; None resizes
            them with Lanczos.
        max_upscale_passes: how many times the upscaler may run on one image.
        min_size: images whose shorter side is below this are bad input.
        on_error: "raise" lists every bad input in one error before writing anything; "skip" warns and
            leaves them out (listed in the record).
        overwrite: replace a non-empty `output_dir`.
        device / dtype: where the models run.
        seed: seeds torch before the models run.
    """

    input_dir: str | Path
    output_dir: str | Path
    resolution: int = 512
    caption_model: str | None = "Salesforce/blip-image-captioning-base"
    caption_prefix: str = ""
    caption_token: str | None = None
    caption_substitute: Sequence[str] = ()
    caption_max_tokens: int = 40
    caption_min_tokens: int = 5
    mask: MaskKind = "clipseg"
    mask_model: str = "CIDAS/clipseg-rd64-refined"
    mask_prompts: Sequence[str] = ("face",)
    mask_threshold: float | None = None
    mask_temperature: float = 1.0
    crop: CropKind = "mask"
    upscale_model: str | None = None
    max_upscale_passes: int = 2
    min_size: int = 64
    on_error: OnError = "raise"
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "fp32"
    seed: int = 0

    def __post_init__(self):
        self.input_dir, self.output_dir = Path(self.input_dir), Path(self.output_dir)
        self.caption_substitute = tuple(self.caption_substitute)
        self.mask_prompts = tuple(self.mask_prompts)
        if not self.input_dir.is_dir():
            raise FileNotFoundError(f"input_dir={str(self.input_dir)!r} is not a folder")
        check_disjoint(self.output_dir, {"input_dir": self.input_dir})
        if not isinstance(self.resolution, int) or not 8 <= self.resolution <= 4096 or self.resolution % 8:
            raise ValueError(f"resolution={self.resolution!r} must be a multiple of 8 in [8, 4096]")
        for name, value, allowed in (
            ("mask", self.mask, MaskKind),
            ("crop", self.crop, CropKind),
            ("on_error", self.on_error, OnError),
        ):
            if value not in allowed.__args__:
                raise ValueError(f"{name}={value!r} is not one of {allowed.__args__}")
        torch_dtype(self.dtype)
        if not isinstance(self.min_size, int) or self.min_size < 1:
            raise ValueError(f"min_size={self.min_size!r} must be a positive integer")
        if not isinstance(self.max_upscale_passes, int) or self.max_upscale_passes < 1:
            raise ValueError(f"max_upscale_passes={self.max_upscale_passes!r} must be a positive integer")
        if self.caption_substitute and not self.caption_token:
            raise ValueError(f"caption_substitute={self.caption_substitute!r} needs a caption_token")
        if self.mask_threshold is not None and not 0 < self.mask_threshold < 1:
            raise ValueError(f"mask_threshold={self.mask_threshold!r} must be in (0, 1) or None")
        if not self.mask_temperature > 0:
            raise ValueError(f"mask_temperature={self.mask_temperature!r} must be positive")
        # model names are checked here, before any image is read or any model loads
        if self.caption_model is not None:
            check_model_source("caption_model", self.caption_model)
        if self.mask == "clipseg":
            check_model_source("mask_model", self.mask_model)
        if self.upscale_model is not None:
            check_model_source("upscale_model", self.upscale_model)


@dataclass
class PreprocessResult:
    """Where the dataset is and what is in it (items: name, source, caption, sizes, mask, upscaled)."""

    output_dir: Path
    record: Path
    contact_sheet: Path
    items: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


class Upscaler:
    """Swin2SR super-resolution (transformers `Swin2SRForImageSuperResolution`) of one image."""

    def __init__(self, model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoImageProcessor, Swin2SRForImageSuperResolution

        self.name = str(model)
        self.processor = load_pretrained(AutoImageProcessor, "upscale_model", model)
        self.model = load_pretrained(Swin2SRForImageSuperResolution, "upscale_model", model, dtype=dtype)
        self.model.to(device).eval()
        self.factor = int(self.model.config.upscale)
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Image.Image:
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        out = self.model(pixel_values=pixels).reconstruction.float()  # (1, 3, H', W'), padded input x factor
        out = out[0, :, : image.height * self.factor, : image.width * self.factor].clamp(0, 1)
        return Image.fromarray((out.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8), "RGB")


def _safe_name(stem: str) -> str:
    # "." would clash with the ".mask.png" suffix; keep names shell- and URL-friendly
    return re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "image"


def _list_inputs(input_dir: Path) -> list[Path]:
    files = list_images(input_dir, INPUT_SUFFIXES)
    if not files:
        raise ValueError(f"input_dir={str(input_dir)!r} holds no images ({', '.join(INPUT_SUFFIXES)})")
    return files


def _fallback_caption(path: Path) -> str:
    """The `<name>.txt` beside an image, else its file name; ValueError naming a caption that is not UTF-8."""
    sidecar = path.with_suffix(".txt")
    if sidecar.is_file():
        return read_caption(sidecar)
    return " ".join(re.sub(r"[_\-]+", " ", path.stem).split())


def _contact_sheet(rows: list[tuple[Image.Image, Image.Image, str]], path: Path) -> Path:
    """One row per item: image, mask over the image, with "name: caption" at the left."""
    cells, labels = [], []
    for image, mask, label in rows:
        tinted = Image.composite(Image.new("RGB", image.size, (255, 0, 0)), image, mask.point(lambda v: v // 2))
        cells += [image, tinted]
        labels.append(label if len(label) <= 60 else label[:57] + "...")
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid(cells, cols=2, row_labels=labels, cell=128).save(path)
    return path


def preprocess_dataset(config: PreprocessConfig) -> PreprocessResult:
    """Caption, mask, crop and resize every image of `config.input_dir` into `config.output_dir`."""
    cfg = config
    dtype = torch_dtype(cfg.dtype)

    # read and check every input before loading any model or writing anything
    images: list[tuple[Path, Image.Image, str | None]] = []
    bad: list[dict] = []
    for path in _list_inputs(cfg.input_dir):
        try:
            image = load_image(path)
            if min(image.size) < cfg.min_size:
                raise ValueError(f"{path.name}: {image.width}x{image.height} is smaller than min_size={cfg.min_size}")
            fallback = None if cfg.caption_model else _fallback_caption(path)  # a bad caption file fails here
            images.append((path, image, fallback))
        except ValueError as exc:
            bad.append({"file": path.name, "reason": str(exc)})
    if bad and cfg.on_error == "raise":
        lines = "; ".join(b["reason"] for b in bad)
        raise ValueError(f"{len(bad)} bad input image(s) in {cfg.input_dir} (on_error='skip' leaves them out): {lines}")
    for b in bad:
        warnings.warn(f"skipping {b['reason']}", stacklevel=2)
    if not images:
        raise ValueError(f"input_dir={str(cfg.input_dir)!r}: no usable image left")
    names = [_safe_name(p.stem) for p, _, _ in images]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"input files map to the same output name(s) {clashes}; rename them")

    # models, loaded once
    torch.manual_seed(cfg.seed)
    captioner = (
        Captioner(cfg.caption_model, cfg.device, dtype, cfg.caption_max_tokens, cfg.caption_min_tokens)
        if cfg.caption_model
        else None
    )
    if cfg.mask == "clipseg":
        masker = ClipSegMasker(
            cfg.mask_model, cfg.mask_prompts, cfg.mask_temperature, cfg.mask_threshold, cfg.device, dtype
        )
    elif cfg.mask == "face":
        masker = FaceMasker()
    else:
        masker = None
    upscaler = Upscaler(cfg.upscale_model, cfg.device, dtype) if cfg.upscale_model else None

    staging = prepare_output(cfg.output_dir, cfg.overwrite, RECORD, {"input_dir": cfg.input_dir})
    try:
        items, sheet_rows = [], []
        for name, (path, image, fallback) in zip(names, tqdm(images, desc="preprocess", unit="image"), strict=True):
            item = {"name": name, "source": path.name, "source_size": list(image.size), "upscaled": 0}
            raw = captioner([image])[0] if captioner else fallback
            caption = edit_caption(raw, cfg.caption_prefix, cfg.caption_token, cfg.caption_substitute)

            # small images: super-resolution first, so masks and crops see the detail
            while upscaler and min(image.size) < cfg.resolution and item["upscaled"] < cfg.max_upscale_passes:
                image = upscaler(image)
                item["upscaled"] += 1

            if masker is None:
                mask = Image.new("L", image.size, 255)
            else:
                mask = masker(image)
                if not np.asarray(mask).any():
                    warnings.warn(f"{path.name}: empty {cfg.mask} mask; using the whole image", stacklevel=2)
                    mask = Image.new("L", image.size, 255)
                    item["mask_empty"] = True

            center = center_of_mass(mask) if cfg.crop == "mask" else (image.width / 2, image.height / 2)
            box = square_box(image.size, center)
            size = (cfg.resolution, cfg.resolution)
            image = image.crop(box).resize(size, Image.Resampling.LANCZOS)
            binary = cfg.mask == "clipseg" and cfg.mask_threshold is not None
            mask = mask.crop(box).resize(size, Image.Resampling.NEAREST if binary else Image.Resampling.BILINEAR)

            image.save(staging / f"{name}.png")
            mask.save(staging / f"{name}.mask.png")
            (staging / f"{name}.txt").write_text(caption + "\n", encoding="utf-8")
            item.update(caption=caption, raw_caption=raw, crop_box=list(box), mask=cfg.mask)
            items.append(item)
            sheet_rows.append((image, mask, f"{name}: {caption}"))

        sheet = _contact_sheet(sheet_rows, staging / "preview" / "contact_sheet.png")
        files = {
            str(p.relative_to(staging)): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        parameters = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()}
        manifest = {
            "kind": "lora-ops dataset",
            "files": files,
            "items": items,
            "skipped": bad,
            "models": {
                "captioner": captioner.name if captioner else None,
                "masker": masker.name if masker else None,
                "upscaler": upscaler.name if upscaler else None,
            },
            "parameters": parameters,
            "versions": _versions(),
        }
        # the record goes last: a folder with a record is complete
        (staging / RECORD).write_text(json.dumps(manifest, indent=2, default=list) + "\n")
        publish_output(staging, cfg.output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    out = cfg.output_dir
    return PreprocessResult(out, out / RECORD, out / sheet.relative_to(staging), items, bad)


def _versions() -> dict[str, str]:
    import PIL
    import transformers

    from . import lora_file

    return {
        "lora_ops": lora_file._version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }
