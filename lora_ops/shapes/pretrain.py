"""Pretrain the shapes world: a Stable Diffusion (VAE, UNet, CLIP text encoder) and its scorers.

    lora-ops shapes pretrain --out DIR [--seed 0] [--steps-scale 1.0]

One seeded command trains, in order (each with a progress bar):
1. the VAE (AutoencoderKL) on fresh renders of every concept (a VAE that never saw a colour cannot draw it);
2. the evaluator (CNN: shape incl. "none", colour, style) on fresh renders of every concept, half of them
   decoded from perturbed VAE latents so that it knows what generated images look like;
3. the UNet and the CLIP text encoder together, from scratch, on the *known* concepts only (cached
   latents; captions "a red circle", 20% "a circle" without the colour and 10% empty for classifier-free
   guidance; min-SNR-5 weighting; EMA of the UNet);
4. a small CLIP (CLIPModel, contrastive image -> caption) for CLIP-T and CLIP-I;
5. a ViT (ViTModel, supervised on shape/colour/style) for the DINO slot;
then checks each against fresh renders and writes `manifest.json` (files with sha256, the command,
versions, wall times, check results) last.

The output is `DIR/sd` (a diffusers StableDiffusionPipeline folder), `DIR/clip`, `DIR/dino`,
`DIR/evaluator`. The shipped copy is `lora_ops/shapes/pretrained/`.
"""

from __future__ import annotations

import json
import math
import platform
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..hashing import sha256_file
from ..losses import min_snr_weights, per_sample_mse, prediction_target
from ..tiny import SCHEDULER_DEFAULTS, write_byte_level_tokenizer
from .evaluator import NONE, EvaluatorConfig, ShapesEvaluator
from .world import ALL_SHAPES, COLOURS, SIZE, STYLES, Spec, all_specs, caption, known_specs, render, render_none

VOCAB_SIZE = 1000
TEXT_WIDTH = 64

UNET_CONFIG = dict(
    sample_size=SIZE // 2,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=SIZE,
)
TEXT_CONFIG = dict(
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=3,
    num_attention_heads=4,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=TEXT_WIDTH,
    bos_token_id=VOCAB_SIZE - 2,
    eos_token_id=VOCAB_SIZE - 1,
    pad_token_id=VOCAB_SIZE - 1,
)
# SD's betas with a zero terminal SNR (Lin et al. 2024) and v-prediction. With SD's own schedule the terminal
# signal (sqrt(alpha_bar_T) = 0.068) times the latents' per-image mean (std 0.8 in one channel: the
# background) is as large as the mean of 16x16 noise (std 1/16), so the UNet learned to read the background
# and colour off the noise's mean, and drew washed-out or wrong-coloured images from the seeds whose mean
# pointed the wrong way (known accuracy 0.62-0.72; a schedule ending at beta 0.02 was worse, 0.31).
SCHEDULER_CONFIG = {k: v for k, v in SCHEDULER_DEFAULTS.items() if k != "_class_name"} | {
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
}
# the scorers: 32 px in 4 px patches
SCORER_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     image_size=SIZE, patch_size=4)  # fmt: skip
SCORER_TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    vocab_size=VOCAB_SIZE,
    max_position_embeddings=77,
    bos_token_id=VOCAB_SIZE - 2,
    eos_token_id=VOCAB_SIZE - 1,
    pad_token_id=VOCAB_SIZE - 1,
)
COMPONENTS = ("evaluator", "vae", "unet", "clip", "dino")


@dataclass
class PretrainConfig:
    """What `pretrain` does.

    Args:
        output_dir: where `sd/`, `clip/`, `dino/`, `evaluator/` and `manifest.json` go (must not exist or
            be empty unless `overwrite`).
        seed: seed of every random choice.
        steps_scale: multiplies every step count (0.01 for a smoke run).
        evaluator_steps / vae_steps / unet_steps / clip_steps / dino_steps: optimizer steps of each model.
        batch_size: images per step.
        latent_pool: known-concept renders encoded once for the UNet (cached latents).
        components: which models to train; the others are taken from the existing `output_dir` (each
            component draws from its own seeded generators, so a partial rebuild gives the same files as a
            full one; the UNet needs the VAE it is trained on).
        check_images: images per check (fresh renders; generated images for the base model).
        overwrite: replace a non-empty output_dir.
        progress: show progress bars.
    """

    output_dir: str | Path
    seed: int = 0
    steps_scale: float = 1.0
    evaluator_steps: int = 700
    vae_steps: int = 700
    unet_steps: int = 2400
    clip_steps: int = 3000
    dino_steps: int = 2000
    batch_size: int = 64
    latent_pool: int = 25000
    check_images: int = 200
    components: tuple[str, ...] = COMPONENTS
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        self.output_dir = Path(self.output_dir)
        self.components = tuple(self.components)
        bad = [c for c in self.components if c not in COMPONENTS]
        if bad or not self.components:
            raise ValueError(f"components={list(self.components)!r}: choose from {list(COMPONENTS)}")
        if set(self.components) != set(COMPONENTS) and not (self.output_dir / "manifest.json").is_file():
            raise ValueError(
                f"components={list(self.components)!r}: a partial rebuild needs the other models in "
                f"output_dir={str(self.output_dir)!r} (no manifest.json there)"
            )
        if "vae" in self.components and not {"unet", "evaluator"} <= set(self.components):
            raise ValueError("components: a new VAE needs a new UNet and evaluator (both are trained through it)")
        if not (isinstance(self.steps_scale, (int, float)) and 0 < self.steps_scale <= 100):
            raise ValueError(f"steps_scale={self.steps_scale!r} must be a number in (0, 100]")
        for name in ("evaluator_steps", "vae_steps", "unet_steps", "clip_steps", "dino_steps", "batch_size",
                     "latent_pool", "check_images"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        partial = set(self.components) != set(COMPONENTS)
        if self.output_dir.exists() and any(self.output_dir.iterdir()) and not self.overwrite and not partial:
            raise ValueError(f"output_dir={str(self.output_dir)!r} is not empty (pass overwrite=True / --overwrite)")

    def steps(self, name: str) -> int:
        return max(1, round(getattr(self, f"{name}_steps") * self.steps_scale))


# ---- data ----------------------------------------------------------------------------------------------


def _to_tensor(images) -> torch.Tensor:
    """(b, 3, s, s) in [-1, 1] from PIL images."""
    arr = np.stack([np.asarray(im) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _world_batch(rng: np.random.Generator, n: int, specs: list[Spec], none_share: float = 0.0):
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
    return _to_tensor(images), picked


def _degrade(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
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


def _cosine_lr(step: int, total: int, warmup: int = 100, floor: float = 0.1) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _bar(total: int, desc: str, enabled: bool):
    return tqdm(range(total), desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


# ---- 1. evaluator --------------------------------------------------------------------------------------


def _labels(model: ShapesEvaluator, picked: list[Spec | None]) -> dict[str, torch.Tensor]:
    shapes = model.labels("shape")
    return {
        "shape": torch.tensor([shapes.index(NONE if s is None else s.shape) for s in picked]),
        "colour": torch.tensor([-100 if s is None else model.labels("colour").index(s.colour) for s in picked]),
        "style": torch.tensor([-100 if s is None else model.labels("style").index(s.style) for s in picked]),
    }


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
    for step in (bar := _bar(total, "evaluator", cfg.progress)):
        for group in opt.param_groups:
            group["lr"] = 2e-3 * _cosine_lr(step, total, warmup=50)
        x, picked = _world_batch(rng, 2 * cfg.batch_size, specs, none_share=0.2)
        logits, labels = model(_degrade(_through_vae(vae, x, gen), gen)), _labels(model, picked)
        loss = sum(F.cross_entropy(logits[k], labels[k], ignore_index=-100) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


# ---- 2. VAE --------------------------------------------------------------------------------------------


def train_vae(cfg: PretrainConfig, rng: np.random.Generator, gen: torch.Generator):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**VAE_CONFIG)
    total = cfg.steps("vae")
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    specs = all_specs()
    for step in (bar := _bar(total, "vae", cfg.progress)):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * _cosine_lr(step, total, warmup=50)
        x, _ = _world_batch(rng, cfg.batch_size, specs, none_share=0.1)
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample()).sample
        mse = F.mse_loss(rec, x)
        loss = mse + 1e-7 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(mse=f"{mse.item():.4f}")
    vae.eval()
    # SD's convention: latents * scaling_factor have unit variance
    with torch.no_grad():
        x, _ = _world_batch(rng, 512, known_specs())
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae


# ---- 3. UNet + text encoder ----------------------------------------------------------------------------


def _tokenizer(directory: Path):
    from transformers import CLIPTokenizer

    write_byte_level_tokenizer(directory, VOCAB_SIZE)
    return CLIPTokenizer.from_pretrained(directory, model_max_length=77)


def train_unet(cfg: PretrainConfig, vae, tokenizer, rng: np.random.Generator, gen: torch.Generator):
    """UNet2DConditionModel + CLIPTextModel from scratch on the known concepts; returns (ema unet, text encoder)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    specs = known_specs()
    # per spec its caption; then per spec its shape alone ("a circle": any colour); last the empty caption
    captions = [caption(s) for s in specs] + [f"a {s.shape}" for s in specs] + [""]
    ids = tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids

    # cached latents: posterior mean and std of a fixed pool of renders
    n = cfg.latent_pool
    means, stds, labels = [], [], []
    with torch.no_grad():
        for _ in tqdm(range(0, n, 500), desc="encode latents", disable=not cfg.progress):
            picks = [int(rng.integers(len(specs))) for _ in range(500)]
            x = _to_tensor([render(specs[k], rng) for k in picks])
            dist = vae.encode(x).latent_dist
            means.append(dist.mean)
            stds.append(dist.std)
            labels += picks
    means, stds, labels = torch.cat(means)[:n], torch.cat(stds)[:n], torch.tensor(labels)[:n]
    scale = vae.config.scaling_factor

    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))
    ema = UNet2DConditionModel(**UNET_CONFIG)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    params = [{"params": unet.parameters(), "lr": 6e-4}, {"params": text_encoder.parameters(), "lr": 3e-4}]
    opt = torch.optim.AdamW(params, weight_decay=1e-2)
    base_lrs = [g["lr"] for g in opt.param_groups]
    total = cfg.steps("unet")
    unet.train()
    text_encoder.train()
    for step in (bar := _bar(total, "unet + text encoder", cfg.progress)):
        for group, lr in zip(opt.param_groups, base_lrs):
            group["lr"] = lr * _cosine_lr(step, total, warmup=200)
        idx = torch.randint(n, (cfg.batch_size,), generator=gen)
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scale
        cap = labels[idx].clone()
        u = torch.rand(cfg.batch_size, generator=gen)
        cap = torch.where(u < 0.2, cap + len(specs), cap)  # 20% without the colour
        cap[u > 0.9] = len(captions) - 1  # 10% unconditional, for classifier-free guidance
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        hidden = text_encoder(ids[cap])[0]
        pred = unet(noisy, t, hidden).sample
        target = prediction_target(noise_scheduler, latents, noise, t)
        loss = (min_snr_weights(noise_scheduler, t, 5.0) * per_sample_mse(pred, target)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([*unet.parameters(), *text_encoder.parameters()], 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, p in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return ema.eval(), text_encoder.eval()


def save_pipeline(directory: Path, vae, unet, text_encoder, tokenizer) -> Path:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(directory, safe_serialization=True)
    # a model loaded from disk (a partial rebuild) records where it came from: keep the folder portable
    for config in Path(directory).glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return directory


# ---- 4. CLIP -------------------------------------------------------------------------------------------


def _normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """[-1, 1] pixels -> an image processor's normalisation."""
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return ((x + 1) / 2 - mean) / std


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
    for step in (bar := _bar(total, "clip", cfg.progress)):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * _cosine_lr(step, total, warmup=50)
        x, picked = _world_batch(rng, 2 * cfg.batch_size, specs)
        target = torch.tensor([specs.index(s) for s in picked])
        pixels = _normalize(_degrade(x, gen), ip.image_mean, ip.image_std)
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


# ---- 5. DINO slot --------------------------------------------------------------------------------------


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
    for step in (bar := _bar(total, "dino", cfg.progress)):
        for group in opt.param_groups:
            group["lr"] = 1e-3 * _cosine_lr(step, total, warmup=50)
        x, picked = _world_batch(rng, 2 * cfg.batch_size, specs, none_share=0.1)
        pixels = _normalize(_degrade(x, gen), processor.image_mean, processor.image_std)
        cls = vit(pixel_values=pixels).last_hidden_state[:, 0]
        labels = _labels(probe, picked)
        loss = sum(F.cross_entropy(heads[k](cls), labels[k], ignore_index=-100) for k in heads)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return vit.eval(), processor


# ---- checks --------------------------------------------------------------------------------------------


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


def check_clip(clip_dir: Path, n: int, seed: int) -> dict[str, float]:
    """How often the CLIP gives a fresh render its own caption among every caption of the world."""
    from ..metrics import ClipScorer

    scorer = ClipScorer(clip_dir)
    rng = np.random.default_rng(seed)
    specs = all_specs()
    picked = [specs[i % len(specs)] for i in range(n)]
    image = scorer.image_embeds([render(s, rng) for s in picked])
    text = scorer.text_embeds([caption(s) for s in specs])
    best = (image @ text.T).argmax(-1)
    return {"caption_accuracy": float(np.mean([specs[int(b)] == s for b, s in zip(best, picked)]))}


# ---- the command ---------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
    }


def pretrain(config: PretrainConfig, command: str = "") -> Path:
    """Train the models of the shapes world into `config.output_dir`; returns the folder.

    `command` is recorded in the manifest (the command line that reproduces the run). Components not in
    `config.components` are copied from the existing output. Everything is written to a staging folder
    and moved into place at the end, manifest last.
    """
    from .quality import base_accuracy

    cfg = config
    t_start = time.monotonic()
    out = cfg.output_dir
    staging = out.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    previous = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    times: dict[str, float] = dict(previous.get("wall_seconds", {}))
    times.pop("total", None)

    def seeded(name: str):
        """Each component's own generators, so that components can be rebuilt one at a time."""
        k = COMPONENTS.index(name)
        torch.manual_seed(cfg.seed * 1000 + k)
        return np.random.default_rng([cfg.seed, k]), torch.Generator().manual_seed(cfg.seed * 1000 + k)

    def build(name: str, fn, *args):
        t0 = time.monotonic()
        result = fn(*args, *seeded(name))
        times[name] = round(time.monotonic() - t0, 1)
        return result

    def reuse(*parts: str) -> None:
        for part in parts:
            shutil.copytree(out / part, staging / part)

    try:
        tokenizer = _tokenizer(staging / ".tokenizer")
        if "vae" in cfg.components:
            vae = build("vae", train_vae, cfg)
        else:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(out / "sd" / "vae")
        if "evaluator" in cfg.components:
            build("evaluator", train_evaluator, cfg, vae).save_pretrained(staging / "evaluator")
        else:
            reuse("evaluator")
        if "unet" in cfg.components:
            unet, text_encoder = build("unet", train_unet, cfg, vae, tokenizer)
            save_pipeline(staging / "sd", vae, unet, text_encoder, tokenizer)
        else:
            reuse("sd")
        if "clip" in cfg.components:
            clip, processor = build("clip", train_clip, cfg, tokenizer)
            clip.save_pretrained(staging / "clip")
            processor.save_pretrained(staging / "clip")
        else:
            reuse("clip")
        if "dino" in cfg.components:
            vit, vit_processor = build("dino", train_dino, cfg)
            vit.save_pretrained(staging / "dino")
            vit_processor.save_pretrained(staging / "dino")
        else:
            reuse("dino")
        shutil.rmtree(staging / ".tokenizer")

        evaluator = ShapesEvaluator.from_pretrained(staging / "evaluator")
        n_seeds = max(1, cfg.check_images // 25)
        checks = {
            "evaluator": check_evaluator(evaluator, cfg.check_images, seed=cfg.seed + 7),
            "clip": check_clip(staging / "clip", cfg.check_images, seed=cfg.seed + 8),
            "base": base_accuracy(staging / "sd", staging / "evaluator", seeds=range(n_seeds)),
        }
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {
            "name": "shapes-world",
            "command": command,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items() if k != "output_dir"},
            "versions": _versions(),
            "machine": {"cpu_threads": torch.get_num_threads(), "platform": platform.platform()},
            "rebuilt": list(cfg.components),
            "wall_seconds": {**times, "this_run": round(time.monotonic() - t_start, 1)},
            "checks": checks,
            "concepts": {
                "shapes": list(ALL_SHAPES),
                "colours": list(COLOURS),
                "styles": list(STYLES),
                "known": [caption(s) for s in known_specs()],
            },
            "files": [
                {"path": p.relative_to(staging).as_posix(), "size": p.stat().st_size, "sha256": sha256_file(p)}
                for p in files
            ],
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # last: marks completion
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return out
