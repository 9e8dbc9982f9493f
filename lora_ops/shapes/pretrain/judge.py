"""The evaluator (the world's judge: shape incl. "none", colour, style), trained and checked."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluator import NONE, EvaluatorConfig, ShapesEvaluator
from ..world import all_specs, render, render_none
from .config import PretrainConfig
from .data import cosine_lr, degrade, labels_for, progress_bar, world_batch


def _through_vae(vae, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Half the batch decoded from perturbed VAE latents: the artifacts of generated images (grain, halos,
    tinted backgrounds), so the evaluator judges what a generated image shows, not how it was made."""
    half = x.shape[0] // 2
    with torch.no_grad():
        z = vae.encode(x[:half]).latent_dist.mean  # (h, 4, s/2, s/2)
        sigma = torch.rand(half, 1, 1, 1, generator=gen) * 0.5 * z.std()
        decoded = vae.decode(z + sigma * torch.randn(z.shape, generator=gen)).sample.clamp(-1, 1)
    return torch.cat([decoded, x[half:]])


def train_evaluator(cfg: PretrainConfig, vae, rng: np.random.Generator, gen: torch.Generator) -> ShapesEvaluator:
    model = ShapesEvaluator(EvaluatorConfig())
    total = cfg.steps("evaluator")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    specs = all_specs()
    for step in (bar := progress_bar(total, "evaluator", cfg.progress)):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * cosine_lr(step, total, warmup=50)
        x, picked = world_batch(rng, 2 * cfg.batch_size, specs, none_share=0.2)
        logits, labels = model(degrade(_through_vae(vae, x, gen), gen)), labels_for(model, picked)
        loss = sum(F.cross_entropy(logits[k], labels[k], ignore_index=-100) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


def check_evaluator(evaluator: ShapesEvaluator, n: int, seed: int) -> dict[str, float]:
    """Accuracy on fresh renders of every concept (shape, colour, style all right) and on "none" images."""
    rng = np.random.default_rng(seed)
    specs = all_specs()
    picked = [specs[i % len(specs)] for i in range(n)]
    preds = evaluator.classify([render(s, rng) for s in picked])
    right = [p == {"shape": s.shape, "colour": s.colour, "style": s.style} for p, s in zip(preds, picked)]
    nones = evaluator.classify([render_none(rng) for _ in range(n // 2)])
    return {
        "accuracy": float(np.mean(right)),
        "none_accuracy": float(np.mean([p["shape"] == NONE for p in nones])),
    }
