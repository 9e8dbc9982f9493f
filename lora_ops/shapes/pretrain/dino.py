"""The DINO slot: a ViT whose CLS token is trained on shape, colour and style."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluator import EvaluatorConfig, ShapesEvaluator
from ..world import SIZE, all_specs
from .config import SCORER_VISION, PretrainConfig
from .data import cosine_lr, degrade, labels_for, normalize, progress_bar, world_batch


def train_dino(cfg: PretrainConfig, rng: np.random.Generator, gen: torch.Generator):
    """A ViTModel whose CLS token is trained (through linear heads, then dropped) on shape/colour/style."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE}, do_center_crop=False)
    vit = ViTModel(ViTConfig(**SCORER_VISION), add_pooling_layer=False)
    probe = ShapesEvaluator(EvaluatorConfig())  # only for its label lists
    heads = torch.nn.ModuleDict(
        {k: torch.nn.Linear(SCORER_VISION["hidden_size"], len(probe.labels(k))) for k in ("shape", "colour", "style")}
    )
    specs = all_specs()
    total = cfg.steps("dino")
    opt = torch.optim.AdamW([*vit.parameters(), *heads.parameters()], lr=1e-3, weight_decay=1e-2)
    for step in (bar := progress_bar(total, "dino", cfg.progress)):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * cosine_lr(step, total, warmup=50)
        x, picked = world_batch(rng, 2 * cfg.batch_size, specs, none_share=0.1)
        pixels = normalize(degrade(x, gen), processor.image_mean, processor.image_std)
        cls = vit(pixel_values=pixels).last_hidden_state[:, 0]
        labels = labels_for(probe, picked)
        loss = sum(F.cross_entropy(heads[k](cls), labels[k], ignore_index=-100) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return vit.eval(), processor
