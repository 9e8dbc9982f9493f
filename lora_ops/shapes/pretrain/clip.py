"""The world's CLIP (contrastive image -> caption) for CLIP-T and CLIP-I, trained and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..world import SIZE, all_specs, caption, render
from .config import SCORER_TEXT, SCORER_VISION, PretrainConfig
from .data import cosine_lr, degrade, normalize, progress_bar, world_batch


def train_clip(cfg: PretrainConfig, tokenizer, rng: np.random.Generator, gen: torch.Generator):
    """CLIPModel + CLIPProcessor trained image -> caption over every caption of the world."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}),
        tokenizer=tokenizer,
    )
    model = CLIPModel(CLIPConfig(text_config=SCORER_TEXT, vision_config=SCORER_VISION, projection_dim=64))
    specs = all_specs()
    captions = [caption(s) for s in specs]
    tokens = tokenizer(captions, padding=True, return_tensors="pt")
    ip = processor.image_processor
    total = cfg.steps("clip")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
    for step in (bar := progress_bar(total, "clip", cfg.progress)):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * cosine_lr(step, total, warmup=50)
        x, picked = world_batch(rng, 2 * cfg.batch_size, specs)
        target = torch.tensor([specs.index(s) for s in picked])
        pixels = normalize(degrade(x, gen), ip.image_mean, ip.image_std)
        img = F.normalize(_pooled(model.get_image_features(pixel_values=pixels)), dim=-1)
        txt = F.normalize(_pooled(model.get_text_features(**tokens)), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T  # (b, n_captions)
        loss = F.cross_entropy(logits, target)
        # the text side: each caption's images in the batch against the others (symmetric CLIP loss)
        present = target.unique()
        t_logits = logits.T[present]  # (k, b)
        t_target = (target[None, :] == present[:, None]).float()
        loss = loss + (-(t_target / t_target.sum(1, keepdim=True)) * t_logits.log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval(), processor


def _pooled(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def check_clip(clip_dir: Path, n: int, seed: int) -> dict[str, float]:
    """How often the CLIP gives a fresh render its own caption among every caption of the world."""
    from ...metrics import ClipScorer

    scorer = ClipScorer(clip_dir)
    rng = np.random.default_rng(seed)
    specs = all_specs()
    picked = [specs[i % len(specs)] for i in range(n)]
    image = scorer.image_embeds([render(s, rng) for s in picked])
    text = scorer.text_embeds([caption(s) for s in specs])
    best = (image @ text.T).argmax(-1)
    return {"caption_accuracy": float(np.mean([specs[int(b)] == s for b, s in zip(best, picked)]))}
