"""`lora-ops evaluate MODEL LORA [LORA ...] --out DIR`: CLIP-T / CLIP-I / DINO metrics, grids, alpha sweeps."""

from __future__ import annotations

import json

from . import add_device_flag, examples, resolve_device


def _scale(text: str):
    """ "0.8" (both) or "1.0:0.5" (unet:text_encoder)."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise ValueError(f"--scale {text!r}: expected a number or UNET:TEXT_ENCODER, e.g. 1.0:0.5") from None
    if len(parts) not in (1, 2):
        raise ValueError(f"--scale {text!r}: expected a number or UNET:TEXT_ENCODER, e.g. 1.0:0.5")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def run(args) -> int:
    from ..evaluate import DEFAULT_PROMPTS, EvaluateConfig, evaluate_loras

    prompts = list(args.prompt or [])
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.strip() for line in f if line.strip() and not line.startswith("#")]
    config = EvaluateConfig(
        model=args.model,
        loras=args.loras,
        output_dir=args.out,
        prompts=prompts or DEFAULT_PROMPTS,
        class_word=args.class_word,
        token=args.token,
        names=args.name,
        instance_dir=args.instance_dir,
        clip_model=args.clip_model,
        dino_model=args.dino_model,
        classifier_model=args.classifier_model,
        classifier_target=args.classifier_target,
        scales=[_scale(s) for s in args.scale] if args.scale else (1.0,),
        seeds=args.seed if args.seed else (0, 1),
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        sweep_steps=args.sweep_steps,
        select_metric=args.select_metric,
        tolerance=args.tolerance,
        overwrite=args.overwrite,
        model_config=args.model_config,
        device=resolve_device(args.device),
        dtype=args.dtype,
    )
    result = evaluate_loras(config)
    print(result.comparison_table.read_text().rstrip())
    print(
        json.dumps(
            {
                "output_dir": str(result.output_dir),
                "metrics": str(result.metrics_path),
                "best": result.best,
                "mean": {n: {s: r["mean"] for s, r in e["scales"].items()} for n, e in result.metrics["loras"].items()},
                "base": result.metrics["base"]["mean"],
            }
        )
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="generate fixed prompts and seeds with LoRAs; CLIP-T/CLIP-I/DINO metrics, grids, alpha sweep",
        description="Writes metrics.json, comparison.md, comparison.png, sweep.png and per-LoRA grids and GIFs.",
        **examples(
            "lora-ops evaluate ./sd15 tune/lora.safetensors --out eval/ --class-word dog --instance-dir ./dog",
            "lora-ops evaluate ./sd15 a.safetensors b.safetensors --out cmp/ --scale 0.8 --scale 1.0:0.5 --seed 0",
        ),
    )
    p.add_argument("model", help="base model: hub id, diffusers folder or one-file .safetensors/.ckpt")
    p.add_argument(
        "--model-config",
        help="for a one-file checkpoint: a diffusers folder or hub id of the same architecture (configs, tokenizer)",
    )
    p.add_argument("loras", nargs="+", help="LoRA files (several: comparison mode)")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--prompt", action="append", help="prompt template, '{token}' marks the subject (repeatable)")
    p.add_argument("--prompts-file", help="one prompt template a line")
    p.add_argument("--class-word", default="", help="the subject's class, e.g. 'dog' (base model and CLIP-T text)")
    p.add_argument("--token", default=None, help="what '{token}' becomes (default: the file's learned tokens)")
    p.add_argument("--name", action="append", help="display name per LoRA, in order (default: file stems)")
    p.add_argument("--instance-dir", default=None, help="the subject's images (CLIP-I, DINO)")
    p.add_argument("--clip-model", default="openai/clip-vit-large-patch14")
    p.add_argument("--dino-model", default=None, help="e.g. facebook/dino-vits16 (DINO metric)")
    p.add_argument("--scale", action="append", help="LoRA scale: 0.8 or UNET:TEXT_ENCODER (repeatable)")
    p.add_argument("--seed", type=int, action="append", help="seed (repeatable; default 0 and 1)")
    p.add_argument("--steps", type=int, default=30, help="inference steps")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--sweep-steps", type=int, default=5, help="alpha-sweep frames from 0 to 1 (0: none)")
    p.add_argument("--classifier-model", default=None, help="shapes-world evaluator folder (classifier metrics)")
    p.add_argument("--classifier-target", default=None, help='what the LoRAs should show, e.g. "shape=ring"')
    p.add_argument("--select-metric", choices=("clip_i", "clip_t", "dino", "classifier"), default="clip_i")
    p.add_argument("--tolerance", type=float, default=0.02, help="how far below the best CLIP-T a pick may be")
    p.add_argument("--overwrite", action="store_true")
    add_device_flag(p)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.set_defaults(
        func=run,
        field_flags={  # EvaluateConfig fields spelled differently from their flags
            "output_dir": "--out",
            "prompts": "--prompt",
            "names": "--name",
            "scales": "--scale",
            "seeds": "--seed",
            "num_inference_steps": "--steps",
        },
    )
