"""Training batches of the world: fresh renders, their labels, degradations, the learning-rate schedule."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..evaluator import NONE, ShapesEvaluator
from ..world import Spec, render, render_none


def to_tensor(images) -> torch.Tensor:
    """(b, 3, s, s) in [-1, 1] from PIL images."""
    arr = np.stack([np.asarray(im) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def world_batch(rng: np.random.Generator, n: int, specs: list[Spec], none_share: float = 0.0):
    """n fresh renders: (pixels (n, 3, s, s), specs with None for a "none" image)."""
    images, picked = [], []
    for _ in range(n):
        if rng.random() < none_share:
            images.append(render_none(rng))
            picked.append(None)
        else:
            spec = specs[int(rng.integers(len(specs)))]
            images.append(render(spec, rng))
            picked.append(spec)
    return to_tensor(images), picked


def degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Make part of the batch look generated (blur, washed-out contrast, fine and blotchy noise), so that
    scorers judge shapes, colours and styles, not crispness."""
    b, c, h, w = x.shape

    def some(p: float) -> torch.Tensor:
        return (torch.rand(b, 1, 1, 1, generator=gen) < p).float()

    blurred = F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="bilinear", align_corners=False)
    pick = some(0.3)
    x = pick * blurred + (1 - pick) * x
    contrast = 1 - some(0.3) * torch.rand(b, 1, 1, 1, generator=gen) * 0.35
    x = (x - x.mean((1, 2, 3), keepdim=True)) * contrast + x.mean((1, 2, 3), keepdim=True)
    fine = torch.rand(b, 1, 1, 1, generator=gen) * 0.12 * some(0.5)
    blotch = torch.rand(b, 1, 1, 1, generator=gen) * 0.15 * some(0.5)
    low = F.interpolate(torch.randn(b, c, h // 4, w // 4, generator=gen), size=(h, w), mode="bilinear")
    return (x + fine * torch.randn(x.shape, generator=gen) + blotch * low).clamp(-1, 1)


def cosine_lr(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def progress_bar(total: int, desc: str, enabled: bool):
    return tqdm(range(total), desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] pixels -> an image processor's normalisation."""
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def labels_for(model: ShapesEvaluator, picked: list[Spec | None]) -> dict[str, torch.Tensor]:
    shapes = model.labels("shape")
    return {
        "shape": torch.tensor([shapes.index(NONE if s is None else s.shape) for s in picked]),
        "colour": torch.tensor([-100 if s is None else model.labels("colour").index(s.colour) for s in picked]),
        "style": torch.tensor([-100 if s is None else model.labels("style").index(s.style) for s in picked]),
    }
