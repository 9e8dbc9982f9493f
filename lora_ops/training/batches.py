"""Training batches: `Source`s of images (dataset, sampler, loss weight, cached latents) drawn into micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dataset import BatchSampler, ImageDataset, collate
from .trainee import Trainee, encode_images, sdxl_time_ids


@dataclass
class Source:
    """One stream of training samples: a dataset, its sampler and the weight of its loss."""

    dataset: ImageDataset
    weight: float = 1.0
    sampler: BatchSampler | None = None
    latents: list[torch.Tensor] | None = None  # cached (1, 4, h, w) per image


def cache_latents(trainee: Trainee, source: Source, seed: int) -> None:
    """Encode every image once (one latent sample each, from a generator seeded by `seed`)."""
    generator = torch.Generator().manual_seed(seed)
    source.latents = [
        encode_images(trainee.vae, source.dataset.sample(i)["pixel_values"][None], generator, trainee.device)
        for i in range(len(source.dataset))
    ]


def build_batch(trainee: Trainee, sources: list[Source], batch_size: int, aug: torch.Generator, noise_gen) -> dict:
    """Draw one micro-batch from every source: latents, prompts, weights, masks, inpainting inputs, and
    SDXL's size conditioning."""
    latents, prompts, weights, masks, inpaint, time_ids = [], [], [], [], [], []
    for source in sources:
        idx = source.sampler.next()
        samples = [source.dataset.sample(i, aug) for i in idx]
        batch = collate(samples)
        if source.latents is not None:
            latents.append(torch.cat([source.latents[i] for i in idx]))
        else:
            latents.append(encode_images(trainee.vae, batch["pixel_values"], noise_gen, trainee.device))
        prompts += batch["prompt"]
        time_ids.append(sdxl_time_ids(batch))
        weights += [source.weight / batch_size] * len(idx)
        masks.append(batch.get("mask", torch.ones(len(idx), 1, *batch["pixel_values"].shape[-2:])))
        if "inpaint_mask" in batch:
            masked = encode_images(trainee.vae, batch["masked_image"], noise_gen, trainee.device)
            hole = torch.nn.functional.interpolate(batch["inpaint_mask"], size=masked.shape[-2:]).to(masked)
            inpaint.append(torch.cat([hole, masked], dim=1))
    out = {
        "latents": torch.cat(latents),
        "prompts": prompts,
        "sample_weights": torch.tensor(weights, device=trainee.device),
        "masks": torch.cat(masks) if any(s.dataset.config.use_masks for s in sources) else None,
        "inpaint_cond": torch.cat(inpaint) if inpaint else None,
        "time_ids": torch.cat(time_ids).to(trainee.device) if trainee.sdxl else None,
    }
    return out


def join_batches(batches: list[dict], accum: int) -> dict:
    """The micro-batches of one optimizer step as one batch whose loss is the mean of theirs.

    Every loss term is per sample (GroupNorm and LayerNorm normalise within a sample), so the loss of the
    joined batch with sample weights divided by `accum` equals the sum of the micro-batch losses / accum,
    and so does its gradient.
    """

    def cat(key):
        values = [b[key] for b in batches]
        return None if values[0] is None else torch.cat(values)

    keys = ("latents", "noise", "timesteps", "masks", "pixel_weights", "inpaint_cond", "time_ids")
    out = {key: cat(key) for key in keys}
    out["sample_weights"] = torch.cat([b["sample_weights"] for b in batches]) / accum
    out["prompts"] = [p for b in batches for p in b["prompts"]]
    return out
