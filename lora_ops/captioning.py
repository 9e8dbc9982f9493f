"""Image captions with BLIP (transformers `BlipForConditionalGeneration`), plus prefix/token editing.

The model is chosen by hub id (e.g. "Salesforce/blip-image-captioning-base") or a local folder holding
the model and its processor. Decoding is greedy, so captions are deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image


def check_model_source(name: str, value: str | Path) -> str:
    """A hub id ("org/name") or an existing local folder; anything else is a clear ValueError."""
    value = str(value)
    path = Path(value)
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(f"{name}={value!r} is not a model folder (no config.json)")
        return value
    if value.count("/") != 1 or value.startswith(("/", ".")) or not all(value.split("/")):
        raise ValueError(f"{name}={value!r}: no such folder, and not a hub id of the form 'org/name'")
    return value


def load_pretrained(cls, name: str, source: str | Path, **kwargs):
    """`cls.from_pretrained(source)` with a one-line ValueError when the source cannot be loaded."""
    source = check_model_source(name, source)
    try:
        return cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ValueError(f"could not load {name}={source!r}: {str(exc).splitlines()[0]}") from None


class Captioner:
    """A BLIP captioning model with its processor, on `device`.

    Args:
        model: hub id or local folder of a BlipForConditionalGeneration and its BlipProcessor.
        max_new_tokens / min_new_tokens: caption length bounds in tokens.
        num_beams: beam search width (1: greedy).
    """

    def __init__(
        self,
        model: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_new_tokens: int = 40,
        min_new_tokens: int = 5,
        num_beams: int = 1,
    ):
        from transformers import BlipForConditionalGeneration, BlipProcessor

        if not 0 <= min_new_tokens <= max_new_tokens:
            raise ValueError(f"min_new_tokens={min_new_tokens} must be in [0, max_new_tokens={max_new_tokens}]")
        self.name = str(model)
        self.processor = load_pretrained(BlipProcessor, "caption_model", model)
        self.model = load_pretrained(BlipForConditionalGeneration, "caption_model", model, dtype=dtype)
        self.model.to(device).eval()
        self.device, self.dtype = torch.device(device), dtype
        self.generate_kwargs = dict(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=num_beams, do_sample=False
        )

    @torch.no_grad()
    def __call__(self, images: Sequence[Image.Image]) -> list[str]:
        inputs = self.processor(images=list(images), return_tensors="pt").to(self.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        out = self.model.generate(**inputs, **self.generate_kwargs)  # (batch, tokens)
        return [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]


def edit_caption(caption: str, prefix: str = "", token: str | None = None, substitute: Sequence[str] = ()) -> str:
    """Put the learned `token` in place of the first matching phrase of `substitute`, then add `prefix`.

    With `substitute` given and no phrase found, the token is put in front (", "-separated), so that every
    caption names the subject. Matching is on whole words, case-insensitive.
    """
    caption = caption.strip()
    if token and substitute:
        for phrase in substitute:
            pattern = re.compile(rf"\b{re.escape(phrase.strip())}\b", re.IGNORECASE)
            if phrase.strip() and pattern.search(caption):
                caption = pattern.sub(lambda _: token, caption, count=1)
                break
        else:
            caption = f"{token}, {caption}" if caption else token
    elif token:
        caption = f"{token}, {caption}" if caption else token
    if prefix:
        caption = f"{prefix.rstrip()} {caption}".strip()
    return caption
