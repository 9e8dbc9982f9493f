"""The shapes world's classifier: what shape, colour and style an image shows, or "none" of the shapes.

A small CNN with three heads, trained on fresh renders of every concept (held-out ones included) and on
images that show no single shape (noise, blobs, pieces, several shapes), so that a broken model's output
is called "none" instead of a shape. It is the judge of the quality benchmark: subject fidelity is the
share of generated images it calls the learned concept.

Saved as `config.json` + `model.safetensors` in a folder (`save` / `ShapesEvaluator.from_pretrained`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from .world import ALL_SHAPES, COLOURS, SIZE, STYLES

NONE = "none"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class EvaluatorConfig:
    """Args:
    shapes / colours / styles: the label names of each head ("none" is the last shape label).
    width: channels of the first convolution (doubled twice).
    image_size: input side in pixels (images are resized to it).
    """

    shapes: list[str] = field(default_factory=lambda: [*ALL_SHAPES, NONE])
    colours: list[str] = field(default_factory=lambda: list(COLOURS))
    styles: list[str] = field(default_factory=lambda: list(STYLES))
    width: int = 32
    image_size: int = SIZE

    def __post_init__(self):
        if not isinstance(self.width, int) or self.width < 4:
            raise ValueError(f"width={self.width!r} must be an integer >= 4")
        if NONE not in self.shapes:
            raise ValueError(f"shapes={self.shapes!r} must include {NONE!r}")


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.GroupNorm(8, c_out),
        nn.SiLU(),
        nn.MaxPool2d(2),
    )


class ShapesEvaluator(nn.Module):
    """(b, 3, s, s) images in [-1, 1] -> {"shape": (b, n_shapes), "colour": ..., "style": ...} logits."""

    def __init__(self, config: EvaluatorConfig | None = None):
        super().__init__()
        self.config = config or EvaluatorConfig()
        w = self.config.width
        self.features = nn.Sequential(_block(3, w), _block(w, 2 * w), _block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1))
        self.heads = nn.ModuleDict(
            {
                "shape": nn.Linear(4 * w, len(self.config.shapes)),
                "colour": nn.Linear(4 * w, len(self.config.colours)),
                "style": nn.Linear(4 * w, len(self.config.styles)),
            }
        )

    def labels(self, head: str) -> list[str]:
        return {"shape": self.config.shapes, "colour": self.config.colours, "style": self.config.styles}[head]

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(pixels).flatten(1)  # (b, 4w)
        return {name: head(h) for name, head in self.heads.items()}

    def to_pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(b, 3, s, s) in [-1, 1] from PIL images of any size (resized to `image_size`)."""
        s = self.config.image_size
        arrays = [np.asarray(img.convert("RGB").resize((s, s), Image.Resampling.BILINEAR)) for img in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        device = next(self.parameters()).device
        return x.to(device)

    @torch.no_grad()
    def classify(self, images: Sequence[Image.Image], batch_size: int = 256) -> list[dict[str, str]]:
        """One {"shape", "colour", "style"} prediction per image (colour and style mean nothing for "none")."""
        was_training = self.training
        self.eval()
        out: list[dict[str, str]] = []
        for i in range(0, len(images), batch_size):
            logits = self(self.to_pixels(images[i : i + batch_size]))
            picks = {k: v.argmax(-1).tolist() for k, v in logits.items()}
            for j in range(len(picks["shape"])):
                out.append({k: self.labels(k)[picks[k][j]] for k in picks})
        self.train(was_training)
        return out

    def save_pretrained(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt", "model": "ShapesEvaluator"})
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> ShapesEvaluator:
        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"evaluator model {str(directory)!r}: expected a folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
            )
        try:
            config = EvaluatorConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        except (TypeError, json.JSONDecodeError) as exc:
            raise ValueError(f"evaluator model {str(directory)!r}: bad {CONFIG_NAME}: {exc}") from None
        model = cls(config)
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.to(device).eval()
