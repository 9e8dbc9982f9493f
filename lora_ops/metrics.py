"""Subject-fidelity metrics in the DreamBooth paper's conventions.

- CLIP-T: cosine similarity between the CLIP embeddings of a prompt and an image generated from it.
- CLIP-I: mean cosine similarity between the CLIP image embeddings of a generated image and of every
  instance (training) image.
- DINO: the same with the CLS token of a self-supervised ViT (DINO), which separates subjects of one class
  better than CLIP.
All are cosines, so in [-1, 1]; higher is better.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .captioning import load_pretrained


def _features(out) -> torch.Tensor:
    # transformers < 5 returns the projected tensor, >= 5 an output whose pooler_output is projected
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """Normalized CLIP image and text embeddings (transformers `CLIPModel` + `CLIPProcessor`)."""

    def __init__(self, model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import CLIPModel, CLIPProcessor

        self.name = str(model)
        self.processor = load_pretrained(CLIPProcessor, "clip_model", model)
        self.model = load_pretrained(CLIPModel, "clip_model", model, dtype=dtype).to(device).eval()
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, d) unit vectors."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return F.normalize(_features(out).float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, texts: Sequence[str]) -> torch.Tensor:
        """(n, d) unit vectors; texts longer than CLIP's context are truncated."""
        tokens = self.processor(text=list(texts), padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        return F.normalize(_features(out).float(), dim=-1).cpu()


class DinoScorer:
    """Normalized CLS embeddings of a ViT (e.g. facebook/dino-vits16) with its image processor."""

    def __init__(self, model: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoImageProcessor, ViTModel

        self.name = str(model)
        self.processor = load_pretrained(AutoImageProcessor, "dino_model", model)
        self.model = load_pretrained(ViTModel, "dino_model", model, dtype=dtype, add_pooling_layer=False)
        self.model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def image_embeds(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(n, d) unit vectors of the CLS token."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        hidden = self.model(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state  # (n, 1 + patches, d)
        return F.normalize(hidden[:, 0].float(), dim=-1).cpu()


def pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosines of unit vectors a (n, d) and b (m, d), clamped to [-1, 1] against rounding."""
    return (a @ b.T).clamp(-1.0, 1.0)


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """(n,) cosine of each image with its own prompt (row i with row i)."""
    return (image_embeds * text_embeds).sum(-1).clamp(-1.0, 1.0)


def mean_similarity(image_embeds: torch.Tensor, reference_embeds: torch.Tensor) -> torch.Tensor:
    """(n,) mean cosine of each image with every reference image (CLIP-I, DINO)."""
    return pairwise_cosine(image_embeds, reference_embeds).mean(-1)
