"""Subject masks for a dataset: CLIPSeg text-prompted segmentation, face detection, and square crops.

Masks are "L" images, 255 where the subject is. They weight the training loss and place the crop: the
square crop is centered on the mask's center of mass, as the original `lora_ppim` did.

Face masks use OpenCV's Haar cascade (`opencv-python-headless<5`), whose model file ships inside the
package. mediapipe 1.x no longer ships its face-detection model (its Tasks API downloads a .tflite at
run time), which no offline machine can do.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from .captioning import load_pretrained


class ClipSegMasker:
    """Masks for text prompts with CLIPSeg (transformers `CLIPSegForImageSegmentation`).

    Args:
        model: hub id or local folder of the model and its CLIPSegProcessor.
        prompts: phrases naming the subject ("face", "the dog"); the mask is their union (max).
        temperature: divides the logits before the sigmoid (>1 softer, <1 sharper).
        threshold: None for a soft mask (probability scaled so the maximum is 255), or a probability in
            (0, 1) for a binary mask.
    """

    def __init__(
        self,
        model: str | Path,
        prompts: Sequence[str],
        temperature: float = 1.0,
        threshold: float | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

        prompts = [p.strip() for p in prompts]
        if not prompts or not all(prompts):
            raise ValueError(f"mask_prompts={list(prompts)!r} must be one or more non-empty phrases")
        if not temperature > 0:
            raise ValueError(f"mask_temperature={temperature!r} must be positive")
        if threshold is not None and not 0.0 < threshold < 1.0:
            raise ValueError(f"mask_threshold={threshold!r} must be in (0, 1) or None")
        self.name, self.prompts, self.temperature, self.threshold = str(model), prompts, temperature, threshold
        self.processor = load_pretrained(CLIPSegProcessor, "mask_model", model)
        self.model = load_pretrained(CLIPSegForImageSegmentation, "mask_model", model, dtype=dtype)
        self.model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def __call__(self, image: Image.Image) -> Image.Image:
        n = len(self.prompts)
        inputs = self.processor(text=self.prompts, images=[image] * n, padding=True, return_tensors="pt")
        inputs = inputs.to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        logits = self.model(**inputs).logits.float().reshape(n, *inputs["pixel_values"].shape[-2:])  # (n, h, w)
        prob = torch.sigmoid(logits / self.temperature).amax(dim=0)  # (h, w)
        if self.threshold is None:
            mask = prob / prob.max().clamp_min(1e-6)
        else:
            mask = (prob >= self.threshold).float()
        mask = Image.fromarray((mask.cpu().numpy() * 255).round().astype(np.uint8), "L")
        resample = Image.Resampling.NEAREST if self.threshold is not None else Image.Resampling.BILINEAR
        return mask.resize(image.size, resample)


class FaceMasker:
    """Elliptic masks over the faces OpenCV's frontal-face Haar cascade finds (blurred edges).

    Args:
        scale: how much larger than the detected box the ellipse is.
        min_face: smallest face side, as a fraction of the image's shorter side.
    """

    name = "opencv:haarcascade_frontalface_default"

    def __init__(self, scale: float = 1.3, min_face: float = 0.1):
        try:
            import cv2
        except ImportError:
            raise RuntimeError(
                "face masks need OpenCV: pip install 'lora-pipeline[preprocess]' (opencv-python-headless<5)"
            ) from None
        path = Path(getattr(getattr(cv2, "data", None), "haarcascades", "")) / "haarcascade_frontalface_default.xml"
        if not path.is_file():
            raise RuntimeError(f"OpenCV {cv2.__version__} ships no Haar cascades; install opencv-python-headless<5")
        self.cv2, self.cascade = cv2, cv2.CascadeClassifier(str(path))
        self.scale, self.min_face = scale, min_face

    def boxes(self, image: Image.Image) -> list[tuple[int, int, int, int]]:
        """Face boxes (x, y, w, h), largest first."""
        gray = np.asarray(image.convert("L"))
        side = max(1, int(self.min_face * min(gray.shape)))
        found = self.cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(side, side))
        return sorted((tuple(int(v) for v in b) for b in found), key=lambda b: -b[2] * b[3])

    def __call__(self, image: Image.Image) -> Image.Image:
        mask = Image.new("L", image.size, 0)
        draw = ImageDraw.Draw(mask)
        for x, y, w, h in self.boxes(image):
            cx, cy, rx, ry = x + w / 2, y + h / 2, w * self.scale / 2, h * self.scale / 2
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
        return mask.filter(ImageFilter.GaussianBlur(radius=max(1, min(image.size) // 100)))


def center_of_mass(mask: Image.Image) -> tuple[float, float]:
    """(x, y) of the mask's center of mass in pixels; the image center for an empty mask."""
    weights = np.asarray(mask.convert("L"), dtype=np.float64)  # (h, w)
    total = weights.sum()
    h, w = weights.shape
    if total <= 0:
        return (w / 2, h / 2)
    ys, xs = np.arange(h) + 0.5, np.arange(w) + 0.5
    return (float(weights.sum(0) @ xs / total), float(weights.sum(1) @ ys / total))


def square_box(size: tuple[int, int], center: tuple[float, float]) -> tuple[int, int, int, int]:
    """The largest square inside an image of `size` (w, h), centered as near `center` as fits."""
    w, h = size
    side = min(w, h)
    left = int(round(min(max(center[0] - side / 2, 0), w - side)))
    top = int(round(min(max(center[1] - side / 2, 0), h - side)))
    return (left, top, left + side, top + side)
