"""evaluate: candidate LoRAs -> CLIP-T/CLIP-I/DINO metrics, grids, alpha-sweep GIFs and the best candidate.

    python -m lora_pipeline.steps.evaluate --run-id RUN_ID --dataset URI --base-model REF --lora URI [--lora URI ...] --out URI
        [--prompts P ...] [--scales S ...] [--seed N ...] [--clip-model ID] [--dino-model ID]
        [--class-word WORD] [--num-inference-steps N] [--guidance-scale G] [--resolution N] [--select-metric clip_i|clip_t|dino]
        [--sweep-steps N] [--classifier-model DIR [--classifier-target shape=ring]]

Each `--lora` is the output prefix of tune or distill. Writes `metrics.json`, `comparison.png`,
`comparison.md`, grids and GIFs; the result names the best candidate by its prefix.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from lora_ops.evaluate import unique_names
from lora_ops.image_files import list_images

from . import common
from .artifacts import fetch, find_completed, parse_uri, publish, uri_of
from .models import resolve_base_model
from .tracking import log_images_dir, start_step

STEP = "evaluate"
LORA_FILE = "lora.safetensors"


def build_parser():
    p = common.parser(STEP, __doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="the subject's images (the preprocess output)")
    common.add_base_model_args(p)
    p.add_argument("--lora", required=True, action="append", help="output prefix of tune or distill (repeat)")
    p.add_argument("--prompts", nargs="+", default=None, help='prompt templates with "{token}"')
    p.add_argument("--scales", nargs="+", type=float, default=[1.0], help="LoRA scales (default 1.0)")
    p.add_argument("--seed", nargs="+", type=int, default=[0, 1], help="seeds (one image per prompt and seed)")
    p.add_argument("--clip-model", default="openai/clip-vit-large-patch14")
    p.add_argument("--dino-model", default=None, help="DINO model for the DINO score (optional)")
    p.add_argument("--class-word", default="", help='the subject\'s class, e.g. "dog"')
    p.add_argument("--num-inference-steps", type=int, default=30)
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance (default 7.5)")
    p.add_argument("--resolution", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--classifier-model", default=None,
                   help="shapes-world evaluator folder (optional accuracy metrics)")  # fmt: skip
    p.add_argument("--classifier-target", default=None, help='what the LoRAs should show, e.g. "shape=ring"')
    p.add_argument("--select-metric", default="clip_i", choices=["clip_i", "clip_t", "dino", "classifier"])
    p.add_argument("--sweep-steps", type=int, default=5, help="frames of the alpha sweep GIF (0: off)")
    return p


def candidate_names(uris: list[str]) -> list[str]:
    """Display names from the prefixes' last segments (`tune`, `distill-r4`), made unique."""
    return unique_names([Path(parse_uri(uri, "--lora").key.rstrip("/")).name for uri in uris])


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from lora_ops.evaluate import DEFAULT_PROMPTS, EvaluateConfig, evaluate_loras

    args = common.parse(
        build_parser(),
        argv,
        inputs=(
            "--dataset",
            "--base-model",
            "--base-model-config",
            "--lora",
            "--clip-model",
            "--dino-model",
            "--classifier-model",
        ),
    )
    names = candidate_names(args.lora)
    params = {
        "prompts": args.prompts or list(DEFAULT_PROMPTS),
        "scales": args.scales,
        "seeds": args.seed,
        "clip_model": args.clip_model,
        "dino_model": args.dino_model,
        "classifier_model": args.classifier_model,
        "classifier_target": args.classifier_target,
        "class_word": args.class_word,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "select_metric": args.select_metric,
        "sweep_steps": args.sweep_steps,
    }
    with tempfile.TemporaryDirectory(prefix="lora-evaluate-") as tmp:
        tmp = Path(tmp)
        dataset = fetch(args.dataset, tmp / "dataset", name="--dataset", include=common.is_dataset_file)
        base = resolve_base_model(args.base_model, config=args.base_model_config)
        loras = {}
        inputs = {"dataset": dataset.lineage(), "base_model": base.lineage()}
        for i, (name, uri) in enumerate(zip(names, args.lora, strict=True)):
            got = fetch(uri, tmp / "loras" / name, name="--lora", require_manifest=True,
                        include=lambda p: p == LORA_FILE)  # fmt: skip
            if not (got.path / LORA_FILE).is_file():
                raise ValueError(f"--lora={uri}: holds no {LORA_FILE} (a tune or distill output is expected)")
            loras[name] = got
            inputs[f"lora{i}"] = got.lineage()
        done = find_completed(args.out, STEP, inputs, params)
        if done is not None:
            return done
        # the instance images without masks, for CLIP-I/DINO
        instance = tmp / "instance"
        instance.mkdir()
        for img in list_images(dataset.path):
            (instance / img.name).symlink_to(img)
        with start_step(STEP, args.run_id, args.experiment, params={**params, "dataset": args.dataset,
                        "base_model": args.base_model, "loras": args.lora}, tags=common.lineage_tags()) as tracker:  # fmt: skip
            out_dir = tmp / "out"
            evaluated = evaluate_loras(
                EvaluateConfig(
                    model=base.path,
                    model_config=base.config_path,
                    loras=[loras[n].path / LORA_FILE for n in names],
                    names=names,
                    output_dir=out_dir,
                    prompts=params["prompts"],
                    class_word=args.class_word,
                    instance_dir=instance,
                    clip_model=args.clip_model,
                    dino_model=args.dino_model,
                    classifier_model=args.classifier_model,
                    classifier_target=args.classifier_target,
                    scales=args.scales,
                    seeds=args.seed,
                    num_inference_steps=args.num_inference_steps,
                    guidance_scale=args.guidance_scale,
                    height=args.resolution,
                    width=args.resolution,
                    sweep_steps=args.sweep_steps,
                    select_metric=args.select_metric,
                    device=common.device(args.device),
                )
            )
            metrics = evaluated.metrics
            best = evaluated.best
            best_uri = args.lora[names.index(best["lora"])]
            best_mean = metrics["loras"][best["lora"]]["scales"][best["scale"]]["mean"]
            for name, entry in metrics["loras"].items():
                for label, scored in entry["scales"].items():
                    tracker.log_metrics({f"{name}@{label}/{k}": v for k, v in scored["mean"].items()})
            tracker.log_metrics({f"best/{k}": v for k, v in best_mean.items()})
            log_images_dir(tracker, out_dir, "images")
            tracker.log_artifact(out_dir / "metrics.json")
            result = {
                "step": STEP,
                "run_id": args.run_id,
                "out": args.out,
                "metrics": uri_of(args.out, "metrics.json"),
                "comparison": uri_of(args.out, "comparison.png"),
                "best": {
                    "lora": best_uri,
                    "name": best["lora"],
                    "scale": best["scale"],
                    "metrics": {k: float(v) for k, v in best_mean.items() if isinstance(v, (int, float))},
                },
                "candidates": {n: u for n, u in zip(names, args.lora, strict=True)},
            }
            result = publish(out_dir, args.out, step=STEP, run_id=args.run_id, inputs=inputs, parameters=params,
                             result=result)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    return common.main(STEP, run, argv)


if __name__ == "__main__":
    sys.exit(main())
