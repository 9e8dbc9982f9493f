"""The quality benchmark: what each fine-tuning recipe teaches the shapes world's base model.

    python benchmarks/quality.py [--out out/bench-quality] [--concepts ring star striped]
        [--recipes ti lora pti pti_extended dreambooth dreambooth_prior full reference]
        [--seeds 0 1 2] [--steps 400] [--concept-seeds 20] [--known-seeds 4] [--extras distill resize merge]
        [--train-text-encoder] [--rank 4] [--prior-loss-weight 1.0] [--model DIR] [--resume]

For every held-out concept, recipe and seed: write the concept's instance images (seeded), train with the
same step budget, generate the concept's prompt in every colour (`--concept-seeds` images per colour) and
every known prompt (`--known-seeds` per prompt), and judge them with the world's evaluator; CLIP-T, CLIP-I
and DINO come from the world's scorers. Extras on the first seed of the first concept: SVD distillation
of the full fine-tune at ranks 1/2/4/8 ("distill"), `resize --energy 0.9` of the PTI LoRA ("resize"), and
an `lpl` merge of the ring and star PTI LoRAs ("merge"). Writes results.json, results.md (mean ± std over
seeds) and sample grids (one per concept and recipe, first seed) to --out.

The whole benchmark takes hours on a CPU: results.json is rewritten after every cell, and `--resume` keeps
the cells an earlier run with the same settings left in --out (its trained files included) and trains
only the missing ones, so it can be run in parts (`--concepts ring`, then `--concepts star --resume`, ...)
and after an interruption; results.md covers every cell in results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_pipeline.steps.artifacts import describe_files, listing_hash  # noqa: E402

from lora_ops.images import make_grid  # noqa: E402
from lora_ops.lora_file import load_lora, save_lora  # noqa: E402
from lora_ops.metrics import ClipScorer, DinoScorer, clip_t, mean_similarity  # noqa: E402
from lora_ops.models import load_pipeline  # noqa: E402
from lora_ops.shapes import pretrained  # noqa: E402
from lora_ops.shapes.evaluator import ShapesEvaluator  # noqa: E402
from lora_ops.shapes.quality import (  # noqa: E402
    concept_prompts,
    concept_scores,
    generate,
    known_accuracy,
    score_lora,
)
from lora_ops.shapes.recipes import BASELINES, RECIPES, RecipeConfig, token_for, train_baseline, train_recipe  # noqa: E402
from lora_ops.shapes.world import COLOURS, get_concept, write_concept_dataset  # noqa: E402

METRICS = ("subject_fidelity", "prompt_fidelity", "prompt_fidelity_new_colours", "retention", "clip_t", "clip_i",
           "dino", "size_kb", "train_s")  # fmt: skip


class Scorers:
    """The world's CLIP and DINO slot, with the instance embeddings of one dataset."""

    def __init__(self):
        self.clip = ClipScorer(pretrained("clip"))
        self.dino = DinoScorer(pretrained("dino"))

    def __call__(self, images, texts, instances) -> dict[str, float]:
        emb = self.clip.image_embeds(images)
        return {
            "clip_t": float(clip_t(emb, self.clip.text_embeds(texts)).mean()),
            "clip_i": float(mean_similarity(emb, self.clip.image_embeds(instances)).mean()),
            "dino": float(mean_similarity(self.dino.image_embeds(images), self.dino.image_embeds(instances)).mean()),
        }


def instance_images(data: Path):
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in sorted(data.glob("*.png"))]


def score_pipeline(pipe, evaluator, concept, token, args, base_known):
    """Scores of a pipeline as it is (a fully tuned model, or the base)."""
    prompts, seeds, colours = concept_prompts(concept, token, range(args.concept_seeds))
    images = generate(pipe, prompts, seeds)
    scores = concept_scores(evaluator.classify(images), concept, colours)
    known = known_accuracy(pipe, evaluator, range(args.known_seeds))
    scores.update(known_accuracy=known, retention=known / base_known if base_known else float("nan"))
    return scores, images


def class_texts(concept, n_seeds: int) -> list[str]:
    return [concept.text_for(c) for _ in range(n_seeds) for c in COLOURS]


def save_grid(images, path: Path, n_seeds: int, title: str) -> None:
    cols = len(COLOURS)
    shown = images[: cols * min(n_seeds, 6)]
    grid = make_grid([im.resize((64, 64)) for im in shown], cols=cols, col_labels=list(COLOURS))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    print(f"    grid {title}: {path}", flush=True)


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    out = {}
    for m in METRICS:
        vals = [r[m] for r in rows if m in r and not (isinstance(r[m], float) and math.isnan(r[m]))]
        if vals:
            out[m] = {"mean": float(np.mean(vals)), "std": float(np.std(vals)), "n": len(vals)}
    return out


def markdown(results: dict) -> str:
    lines = []
    for concept, by_recipe in results["cells"].items():
        lines.append(f"\n### {concept}\n")
        lines.append("| recipe | subject fidelity | prompt fidelity | new colours | retention | CLIP-T | CLIP-I | DINO "
                     "| size KB | train s |")  # fmt: skip
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for recipe, rows in by_recipe.items():
            summary = summarize(rows)

            def cell(m, fmt="{:.2f}", s=summary):
                if m not in s:
                    return "-"
                return (fmt + " ± " + fmt).format(s[m]["mean"], s[m]["std"])

            lines.append(
                f"| {recipe} | {cell('subject_fidelity')} | {cell('prompt_fidelity')} | "
                f"{cell('prompt_fidelity_new_colours')} | {cell('retention')} | {cell('clip_t')} | {cell('clip_i')} | "
                f"{cell('dino')} | {cell('size_kb', '{:.0f}')} | {cell('train_s', '{:.0f}')} |"
            )
    if results.get("extras"):
        lines.append("\n### extras (first seed)\n")
        lines.append("| what | subject fidelity | prompt fidelity | retention | size KB | kept of the single LoRA |")
        lines.append("|---|---|---|---|---|---|")
        for name, r in results["extras"].items():
            kept = f"{r['kept_of_single']:.2f}" if "kept_of_single" in r else "-"
            lines.append(f"| {name} | {r['subject_fidelity']:.2f} | {r['prompt_fidelity']:.2f} | "
                         f"{r.get('retention', float('nan')):.2f} | {r.get('size_kb', 0):.0f} | {kept} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/bench-quality")
    p.add_argument("--model", help="base model folder (default: the shipped shapes-world base, sd/)")
    p.add_argument("--concepts", nargs="+", default=["ring", "star", "striped"])
    p.add_argument("--recipes", nargs="+", default=[*RECIPES, *BASELINES])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=RecipeConfig.steps)
    p.add_argument("--inversion-share", type=float, default=RecipeConfig.inversion_share,
                   help="share of the steps pivotal tuning spends on inversion")  # fmt: skip
    p.add_argument("--concept-seeds", type=int, default=20, help="images per colour (5 colours)")
    p.add_argument("--known-seeds", type=int, default=4, help="images per known prompt (25 prompts)")
    p.add_argument("--extras", nargs="*", default=["distill", "resize", "merge"])
    p.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too (PTI recipes)")
    p.add_argument("--rank", type=int, default=RecipeConfig.rank, help="LoRA rank")
    p.add_argument("--prior-loss-weight", type=float, default=RecipeConfig.prior_loss_weight,
                   help="weight of the regularization images' loss in pivotal tuning's LoRA phase")  # fmt: skip
    p.add_argument("--resume", action="store_true",
                   help="keep the cells of an earlier run with the same settings in --out; train the missing ones")  # fmt: skip
    args = p.parse_args(argv)
    try:  # the recipe settings' own checks, before any model is loaded
        recipe_config(args, seed=0, token="<s1>")
    except ValueError as e:
        p.error(str(e))
    bad = [r for r in args.recipes if r not in (*RECIPES, *BASELINES)]
    if bad:
        p.error(f"unknown recipes {bad}; choose from {[*RECIPES, *BASELINES]}")
    return args


def recipe_config(args, seed: int, token: str) -> RecipeConfig:
    """The recipe settings of one cell, from the command line."""
    return RecipeConfig(steps=args.steps, seed=seed, token=token, inversion_share=args.inversion_share,
                        train_text_encoder=args.train_text_encoder, rank=args.rank,
                        prior_loss_weight=args.prior_loss_weight)  # fmt: skip


# what must match for an earlier run's cells to be kept (--resume); model_sha256: the base folder's content, so that
# a changed shipped base (the same --model, or none) is not mixed with the cells of the one before it
SETTINGS = ("model", "model_sha256", "steps", "inversion_share", "concept_seeds", "known_seeds", "train_text_encoder",
            "rank", "prior_loss_weight")  # fmt: skip


def earlier_results(out: Path, args) -> dict:
    """results.json of an earlier run in `out` with the same SETTINGS, or {} when there is none."""
    path = out / "results.json"
    if not path.exists():
        return {}
    earlier = json.loads(path.read_text())
    theirs = earlier.get("args", {})
    differ = [
        f"{k}={theirs.get(k)!r} (now {getattr(args, k)!r})" for k in SETTINGS if theirs.get(k) != getattr(args, k)
    ]
    if differ:
        raise SystemExit(f"--resume: {path} was made with other settings: {', '.join(differ)}; "
                         "run with those or choose another --out")  # fmt: skip
    return earlier


def kept_rows(earlier: dict, out: Path, name: str, recipe: str) -> dict[int, dict]:
    """{seed: row} of the earlier run's (concept, recipe) cells whose trained file is still in `out`."""
    rows = earlier.get("cells", {}).get(name, {}).get(recipe, [])
    return {row["seed"]: row for row in rows if "file" in row and (out / row["file"]).exists()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model) if args.model else pretrained("sd")
    if not (model / "model_index.json").is_file():
        raise SystemExit(f"--model {model}: not a diffusers folder (no model_index.json)")
    args.model_sha256 = listing_hash(describe_files(model))  # every weight and config of the base
    earlier = earlier_results(out, args) if args.resume else {}
    evaluator = ShapesEvaluator.from_pretrained(pretrained("evaluator"))
    scorers = Scorers()
    base = load_pipeline(model, "text2img")
    base_known = known_accuracy(base, evaluator, range(args.known_seeds))
    print(f"base model: known-concept accuracy {base_known:.3f}", flush=True)
    results = {"args": vars(args), "base_known_accuracy": base_known, "cells": earlier.get("cells", {}),
               "base": earlier.get("base", {}), "extras": {}}  # fmt: skip
    lora_files: dict[tuple[str, str, int], Path] = {}
    tuned_models: dict[tuple[str, str, int], Path] = {}
    for name, by_recipe in results["cells"].items():  # --resume: the earlier files, for the extras too
        for recipe in by_recipe:
            for seed, row in kept_rows(earlier, out, name, recipe).items():
                (tuned_models if recipe in BASELINES else lora_files)[(name, recipe, seed)] = out / row["file"]
    t_all = time.monotonic()

    for name in args.concepts:
        concept = get_concept(name)
        # the base model on the concept's own words (it never saw them): the floor of subject fidelity
        prompts, seeds, colours = concept_prompts(concept, "", range(args.concept_seeds))
        name_prompts = [concept.name_prompt_for(c) for c in colours]
        base_images = generate(base, name_prompts, seeds)
        results["base"][name] = concept_scores(evaluator.classify(base_images), concept, colours)
        print(f"[{name}] base: {results['base'][name]}", flush=True)
        save_grid(base_images, out / "grids" / name / "base.png", args.concept_seeds, f"{name}/base")
        cells = results["cells"].setdefault(name, {})
        for recipe in args.recipes:
            kept = kept_rows(earlier, out, name, recipe)
            rows = [row for seed, row in kept.items() if seed not in args.seeds]  # other seeds' cells stay too
            for seed in args.seeds:
                if seed in kept:  # --resume: trained and scored by an earlier run
                    rows.append(kept[seed])
                    print(f"[{name}] {recipe} seed {seed}: kept from the earlier run", flush=True)
                    continue
                work = out / "runs" / name / recipe / f"seed{seed}"
                data = write_concept_dataset(name, work / "data", seed=seed)
                cfg = recipe_config(args, seed, "<s2>" if name == "star" else "<s1>")
                t0 = time.monotonic()
                if recipe in BASELINES:
                    tuned = train_baseline(recipe, concept, data, work, model, cfg)
                    train_s = time.monotonic() - t0
                    tuned_models[(name, recipe, seed)] = tuned
                    pipe = load_pipeline(tuned, "text2img")
                    scores, images = score_pipeline(pipe, evaluator, concept, "<s1>", args, base_known)
                    size = sum(f.stat().st_size for f in (tuned / "unet").glob("*.safetensors"))
                    file = tuned
                else:
                    path = train_recipe(recipe, concept, data, work / "lora", model, cfg)
                    train_s = time.monotonic() - t0
                    lora_files[(name, recipe, seed)] = path
                    token = token_for(recipe, cfg)
                    scores, images = score_lora(base, path, evaluator, concept, token,
                                                range(args.concept_seeds), range(args.known_seeds),
                                                base_known=base_known)  # fmt: skip
                    size = path.stat().st_size
                    file = path
                scores |= scorers(images, class_texts(concept, args.concept_seeds), instance_images(data))
                scores |= {"size_kb": size / 1024, "train_s": train_s, "seed": seed, "file": os.path.relpath(file, out)}
                rows.append(scores)
                print(f"[{name}] {recipe} seed {seed}: " + ", ".join(
                    f"{k}={v:.3f}" for k, v in scores.items() if isinstance(v, float)), flush=True)  # fmt: skip
                if seed == args.seeds[0]:
                    save_grid(images, out / "grids" / name / f"{recipe}.png", args.concept_seeds, f"{name}/{recipe}")
            cells[recipe] = rows
            (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")

    # ---- extras: distillation of the full fine-tune, resize by energy, merging two concepts
    first = args.seeds[0]
    concept = get_concept(args.concepts[0])
    extra_dir = out / "extras"
    extra_dir.mkdir(exist_ok=True)

    def score_file(label: str, path: Path, c=concept, token="<s1>"):
        scores, images = score_lora(base, path, evaluator, c, token, range(args.concept_seeds),
                                    range(args.known_seeds), base_known=base_known)  # fmt: skip
        scores["size_kb"] = path.stat().st_size / 1024
        results["extras"][label] = scores
        save_grid(images, out / "grids" / "extras" / f"{label}.png", args.concept_seeds, label)
        print(f"[extra] {label}: " + ", ".join(f"{k}={v:.3f}" for k, v in scores.items()), flush=True)

    if "distill" in args.extras and (concept.name, "full", first) in tuned_models:
        from lora_ops.distill import DistillConfig, distill

        for rank in (1, 2, 4, 8):
            lora, _ = distill(str(tuned_models[(concept.name, "full", first)]), str(model),
                              DistillConfig(rank=rank, text_encoder_targets=None, device="cpu"), progress=False)  # fmt: skip
            score_file(f"full fine-tune distilled r{rank}", save_lora(extra_dir / f"full_r{rank}.safetensors", lora))
    if "resize" in args.extras and (concept.name, "pti", first) in lora_files:
        from lora_ops.resize import ResizeConfig, resize_lora

        src = lora_files[(concept.name, "pti", first)]
        resized, report = resize_lora(load_lora(src), ResizeConfig(mode="energy", threshold=0.9), progress=False)
        score_file("pti resize --energy 0.9", save_lora(extra_dir / "pti_energy90.safetensors", resized))
    if "merge" in args.extras and ("ring", "pti", first) in lora_files and ("star", "pti", first) in lora_files:
        from lora_ops.merge import merge_loras

        ring, star = lora_files[("ring", "pti", first)], lora_files[("star", "pti", first)]
        for weights in ((0.5, 0.5), (1.0, 1.0)):  # lpl's default (the original's 0.5 / 0.5), and full strength
            label = f"lpl ring+star {weights[0]:g}/{weights[1]:g}"
            merged, _ = merge_loras([load_lora(ring), load_lora(star)], weights=list(weights))
            merged_path = save_lora(extra_dir / f"ring_plus_star_{weights[0]:g}.safetensors", merged)
            for c, tok in (("ring", "<s1>"), ("star", "<s2>")):
                score_file(f"{label}: {c}", merged_path, get_concept(c), tok)
                single = results["cells"][c]["pti"][0]["subject_fidelity"]
                merged_fidelity = results["extras"][f"{label}: {c}"]["subject_fidelity"]
                results["extras"][f"{label}: {c}"]["kept_of_single"] = (
                    merged_fidelity / single if single else float("nan")
                )

    results["wall_seconds"] = time.monotonic() - t_all
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    table = markdown(results)
    (out / "results.md").write_text(table)
    print(table)
    print(f"total {results['wall_seconds']:.0f}s; results in {out}/results.json and results.md")
    return results


if __name__ == "__main__":
    main()
