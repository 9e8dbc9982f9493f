"""Training batches: `Source`s of images (dataset, sampler, loss weight, cached latents) drawn into micro-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batching import BatchSampler
from ..dataset import ImageDataset, collate
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


def _by_size(batches: list[dict]) -> list[list[dict]]:
    """Batches grouped by the size of their latents, in order of first appearance."""
    groups: dict[tuple[int, ...], list[dict]] = {}
    for batch in batches:
        groups.setdefault(tuple(batch["latents"].shape[-2:]), []).append(batch)
    return list(groups.values())


def build_batch(
    trainee: Trainee, sources: list[Source], batch_size: int, aug: torch.Generator, noise_gen
) -> list[dict]:
    """Draw one micro-batch from every source: latents, prompts, weights, masks, inpainting inputs, and
    SDXL's size conditioning. Returned as one batch per image size: one without buckets; with buckets the
    sources' batches may differ in size, and each size is its own forward pass (the sample weights already
    give each sample its share of the step's loss)."""
    with_masks = any(s.dataset.config.use_masks for s in sources)
    parts = []
    for source in sources:
        idx = source.sampler.next()
        samples = [source.dataset.sample(i, aug) for i in idx]
        batch = collate(samples)
        if source.latents is not None:
            latents = torch.cat([source.latents[i] for i in idx])
        else:
            latents = encode_images(trainee.vae, batch["pixel_values"], noise_gen, trainee.device)
        inpaint = None
        if "inpaint_mask" in batch:
            masked = encode_images(trainee.vae, batch["masked_image"], noise_gen, trainee.device)
            hole = torch.nn.functional.interpolate(batch["inpaint_mask"], size=masked.shape[-2:]).to(masked)
            inpaint = torch.cat([hole, masked], dim=1)
        parts.append(
            {
                "latents": latents,
                "prompts": batch["prompt"],
                "sample_weights": [source.weight / batch_size] * len(idx),
                "masks": batch.get("mask", torch.ones(len(idx), 1, *batch["pixel_values"].shape[-2:])),
                "inpaint_cond": inpaint,
                "time_ids": sdxl_time_ids(batch),
            }
        )
    out = []
    for group in _by_size(parts):
        inpaint = [p["inpaint_cond"] for p in group if p["inpaint_cond"] is not None]
        out.append(
            {
                "latents": torch.cat([p["latents"] for p in group]),
                "prompts": [prompt for p in group for prompt in p["prompts"]],
                "sample_weights": torch.tensor([w for p in group for w in p["sample_weights"]], device=trainee.device),
                "masks": torch.cat([p["masks"] for p in group]) if with_masks else None,
                "inpaint_cond": torch.cat(inpaint) if inpaint else None,
                "time_ids": torch.cat([p["time_ids"] for p in group]).to(trainee.device) if trainee.sdxl else None,
            }
        )
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


def join_by_size(batches: list[dict], accum: int) -> list[dict]:
    """`join_batches` over the micro-batches of one step that share an image size (all of them without buckets)."""
    return [join_batches(group, accum) for group in _by_size(batches)]
