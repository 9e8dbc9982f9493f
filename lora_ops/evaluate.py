"""Evaluate LoRA files: generate a fixed prompt set with fixed seeds, score it, grid it, pick the best.

The base pipeline is loaded once; the base model (no adapter) is run first as the reference, then each
LoRA is patched in as one adapter, run at every (UNet, text-encoder) scale and an alpha sweep, and
removed again. Metrics are in `lora_ops.metrics` (CLIP-T, CLIP-I, DINO). An optional classifier (the
shapes world's evaluator, `lora_ops.shapes.evaluator`) adds "classifier", the share of images it calls
`classifier_target` (e.g. "shape=ring": subject fidelity), and "classifier_prompt", the share whose other
prompted labels (e.g. the colour named in the prompt) it finds right.

Prompts are templates: "{token}" becomes the learned tokens (e.g. "<s1><s2>") for a LoRA and
`class_word` (e.g. "dog") for the base model and for the text CLIP-T compares against, since CLIP does not
know the learned tokens (the DreamBooth convention).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from .captioning import check_model_source
from .images import make_grid, save_gif
from .lora_file import load_lora
from .metrics import ImageScores
from .models import load_pipeline
from .outputs import check_output, prepare_output, publish_output
from .precision import torch_dtype
from .runtime import patch_pipeline, remove_lora, set_scales

Metric = Literal["clip_i", "clip_t", "dino", "classifier"]
METRICS: tuple[str, ...] = ("clip_t", "clip_i", "dino", "classifier", "classifier_prompt")
SELECT_METRICS: tuple[str, ...] = ("clip_i", "clip_t", "dino", "classifier")
DEFAULT_PROMPTS = (
    "a photo of {token}",
    "a photo of {token} on the beach",
    "a painting of {token} in the style of van gogh",
    "{token} in the snow",
)


@dataclass
class EvaluateConfig:
    """What `evaluate_loras` does.

    Args:
        model: base model (hub id, diffusers folder, or one-file `.safetensors`/`.ckpt` checkpoint).
        loras: one or more LoRA files (native safetensors) to compare on the same prompts and seeds.
        output_dir: where metrics, grids and GIFs go (must not exist or be empty unless `overwrite`).
        prompts: templates; "{token}" is replaced as the module docstring says.
        class_word: the subject's class ("dog", "person"), for the base model and CLIP-T text.
        token: what "{token}" becomes for the LoRAs; None: each file's learned tokens joined, or
            `class_word` when the file has none.
        names: display names of the LoRAs (default: file stems, made unique).
        instance_dir: the subject's images (e.g. the preprocessed dataset) for CLIP-I and DINO.
        clip_model / dino_model: scorers (hub id or folder); DINO is skipped when None.
        classifier_model: a shapes-world evaluator folder (`lora-ops shapes path evaluator`); None: off.
        classifier_target: "head=label" the LoRAs should make the classifier see, e.g. "shape=ring" or
            "style=striped"; None: only "classifier_prompt" is measured.
        scales: UNet scales, each a number (text encoder at the same scale) or a (unet, text_encoder) pair.
        seeds: one image per prompt and seed.
        num_inference_steps / guidance_scale / negative_prompt / height / width: generation settings.
        sweep_steps: frames of the alpha sweep (scale 0 -> 1 on the first prompt and seed); 0 disables it.
        select_metric: what the best candidate maximizes.
        tolerance: a candidate's CLIP-T may be at most this far below the best candidate's CLIP-T.
        overwrite: replace a non-empty `output_dir`.
        device / dtype: where generation and scoring run.
        model_config: for a one-file checkpoint `model`: a diffusers folder or hub id of the same architecture
            (its configs and tokenizer), as `load_pipeline`'s `config`.
    """

    model: str | Path
    loras: Sequence[str | Path]
    output_dir: str | Path
    prompts: Sequence[str] = DEFAULT_PROMPTS
    class_word: str = ""
    token: str | None = None
    names: Sequence[str] | None = None
    instance_dir: str | Path | None = None
    clip_model: str = "openai/clip-vit-large-patch14"
    dino_model: str | None = None
    classifier_model: str | Path | None = None
    classifier_target: str | None = None
    scales: Sequence[float | tuple[float, float]] = (1.0,)
    seeds: Sequence[int] = (0, 1)
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    negative_prompt: str = ""
    height: int | None = None
    width: int | None = None
    sweep_steps: int = 5
    select_metric: Metric = "clip_i"
    tolerance: float = 0.02
    overwrite: bool = False
    device: str = "cpu"
    dtype: str = "fp32"
    model_config: str | Path | None = None

    def __post_init__(self):
        if isinstance(self.loras, (str, Path)):
            self.loras = [self.loras]
        self.loras = [Path(p) for p in self.loras]
        self.output_dir = Path(self.output_dir)
        if not self.loras:
            raise ValueError("loras=[] : give at least one LoRA file")
        for path in self.loras:
            if not path.is_file():
                raise FileNotFoundError(f"loras: {str(path)!r} is not a file")
        self.prompts = [str(p) for p in self.prompts]
        if not self.prompts or not all(p.strip() for p in self.prompts):
            raise ValueError(f"prompts={self.prompts!r} must be one or more non-empty prompts")
        self.scales = [_scale_pair(s) for s in self.scales]
        if not self.scales:
            raise ValueError("scales=[] : give at least one scale")
        self.seeds = [int(s) for s in self.seeds]
        if not self.seeds:
            raise ValueError("seeds=[] : give at least one seed")
        if self.names is None:
            self.names = unique_names([p.stem for p in self.loras])
        else:
            self.names = [str(n) for n in self.names]
            if len(self.names) != len(self.loras) or len(set(self.names)) != len(self.names):
                raise ValueError(f"names={self.names!r} must be {len(self.loras)} distinct names, one per LoRA")
            bad = [n for n in self.names if not re.fullmatch(r"[A-Za-z0-9_.-]+", n) or n == "base"]
            if bad:
                raise ValueError(f"names={bad!r}: use letters, digits, '_', '-', '.' and not 'base'")
        if self.instance_dir is not None:
            self.instance_dir = Path(self.instance_dir)
            if not self.instance_dir.is_dir():
                raise FileNotFoundError(f"instance_dir={str(self.instance_dir)!r} is not a folder")
        if self.select_metric not in SELECT_METRICS:
            raise ValueError(f"select_metric={self.select_metric!r} is not one of {SELECT_METRICS}")
        if self.classifier_target is not None:
            head, _, label = str(self.classifier_target).partition("=")
            if head not in ("shape", "colour", "style") or not label:
                raise ValueError(
                    f"classifier_target={self.classifier_target!r} must look like 'shape=ring' (heads: shape, "
                    "colour, style)"
                )
            if self.classifier_model is None:
                raise ValueError("classifier_target needs classifier_model")
        if self.select_metric == "classifier" and self.classifier_target is None:
            raise ValueError("select_metric='classifier' needs classifier_model and classifier_target")
        if self.classifier_model is not None and not Path(self.classifier_model).is_dir():
            raise FileNotFoundError(f"classifier_model={str(self.classifier_model)!r} is not a folder")
        if self.select_metric in ("clip_i", "dino") and self.instance_dir is None:
            raise ValueError(f"select_metric={self.select_metric!r} needs instance_dir (the subject's images)")
        if self.select_metric == "dino" and not self.dino_model:
            raise ValueError("select_metric='dino' needs dino_model")
        if not (isinstance(self.tolerance, (int, float)) and self.tolerance >= 0):
            raise ValueError(f"tolerance={self.tolerance!r} must be a non-negative number")
        if not isinstance(self.sweep_steps, int) or self.sweep_steps < 0 or self.sweep_steps == 1:
            raise ValueError(f"sweep_steps={self.sweep_steps!r} must be 0 (off) or at least 2")
        if not isinstance(self.num_inference_steps, int) or self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps={self.num_inference_steps!r} must be a positive integer")
        torch_dtype(self.dtype)
        check_model_source("clip_model", self.clip_model)
        if self.dino_model:
            check_model_source("dino_model", self.dino_model)
        from .models import is_single_file

        model = Path(str(self.model))
        if is_single_file(model):
            pass  # a one-file checkpoint (its configs from model_config, or from the hub)
        elif model.exists() and not (model / "model_index.json").is_file():
            raise ValueError(f"model={str(self.model)!r} is not a diffusers model folder (no model_index.json)")
        if not model.exists() and (str(self.model).count("/") != 1 or str(self.model).startswith(("/", "."))):
            raise ValueError(f"model={str(self.model)!r}: no such folder, and not a hub id of the form 'org/name'")


def _scale_pair(value) -> tuple[float, float]:
    pair = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in pair):
        raise ValueError(f"scales: {value!r} must be a finite number or a (unet, text_encoder) pair")
    return (float(pair[0]), float(pair[1]))


def unique_names(stems: Sequence[str]) -> list[str]:
    """Display and folder names for LoRAs from their file or prefix names: safe characters, never `base`
    (the base model's row), a `-2`, `-3` suffix on repeats."""
    out: list[str] = []
    for stem in stems:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) or "lora"
        name = "lora_base" if name == "base" else name
        candidate, i = name, 2
        while candidate in out:
            candidate, i = f"{name}-{i}", i + 1
        out.append(candidate)
    return out


def scale_label(pair: tuple[float, float]) -> str:
    """ "1" for equal scales, "unet/text_encoder" (e.g. "1/0.5") otherwise."""
    return f"{pair[0]:g}" if pair[0] == pair[1] else f"{pair[0]:g}/{pair[1]:g}"


@dataclass
class EvaluationResult:
    """Paths of everything written and the metrics (the content of metrics.json)."""

    output_dir: Path
    metrics_path: Path
    metrics: dict
    best: dict
    grids: dict[str, Path] = field(default_factory=dict)
    comparison_grid: Path | None = None
    comparison_table: Path | None = None
    sweep_grid: Path | None = None
    gifs: dict[str, Path] = field(default_factory=dict)


def _fill(template: str, token: str, learned: Sequence[str], class_word: str) -> tuple[str, str]:
    """(prompt to generate, text to score): "{token}" -> token / class word, learned tokens -> class word."""
    prompt = template.replace("{token}", token)
    text = template.replace("{token}", class_word)
    for t in sorted(learned, key=len, reverse=True):
        text = text.replace(t, class_word)
    return " ".join(prompt.split()), " ".join(text.split())


def _summarize(prompts: Sequence[str], seeds: Sequence[int], values: dict[str, list[float]]) -> dict:
    """Per-prompt means (over seeds) and the overall mean of each metric; values are prompt-major."""
    per_prompt = {}
    for i, prompt in enumerate(prompts):
        sl = slice(i * len(seeds), (i + 1) * len(seeds))
        per_prompt[prompt] = {m: {"mean": _mean(v[sl]), "per_seed": v[sl]} for m, v in values.items()}
    return {"per_prompt": per_prompt, "mean": {m: _mean(v) for m, v in values.items()}}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def select_best(candidates: Sequence[dict], metric: str = "clip_i", tolerance: float = 0.02) -> dict:
    """The candidate with the highest `metric` among those whose CLIP-T is within `tolerance` of the best.

    Each candidate is {"lora": name, "scale": label, "mean": {metric: value}}; ties go to the first.
    """
    if not candidates:
        raise ValueError("select_best needs at least one candidate")
    missing = [c["lora"] for c in candidates if metric not in c["mean"]]
    if missing:
        raise ValueError(f"metric={metric!r} was not measured for {missing}")
    best_t = max(c["mean"]["clip_t"] for c in candidates)
    eligible = [c for c in candidates if c["mean"]["clip_t"] >= best_t - tolerance]
    best = max(eligible, key=lambda c: c["mean"][metric])  # max keeps the first of equals
    return {
        "lora": best["lora"],
        "scale": best["scale"],
        "metric": metric,
        "value": best["mean"][metric],
        "clip_t": best["mean"]["clip_t"],
        "tolerance": tolerance,
        "eligible": [f"{c['lora']}@{c['scale']}" for c in eligible],
    }


def _table(metrics: dict, best: dict) -> str:
    names = [m for m in METRICS if m in metrics["base"]["mean"]]
    head = "| candidate | scale | " + " | ".join(n.replace("_", "-").upper() for n in names) + " |"
    lines = [head, "|" + "---|" * (len(names) + 2)]
    lines.append("| base (no LoRA) | - | " + " | ".join(f"{metrics['base']['mean'][n]:.4f}" for n in names) + " |")
    for lora, entry in metrics["loras"].items():
        for label, result in entry["scales"].items():
            mark = " **best**" if (lora, label) == (best["lora"], best["scale"]) else ""
            row = " | ".join(f"{result['mean'][n]:.4f}" for n in names)
            lines.append(f"| {lora}{mark} | {label} | {row} |")
    rule = f"best: {best['lora']} at scale {best['scale']} by {best['metric']}"
    return "\n".join(lines) + f"\n\n{rule} (CLIP-T within {best['tolerance']} of the best candidate's)\n"


def evaluate_loras(config: EvaluateConfig) -> EvaluationResult:
    """Generate, score and compare `config.loras` against the base model; see the module docstring."""
    cfg = config
    dtype = torch_dtype(cfg.dtype)
    loras = [load_lora(p) for p in cfg.loras]  # fail on a bad file before any model loads
    learned = sorted({t for lora in loras for t in lora.tokens})
    inputs = {"loras": cfg.loras, "model": cfg.model, "classifier_model": cfg.classifier_model}
    check_output(cfg.output_dir, cfg.overwrite, "metrics.json", inputs)  # refuse before loading models
    scores = ImageScores(
        cfg.clip_model,
        cfg.dino_model,
        cfg.device,
        dtype,
        classifier_model=cfg.classifier_model,
        classifier_target=cfg.classifier_target,
        instance_dir=cfg.instance_dir,
    )
    pipe = load_pipeline(cfg.model, "text2img", cfg.device, dtype, config=cfg.model_config)
    staging = prepare_output(cfg.output_dir, cfg.overwrite, "metrics.json", inputs)

    def generate(prompt: str, seed: int):
        generator = torch.Generator(device=cfg.device).manual_seed(seed)
        return pipe(
            prompt,
            negative_prompt=cfg.negative_prompt or None,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            generator=generator,
        ).images[0]

    def run_set(token: str | None, folder: Path, desc: str):
        """Every prompt x seed (prompt-major); saves the images; returns (images, metric values).

        token=None is the base model: it gets the scoring text, with the class word for every token.
        """
        folder.mkdir(parents=True, exist_ok=True)
        images, texts = [], []
        jobs = [(i, template, seed) for i, template in enumerate(cfg.prompts) for seed in cfg.seeds]
        for i, template, seed in tqdm(jobs, desc=desc, unit="image", leave=False):
            prompt, text = _fill(template, cfg.class_word if token is None else token, learned, cfg.class_word)
            image = generate(text if token is None else prompt, seed)
            image.save(folder / f"p{i}_seed{seed}.png")
            images.append(image)
            texts.append(text)
        return images, scores(images, texts)

    try:
        col_labels = [f"seed {s}" for s in cfg.seeds]
        row_of = [f"p{i}: {p[:40]}" for i, p in enumerate(cfg.prompts)]
        grids, gifs, sweep_rows, sweep_labels = {}, {}, [], []

        # the reference: the base model without any adapter, prompts with the class word
        base_images, base_values = run_set(None, staging / "base" / "images", "base")
        metrics = {
            "prompts": cfg.prompts,
            "seeds": cfg.seeds,
            "scales": [scale_label(s) for s in cfg.scales],
            "class_word": cfg.class_word,
            "base": _summarize(cfg.prompts, cfg.seeds, base_values),
            "loras": {},
        }
        grids["base"] = staging / "base" / "grid.png"
        make_grid(base_images, cols=len(cfg.seeds), row_labels=row_of, col_labels=col_labels).save(grids["base"])
        comparison_rows, comparison_labels = [base_images], ["base"]

        for name, path, lora in zip(cfg.names, cfg.loras, loras, strict=True):
            token = cfg.token if cfg.token is not None else ("".join(lora.tokens) or cfg.class_word)
            patch_pipeline(pipe, lora, adapter_name="candidate")
            entry = {"path": str(path), "token": token, "scales": {}}
            lora_images = []
            for pair in cfg.scales:
                label = scale_label(pair)
                set_scales(pipe, "candidate", unet=pair[0], text_encoder=pair[1])
                folder = staging / name / "images" / f"scale_{label.replace('/', '_')}"
                images, values = run_set(token, folder, f"{name} @ {label}")
                entry["scales"][label] = _summarize(cfg.prompts, cfg.seeds, values)
                lora_images += images
                comparison_rows.append(images)
                comparison_labels.append(f"{name} @ {label}")
            rows = [f"{scale_label(s)} | {r}" for s in cfg.scales for r in row_of]
            grids[name] = staging / name / "grid.png"
            make_grid(lora_images, cols=len(cfg.seeds), row_labels=rows, col_labels=col_labels).save(grids[name])

            if cfg.sweep_steps:
                # alpha sweep: both scales together from 0 (base weights) to 1, first prompt and seed
                frames = []
                prompt, _ = _fill(cfg.prompts[0], token, learned, cfg.class_word)
                for k in range(cfg.sweep_steps):
                    alpha = k / (cfg.sweep_steps - 1)
                    set_scales(pipe, "candidate", unet=alpha, text_encoder=alpha)
                    frames.append(generate(prompt, cfg.seeds[0]))
                gifs[name] = save_gif(frames, staging / name / "sweep.gif")
                sweep_rows.append(frames)
                sweep_labels.append(name)
                entry["sweep"] = {"prompt": prompt, "seed": cfg.seeds[0], "alphas": _alphas(cfg.sweep_steps)}
            remove_lora(pipe, "candidate")
            metrics["loras"][name] = entry

        # comparison: one table, one grid, the best candidate
        candidates = [
            {"lora": name, "scale": label, "mean": result["mean"]}
            for name, entry in metrics["loras"].items()
            for label, result in entry["scales"].items()
        ]
        best = select_best(candidates, cfg.select_metric, cfg.tolerance)
        metrics["best"] = best
        metrics["models"] = {
            "base": str(cfg.model),
            "clip": scores.clip.name,
            "dino": cfg.dino_model,
            "classifier": str(cfg.classifier_model) if cfg.classifier_model else None,
            "classifier_target": cfg.classifier_target,
        }
        metrics["generation"] = {
            "num_inference_steps": cfg.num_inference_steps,
            "guidance_scale": cfg.guidance_scale,
            "negative_prompt": cfg.negative_prompt,
        }
        cols = len(cfg.prompts) * len(cfg.seeds)
        heads = [f"p{i} s{s}" for i in range(len(cfg.prompts)) for s in cfg.seeds]
        comparison_grid = staging / "comparison.png"
        make_grid(sum(comparison_rows, []), cols=cols, row_labels=comparison_labels, col_labels=heads).save(
            comparison_grid
        )
        sweep_grid = None
        if sweep_rows:
            sweep_grid = staging / "sweep.png"
            alphas = [f"{a:g}" for a in _alphas(cfg.sweep_steps)]
            make_grid(sum(sweep_rows, []), cols=cfg.sweep_steps, row_labels=sweep_labels, col_labels=alphas).save(
                sweep_grid
            )
        table = staging / "comparison.md"
        table.write_text(_table(metrics, best))
        metrics["files"] = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")  # last: marks completion
        publish_output(staging, cfg.output_dir)
    except BaseException:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        raise

    out = cfg.output_dir

    def moved(p: Path) -> Path:
        return out / p.relative_to(staging)

    return EvaluationResult(
        output_dir=out,
        metrics_path=out / "metrics.json",
        metrics=metrics,
        best=best,
        grids={k: moved(v) for k, v in grids.items()},
        comparison_grid=moved(comparison_grid),
        comparison_table=moved(table),
        sweep_grid=moved(sweep_grid) if sweep_grid else None,
        gifs={k: moved(v) for k, v in gifs.items()},
    )


def _alphas(steps: int) -> list[float]:
    return [k / (steps - 1) for k in range(steps)]
