"""The shapes world's model configurations and what one pretraining run does (`PretrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...tiny import SCHEDULER_DEFAULTS
from ..world import SIZE

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
    unet_steps: int = 4800  # 2400 reached known accuracy 0.94 but retention 0.66 after fine-tuning (docs/quality.md)
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
