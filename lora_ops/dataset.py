"""Training images: a folder of pictures with optional captions and masks, prompts, augmentation.

A dataset folder holds images (png/jpg/jpeg/webp), and next to an image `name.png` optionally a caption
`name.txt` and a mask `name.mask.png` (white = the subject). Every image is decoded, converted to RGB and
resized once when the dataset is built; crops, flips and colour jitter happen per sample, drawn from a
`torch.Generator` that the trainer owns, so that a resumed run sees the same samples as an uninterrupted one.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from .batching import BatchSampler, BucketBatchSampler, Buckets
from .image_files import CAPTION_SUFFIX, DATASET_SUFFIXES, MASK_SUFFIX, load_image, load_mask

# prompt templates in the spirit of the original textual-inversion and lora_diffusion lists; "{}" is the concept
TEMPLATES: dict[str, list[str]] = {
    "object": [
        "a photo of a {}",
        "a rendering of a {}",
        "a cropped photo of the {}",
        "the photo of a {}",
        "a photo of a clean {}",
        "a photo of my {}",
        "a close-up photo of a {}",
        "a bright photo of the {}",
        "a good photo of a {}",
        "a photo of one {}",
        "a rendition of the {}",
        "a photo of the nice {}",
    ],
    "style": [
        "a painting in the style of {}",
        "a rendering in the style of {}",
        "a cropped painting in the style of {}",
        "the painting in the style of {}",
        "a clean painting in the style of {}",
        "a picture in the style of {}",
        "a close-up painting in the style of {}",
        "a bright painting in the style of {}",
        "a good painting in the style of {}",
        "a rendition in the style of {}",
        "a nice painting in the style of {}",
        "a small painting in the style of {}",
    ],
}


@dataclass
class Example:
    """One training image as found on disk."""

    image: Path
    caption: str | None = None
    mask: Path | None = None


def read_caption(path: str | Path) -> str:
    """A caption file's text (UTF-8, whitespace collapsed); ValueError naming the file when it is not text."""
    try:
        return " ".join(Path(path).read_text(encoding="utf-8").split())
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{Path(path).name}: caption file is not UTF-8 text (byte {exc.start}: {exc.object[exc.start : exc.start + 4]!r}); "
            "save it as UTF-8"
        ) from None


def scan_folder(directory: str | Path, on_bad_files: Literal["error", "skip"] = "error") -> list[Example]:
    """The images of a dataset folder, with their captions and masks, sorted by file name.

    Files other than images, `.txt` captions and `.mask.png` masks (hidden files aside), and images that
    do not decode, are listed in one ValueError, or skipped with one warning when on_bad_files="skip".
    A folder without usable images is an error.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"instance_data_dir={str(directory)!r}: no such folder")
    if on_bad_files not in ("error", "skip"):
        raise ValueError(f"on_bad_files={on_bad_files!r} is not one of 'error', 'skip'")
    files = sorted(p for p in directory.iterdir() if p.is_file() and not p.name.startswith("."))
    names = {p.name for p in files}
    examples, bad = [], []
    for path in files:
        lower = path.name.lower()
        if lower.endswith(MASK_SUFFIX) or lower.endswith(CAPTION_SUFFIX):
            continue
        if not lower.endswith(DATASET_SUFFIXES):
            bad.append(f"{path.name} (not a png/jpg/jpeg/webp image)")
            continue
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as exc:  # PIL raises many types for broken files
            bad.append(f"{path.name} (unreadable: {type(exc).__name__})")
            continue
        caption_file = path.with_suffix(CAPTION_SUFFIX)
        try:
            caption = read_caption(caption_file) if caption_file.name in names else None
        except ValueError as exc:
            bad.append(str(exc))
            continue
        mask = path.with_name(path.stem + MASK_SUFFIX)
        examples.append(Example(path, caption or None, mask if mask.name in names else None))
    if bad:
        message = f"{directory}: {len(bad)} file(s) are not usable: " + ", ".join(bad)
        if on_bad_files == "error":
            raise ValueError(message + " (remove them, or skip them with on_bad_files='skip')")
        warnings.warn(message + "; skipped", stacklevel=2)
    if not examples:
        raise ValueError(f"{directory}: the dataset is empty (no png/jpg/jpeg/webp images)")
    return examples


def caption_from_filename(path: Path) -> str:
    """`a-dog_on the beach (2).jpg` -> `a dog on the beach`: separators to spaces, copy counters dropped."""
    stem = path.stem
    for ch in "-_":
        stem = stem.replace(ch, " ")
    words = [w for w in stem.split() if not (w.strip("()").isdigit())]
    return " ".join(words)


@dataclass
class DatasetConfig:
    """How images become training samples.

    Args:
        data_dir: folder of images (see module docstring).
        resolution: side of the square training crop in pixels (with buckets: the pixel budget, resolution²).
        placeholder_tokens: the concept's tokens; templates use them joined ("<s1><s2>").
        template: "object", "style", "none" (captions: `name.txt`, else the file name), or a list of
            user templates, each with one "{}" for the concept.
        token_map: "word|<s1><s2>": replace `word` in captions by the tokens (original
            `placeholder_token_at_data`).
        prompt: a fixed prompt for every image (DreamBooth instance/class prompt); overrides template.
        crop: "center" or "random" crop after resizing the image to cover its training size.
        flip: random horizontal flip (p=0.5).
        color_jitter: random brightness and contrast (±10%), as the original trainer.
        use_masks: read `name.mask.png` masks (required for every image when True).
        inpainting: add random cutout masks and the masked image (inpainting UNet training).
        on_bad_files: "error" lists unusable files in one error; "skip" drops them with a warning.
        buckets: aspect-ratio buckets (`lora_ops.batching.Buckets`): each image is trained at the bucket
            nearest its aspect ratio instead of a square; None: square crops.
    """

    data_dir: str | Path
    resolution: int = 512
    placeholder_tokens: Sequence[str] = ()
    template: Literal["object", "style", "none"] | Sequence[str] = "none"
    token_map: str | None = None
    prompt: str | None = None
    crop: Literal["center", "random"] = "center"
    flip: bool = False
    color_jitter: bool = False
    use_masks: bool = False
    inpainting: bool = False
    on_bad_files: Literal["error", "skip"] = "error"
    buckets: Buckets | None = None
    templates: list[str] = field(init=False, default_factory=list)

    def __post_init__(self):
        if not isinstance(self.resolution, int) or self.resolution < 8:
            raise ValueError(f"resolution={self.resolution!r} must be an integer >= 8")
        if self.buckets is not None and self.buckets.resolution != self.resolution:
            raise ValueError(
                f"buckets are for resolution {self.buckets.resolution}, the dataset's is {self.resolution}"
            )
        if self.crop not in ("center", "random"):
            raise ValueError(f"crop={self.crop!r} is not one of 'center', 'random'")
        if isinstance(self.template, str):
            if self.template not in ("object", "style", "none"):
                raise ValueError(f"template={self.template!r} is not one of 'object', 'style', 'none' or a list")
            self.templates = list(TEMPLATES.get(self.template, []))
        else:
            self.templates = [str(t) for t in self.template]
            bad = [t for t in self.templates if t.count("{}") != 1]
            if not self.templates or bad:
                raise ValueError(f"template list {self.template!r}: every template needs exactly one '{{}}'")
        if self.templates and not self.placeholder_tokens:
            raise ValueError(f"template={self.template!r} needs placeholder_tokens to fill in")
        if self.token_map is not None and (self.token_map.count("|") != 1 or "" in self.token_map.split("|")):
            raise ValueError(f"placeholder_token_at_data={self.token_map!r} must look like 'word|<s1><s2>'")

    @property
    def augments(self) -> bool:
        """True when samples differ between epochs (then latents cannot be cached)."""
        return self.crop == "random" or self.flip or self.color_jitter


class ImageDataset:
    """Decoded, resized images and their prompts; `sample(i, generator)` draws one augmented sample.

    A sample is a dict: "pixel_values" (3, R, R) in [-1, 1], "prompt" str, "original_size" (h, w) of the
    image file and "crop_top_left" (top, left) of the crop in the resized (and flipped) image, both (2,)
    long (SDXL's micro-conditioning), optionally "mask" (1, R, R) in [0, 1], and for inpainting
    "inpaint_mask" (1, R, R) and "masked_image" (3, R, R).
    """

    def __init__(self, config: DatasetConfig):
        self.config = config
        self.examples = scan_folder(config.data_dir, config.on_bad_files)
        if config.use_masks:
            missing = [e.image.name for e in self.examples if e.mask is None]
            if missing:
                raise ValueError(
                    f"use_masks: no `<name>{MASK_SUFFIX}` mask for {missing} in {config.data_dir} "
                    "(make them with preprocessing, or train without masks)"
                )
        res = config.resolution
        small = []
        self.images: list[torch.Tensor] = []  # (3, h, w) uint8, just covering the image's training size
        self.original_sizes: list[tuple[int, int]] = []  # (h, w) before resizing
        self.sizes: list[tuple[int, int]] = []  # (h, w) of each image's training crop: its bucket, or res x res
        self.masks: list[torch.Tensor | None] = []  # (1, h, w) uint8
        for ex in self.examples:
            img = load_image(ex.image)
            target = config.buckets.nearest((img.height, img.width)) if config.buckets else (res, res)
            if img.height < target[0] or img.width < target[1]:
                small.append(f"{ex.image.name} {img.size[0]}x{img.size[1]}")
            size = _cover(img.size, target)
            self.sizes.append(target)
            self.original_sizes.append((img.height, img.width))
            self.images.append(_to_uint8_tensor(img.resize(size, Image.Resampling.BICUBIC)))
            if config.use_masks:
                mask = load_mask(ex.mask)
                if mask.size != img.size:
                    raise ValueError(f"mask {ex.mask.name} is {mask.size}, its image is {img.size}; they must match")
                self.masks.append(_to_uint8_tensor(mask.resize(size, Image.Resampling.NEAREST)))
            else:
                self.masks.append(None)
        if small:
            warnings.warn(
                f"{len(small)} image(s) smaller than their training size are upscaled: {', '.join(small)}",
                stacklevel=2,
            )
        self.prompts = [self._base_prompt(ex) for ex in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def batch_sampler(self, batch_size: int, seed: int) -> BatchSampler:
        """Shuffled batches of indices: within one bucket each when the dataset has buckets."""
        if self.config.buckets is None:
            return BatchSampler(len(self), batch_size, seed)
        return BucketBatchSampler(self.sizes, batch_size, seed)

    # ---- prompts -------------------------------------------------------------------------------------
    def _base_prompt(self, ex: Example) -> str | None:
        """The caption of one image (None when prompts come from templates)."""
        cfg = self.config
        if cfg.prompt is not None:
            return cfg.prompt
        if cfg.templates:
            return None
        text = ex.caption if ex.caption is not None else caption_from_filename(ex.image)
        if cfg.token_map is not None:
            word, tokens = cfg.token_map.split("|")
            text = text.replace(word, tokens)
        return text

    def prompt(self, index: int, generator: torch.Generator | None = None) -> str:
        """The prompt of image `index`; a template is drawn from `generator` when templates are used."""
        if self.prompts[index] is not None:
            return self.prompts[index]
        k = int(torch.randint(len(self.config.templates), (1,), generator=generator))
        return self.config.templates[k].format("".join(self.config.placeholder_tokens))

    def all_prompts(self) -> list[str]:
        """Every prompt a sample can have (for caching text embeddings)."""
        if self.config.templates and self.config.prompt is None:
            return [t.format("".join(self.config.placeholder_tokens)) for t in self.config.templates]
        return sorted(set(self.prompts))

    # ---- samples -------------------------------------------------------------------------------------
    def sample(self, index: int, generator: torch.Generator | None = None) -> dict:
        """One augmented sample of image `index`; all randomness comes from `generator`."""
        cfg, (th, tw) = self.config, self.sizes[index]
        image, mask = self.images[index], self.masks[index]
        _, h, w = image.shape
        if cfg.crop == "random":
            top = int(torch.randint(h - th + 1, (1,), generator=generator))
            left = int(torch.randint(w - tw + 1, (1,), generator=generator))
        else:
            top, left = (h - th) // 2, (w - tw) // 2
        image = image[:, top : top + th, left : left + tw]
        mask = mask[:, top : top + th, left : left + tw] if mask is not None else None
        if cfg.flip and bool(torch.rand(1, generator=generator) < 0.5):
            image = image.flip(-1)
            mask = mask.flip(-1) if mask is not None else None
            left = w - tw - left  # where the crop starts in the flipped image
        pixels = image.float() / 127.5 - 1.0  # (3, th, tw) in [-1, 1]
        if cfg.color_jitter:
            brightness, contrast = (0.9 + 0.2 * torch.rand(2, generator=generator)).tolist()
            pixels = (pixels + 1.0) * brightness - 1.0
            mean = pixels.mean()
            pixels = ((pixels - mean) * contrast + mean).clamp(-1.0, 1.0)
        out = {
            "pixel_values": pixels.contiguous(),
            "prompt": self.prompt(index, generator),
            "original_size": torch.tensor(self.original_sizes[index]),
            "crop_top_left": torch.tensor((top, left)),
        }
        if mask is not None:
            out["mask"] = (mask.float() / 255.0).contiguous()
        if cfg.inpainting:
            hole = random_inpaint_mask((th, tw), generator)
            out["inpaint_mask"] = hole
            out["masked_image"] = pixels * (hole < 0.5)
        return out


def random_inpaint_mask(size: int | tuple[int, int], generator: torch.Generator | None = None) -> torch.Tensor:
    """A (1, h, w) mask (`size` = h = w, or (h, w)) of 1-4 random rectangular holes (1 = to inpaint); 25% of the
    time all ones.

    As the original trainer: the UNet learns both to fill holes and to paint from a blank canvas.
    """
    h, w = (size, size) if isinstance(size, int) else size
    mask = torch.zeros(1, h, w)
    if float(torch.rand(1, generator=generator)) < 0.25:
        return mask.fill_(1.0)
    holes = int(torch.randint(1, 5, (1,), generator=generator))
    for _ in range(holes):
        if h == w:
            hh, ww = (torch.randint(h // 8, h // 2 + 1, (2,), generator=generator)).tolist()
        else:
            hh = int(torch.randint(h // 8, h // 2 + 1, (1,), generator=generator))
            ww = int(torch.randint(w // 8, w // 2 + 1, (1,), generator=generator))
        top = int(torch.randint(0, h - hh + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - ww + 1, (1,), generator=generator))
        mask[:, top : top + hh, left : left + ww] = 1.0
    return mask


def collate(samples: list[dict]) -> dict:
    """Stack samples into a batch; prompts stay a list of strings."""
    out = {"prompt": [s["prompt"] for s in samples]}
    for key in samples[0]:
        if key != "prompt":
            out[key] = torch.stack([s[key] for s in samples])
    return out


def _cover(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The (w, h) an image of PIL `size` (w, h) is resized to so that it just covers `target` (h, w)."""
    w, h = size
    scale = max(target[0] / h, target[1] / w)
    return max(target[1], round(w * scale)), max(target[0], round(h * scale))


def _to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()  # (c, h, w)
