"""Subject-fidelity metrics in the DreamBooth paper's conventions.

- CLIP-T: cosine similarity between the CLIP embeddings of a prompt and an image generated from it.
- CLIP-I: mean cosine similarity between the CLIP image embeddings of a generated image and of every
  instance (training) image.
- DINO: the same with the CLS token of a self-supervised ViT (DINO), which separates subjects of one class
  better than CLIP.
All are cosines, so in [-1, 1]; higher is better. `ImageScores` computes every metric of a set of generated
images (and the shapes world's classifier metrics, when given one).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .captioning import load_pretrained
from .image_files import INPUT_SUFFIXES, list_images, load_image


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


class ImageScores:
    """Every metric of a set of generated images: CLIP-T against their texts, CLIP-I and DINO against the
    instance images (when `instance_dir` is given), and the optional classifier's (the shapes world's evaluator:
    `classifier` = the share it calls `classifier_target`, e.g. "shape=ring"; `classifier_prompt` = the share
    whose other labels named in the text are right)."""

    def __init__(
        self,
        clip_model,
        dino_model,
        device,
        dtype: torch.dtype,
        classifier_model=None,
        classifier_target: str | None = None,
        instance_dir=None,
    ):
        self.clip = ClipScorer(clip_model, device, dtype)
        self.dino = DinoScorer(dino_model, device, dtype) if dino_model else None
        self.classifier = self.target = None
        if classifier_model is not None:
            from .shapes.evaluator import ShapesEvaluator

            self.classifier = ShapesEvaluator.from_pretrained(classifier_model, device)
            if classifier_target is not None:
                head, _, label = classifier_target.partition("=")
                if label not in self.classifier.labels(head):
                    raise ValueError(
                        f"classifier_target={classifier_target!r}: {label!r} is not a {head} of the classifier "
                        f"({self.classifier.labels(head)})"
                    )
                self.target = (head, label)
        self.instance_clip = self.instance_dino = None
        if instance_dir is not None:
            files = list_images(instance_dir, INPUT_SUFFIXES)
            if not files:
                raise ValueError(f"instance_dir={str(instance_dir)!r} holds no images")
            instances = [load_image(p) for p in files]
            self.instance_clip = self.clip.image_embeds(instances)
            self.instance_dino = self.dino.image_embeds(instances) if self.dino else None
            self.instance_count = len(instances)

    def __call__(self, images, texts) -> dict[str, list[float]]:
        embeds = self.clip.image_embeds(images)
        out = {"clip_t": clip_t(embeds, self.clip.text_embeds(texts)).tolist()}
        if self.instance_clip is not None:
            out["clip_i"] = mean_similarity(embeds, self.instance_clip).tolist()
        if self.instance_dino is not None:
            out["dino"] = mean_similarity(self.dino.image_embeds(images), self.instance_dino).tolist()
        if self.classifier is not None:
            preds = self.classifier.classify(images)
            if self.target is not None:
                head, label = self.target
                out["classifier"] = [float(p[head] == label) for p in preds]
            out["classifier_prompt"] = [self._prompt_right(p, t) for p, t in zip(preds, texts, strict=True)]
        return out

    def _prompt_right(self, pred: dict[str, str], text: str) -> float:
        """1.0 when every label the text names (other than the target's head) is what the classifier sees."""
        words = set(re.findall(r"[a-z]+", text.lower()))
        for head in ("shape", "colour", "style"):
            if self.target is not None and head == self.target[0]:
                continue
            named = [label for label in self.classifier.labels(head) if label in words]
            if named and pred[head] not in named:
                return 0.0
        return 1.0
