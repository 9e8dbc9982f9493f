"""Fine-tuning recipes on the shapes world, each given the same step budget.

- "ti": textual inversion alone (PTI phase 1 only);
- "lora": LoRA alone (PTI phase 2 only, the token starting from the initializer word and not trained);
- "pti": pivotal tuning, `inversion_share` of the steps inversion (default half), the rest LoRA;
- "pti_extended": the same with extended LoRA (the ResNet convolutions too);
- "dreambooth": DreamBooth LoRA with a fixed instance prompt ("a sks circle");
- "dreambooth_prior": the same with prior preservation on base-generated class images ("a circle").

Every recipe writes one native LoRA file and returns its path and token; `RecipeConfig` holds what is
shared, everything else is the trainers' defaults (what the pipeline's invert and tune steps run). The
defaults are the ones the quality benchmark measured (docs/quality.md); `make demo` runs "pti" with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .world import Concept

Recipe = Literal["ti", "lora", "pti", "pti_extended", "dreambooth", "dreambooth_prior"]
RECIPES: tuple[str, ...] = ("ti", "lora", "pti", "pti_extended", "dreambooth", "dreambooth_prior")
DREAMBOOTH_TOKEN = "sks"


@dataclass
class RecipeConfig:
    """Shared settings of every recipe.

    Args:
        steps: optimizer steps in all (pivotal tuning splits them between its two phases).
        inversion_share: the share of `steps` pivotal tuning spends on inversion (phase 1), the rest on LoRA.
        rank: LoRA rank.
        batch_size: images per step.
        learning_rate_ti / learning_rate_unet / learning_rate_text: token, UNet LoRA and text-encoder LoRA
            learning rates.
        train_text_encoder: LoRA on the text encoder too.
        seed: seed of the training run.
        token: the learned token of the PTI recipes and the peers (e.g. "<s2>" for a second concept that
            will be merged with a first one).
        prior_per_concept: regularization images per known concept in the LoRA phase of the PTI recipes
            (rendered known concepts with their captions, `PTIConfig.prior_data_dir`); 0: none.
        prior_loss_weight: weight of those images' loss.
        progress: progress bars.
    """

    steps: int = 1600
    inversion_share: float = 0.5
    rank: int = 4
    batch_size: int = 4
    learning_rate_ti: float = 5e-3
    learning_rate_unet: float = 1e-3
    learning_rate_text: float = 1e-4
    train_text_encoder: bool = False
    seed: int = 0
    token: str = "<s1>"
    prior_per_concept: int = 2
    prior_loss_weight: float = 1.0
    progress: bool = False

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 2:
            raise ValueError(f"steps={self.steps!r} must be an integer >= 2")
        if not 0.0 < self.inversion_share < 1.0:
            raise ValueError(f"inversion_share={self.inversion_share!r} must be in (0, 1)")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank={self.rank!r} must be a positive integer")
        if not isinstance(self.prior_per_concept, int) or self.prior_per_concept < 0:
            raise ValueError(f"prior_per_concept={self.prior_per_concept!r} must be an integer >= 0")
        if not isinstance(self.prior_loss_weight, (int, float)) or not 0.0 <= self.prior_loss_weight < float("inf"):
            raise ValueError(f"prior_loss_weight={self.prior_loss_weight!r} must be a finite number >= 0")

    def pti_steps(self) -> tuple[int, int]:
        """(inversion steps, LoRA steps) of pivotal tuning: `steps` split by `inversion_share`, one at least each."""
        first = max(1, min(self.steps - 1, round(self.steps * self.inversion_share)))
        return first, self.steps - first


def token_for(recipe: str, config: RecipeConfig | None = None) -> str:
    """What stands for the concept in prompts after training with `recipe`."""
    return DREAMBOOTH_TOKEN if recipe.startswith("dreambooth") else (config or RecipeConfig()).token


def train_recipe(
    recipe: str,
    concept: Concept,
    data_dir: str | Path,
    output_dir: str | Path,
    model: str | Path,
    config: RecipeConfig | None = None,
) -> Path:
    """Train `recipe` on the concept's instance images in `data_dir`; returns the LoRA file."""
    from ..training.config import DreamBoothConfig, PTIConfig
    from ..training.dreambooth import train_dreambooth
    from ..training.pti import train_pti

    cfg = config or RecipeConfig()
    if recipe not in RECIPES:
        raise ValueError(f"recipe={recipe!r} is not one of {RECIPES}")
    output_dir = Path(output_dir)
    shared = dict(
        pretrained_model_name_or_path=str(model),
        instance_data_dir=str(data_dir),
        output_dir=str(output_dir),
        resolution=32,
        seed=cfg.seed,
        train_batch_size=cfg.batch_size,
        lora_rank=cfg.rank,
        learning_rate_unet=cfg.learning_rate_unet,
        learning_rate_text=cfg.learning_rate_text,
        train_text_encoder=cfg.train_text_encoder,
        save_steps=10**6,
        eval_noises=0,
        progress=cfg.progress,
        device="cpu",
    )
    if recipe.startswith("dreambooth"):
        prompt = concept.prompt.format(colour="", token=DREAMBOOTH_TOKEN).replace("  ", " ")
        extra = {}
        if recipe == "dreambooth_prior":
            class_prompt = concept.prompt.format(colour="", token="").replace("  ", " ").strip()
            extra = dict(
                with_prior_preservation=True,
                class_prompt=class_prompt,
                class_data_dir=str(output_dir / "class_images"),
                num_class_images=24,
                sample_batch_size=24,
                class_inference_steps=20,
                prior_loss_weight=1.0,
            )
        db = DreamBoothConfig(**shared, instance_prompt=prompt, max_train_steps=cfg.steps, lr_scheduler="constant",
                              **extra)  # fmt: skip
        return train_dreambooth(db).path
    inversion, tuning = cfg.pti_steps()
    steps_ti = {"ti": cfg.steps, "lora": 0}.get(recipe, inversion)
    steps_lora = {"ti": 0, "lora": cfg.steps}.get(recipe, tuning)
    prior = None
    if cfg.prior_per_concept and steps_lora:
        from .world import write_prior_dataset

        prior = str(write_prior_dataset(output_dir / "prior", cfg.prior_per_concept, seed=cfg.seed))
    pti = PTIConfig(
        **shared,
        placeholder_tokens=cfg.token,
        initializer_tokens=concept.initializer,
        placeholder_token_at_data=concept.token_map_for(cfg.token),
        perform_inversion=steps_ti > 0,
        perform_tuning=steps_lora > 0,
        max_train_steps_ti=steps_ti,
        max_train_steps_tuning=steps_lora,
        learning_rate_ti=cfg.learning_rate_ti,
        use_extended_lora=recipe == "pti_extended",
        prior_data_dir=prior,
        prior_loss_weight=cfg.prior_loss_weight,
    )
    return train_pti(pti).path


# ---- the peers: a plain diffusers-style loop, full fine-tune or peft LoRA ------------------------------

BASELINES: tuple[str, ...] = ("full", "reference")
REFERENCE_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def train_baseline(
    kind: str,
    concept: Concept,
    data_dir: str | Path,
    output_dir: str | Path,
    model: str | Path,
    config: RecipeConfig | None = None,
) -> Path:
    """A tuned copy of `model` in `output_dir/model`, trained the way diffusers' example scripts train.

    kind="full": every UNet weight trains (AdamW, lr 1e-4 x batch/4); kind="reference": peft LoRA on the UNet
    attention (rank `config.rank`, the UNet LoRA learning rate), merged into the weights at the end. The
    token (`config.token`) is added with the initializer word's embedding and stays frozen (no inversion), so the
    rows measure what UNet training alone learns. Captions go through the concept's token map.
    """
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from ..dataset import DatasetConfig, ImageDataset
    from ..losses import prediction_target
    from ..models import load_pipeline
    from ..tokens import add_tokens, init_token_embeddings

    cfg = config or RecipeConfig()
    if kind not in BASELINES:
        raise ValueError(f"kind={kind!r} is not one of {BASELINES}")
    torch.manual_seed(cfg.seed)
    pipe = load_pipeline(model, "text2img")
    unet, vae, te, tok = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    add_tokens(tok, te, [cfg.token])
    init_token_embeddings(tok, te, [cfg.token], concept.initializer)
    token_map = concept.token_map_for(cfg.token)
    data = ImageDataset(DatasetConfig(data_dir, resolution=32, placeholder_tokens=[cfg.token], token_map=token_map))
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    te.requires_grad_(False)
    with torch.no_grad():  # cached latents and prompt embeddings: nothing but the UNet changes
        pixels = torch.stack([data.sample(i)["pixel_values"] for i in range(len(data))])
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        ids = tok([data.prompt(i) for i in range(len(data))], padding="max_length", max_length=77,
                  truncation=True, return_tensors="pt").input_ids  # fmt: skip
        embeds = te(ids)[0]
    if kind == "reference":
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, init_lora_weights="gaussian",
                                    target_modules=REFERENCE_TARGETS))  # fmt: skip
        lr = cfg.learning_rate_unet
    else:
        unet.requires_grad_(True)
        lr = 1e-4 * cfg.batch_size / 4
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    gen = torch.Generator().manual_seed(cfg.seed)
    unet.train()
    for _ in tqdm(range(cfg.steps), desc=kind, disable=not cfg.progress):
        idx = torch.randint(len(data), (cfg.batch_size,), generator=gen)
        noise = torch.randn(latents[idx].shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (cfg.batch_size,), generator=gen)
        pred = unet(sched.add_noise(latents[idx], noise, t), t, embeds[idx]).sample
        loss = F.mse_loss(pred, prediction_target(sched, latents[idx], noise, t))  # v on the world's base
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    unet.eval()
    if kind == "reference":
        _merge_and_unwrap(unet)
    out = Path(output_dir) / "model"
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def _merge_and_unwrap(model) -> None:
    """Merge every peft LoRA layer of `model` into its base layer and put the base layer back in its place."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, module.get_base_layer())
    model.peft_config = {}
    model._hf_peft_config_loaded = False
