"""`lora-ops add MODE`: upl / upl-ckpt (LoRA into a model), lpl (exact weighted merge), ljl (join)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from . import add_model_config_flag, examples, resolve_base

MODES = ("upl", "upl-ckpt", "lpl", "ljl")


def run(args) -> int:
    from ..formats import read_any
    from ..lora_file import save_lora

    if args.mode in ("upl", "upl-ckpt") and (args.base is None or len(args.loras) != 1):
        raise ValueError(f"add {args.mode} needs --base MODEL_DIR and exactly one LoRA, got {len(args.loras)}")
    base = resolve_base(args.base, args.model_config)
    loras = [read_any(p, base=base) for p in args.loras]
    if args.mode in ("upl", "upl-ckpt"):
        from ..merge import add_to_pipeline
        from ..models import load_pipeline

        pipe = base if not isinstance(base, (str, Path)) else load_pipeline(base)
        te_scale = args.alpha if args.text_encoder_alpha is None else args.text_encoder_alpha
        if args.mode == "upl":
            out = Path(args.out)
            if out.resolve() == Path(args.base).resolve():
                raise ValueError(f"--out {args.out} is the base model's folder; write the merged model elsewhere")
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise ValueError(f"--out {args.out} exists and is not an empty folder; choose a new folder")
            n = add_to_pipeline(pipe, loras[0], unet_scale=args.alpha, text_encoder_scale=te_scale)
            # write beside the target, then rename: a crash never leaves a folder that looks like a model
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
            try:
                pipe.save_pretrained(tmp, safe_serialization=True)
                if out.exists():
                    out.rmdir()
                os.replace(tmp, out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            print(f"merged {n} modules and {len(loras[0].tokens)} tokens at alpha {args.alpha}: {args.out}")
        else:
            from ..single_file import save_merged_single_file

            paths = save_merged_single_file(
                pipe, loras[0], args.out, unet_scale=args.alpha, text_encoder_scale=te_scale, half=args.half
            )
            for kind, path in paths.items():
                print(f"{kind}: {path}")
        return 0
    if len(loras) < 2:
        raise ValueError(f"add {args.mode} needs two or more LoRAs, got {len(loras)}")
    if args.mode == "lpl":
        from ..merge import merge_loras

        merged, report = merge_loras(
            loras,
            weights=args.weights,
            mode=args.merge_mode,
            rank=args.rank,
            allow_mixed_bases=args.allow_mixed_bases,
        )
        if report is not None:
            print(report.table())
        save_lora(args.out, merged)
        print(
            f"merged {len(loras)} LoRAs ({args.merge_mode}, weights {merged.metadata['merge']['weights']}): {args.out}"
        )
        return 0
    from ..merge import join_loras

    joined = join_loras(loras, names=args.names, allow_mixed_bases=args.allow_mixed_bases)
    save_lora(args.out, joined)
    print(f"joined parts {[p['name'] for p in joined.metadata['parts']]}: {args.out}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "add",
        help="merge a LoRA into a model (upl, upl-ckpt) or combine LoRAs (lpl: weighted merge, ljl: join)",
        description="upl: W += alpha·ΔW into a diffusers folder. upl-ckpt: the same as one original-layout "
        "checkpoint plus an A1111 embedding. lpl: ΔW = Σ wᵢ ΔWᵢ (exact by rank concatenation, optional SVD "
        "to --rank). ljl: one file whose parts load as separate adapters with their own scales.",
        **examples(
            "lora-ops add upl my_lora.safetensors --base ./sd15 --alpha 0.8 --out ./sd15-merged",
            "lora-ops add upl-ckpt my_lora.safetensors --base model.safetensors --model-config ./sd15 --out merged.safetensors",
            "lora-ops add lpl a.safetensors b.safetensors --weights 0.7 0.3 --out ab.safetensors",
        ),
    )
    p.add_argument("mode", choices=MODES)
    p.add_argument("loras", nargs="+", help="LoRA files (any supported format)")
    p.add_argument("--out", required=True, help="output folder (upl), checkpoint (upl-ckpt) or LoRA file")
    p.add_argument(
        "--base",
        help="base model (upl/upl-ckpt; needed to read lora_diffusion files): diffusers folder, hub id, or one-file "
        ".safetensors/.ckpt with --model-config",
    )
    add_model_config_flag(p)
    p.add_argument("--alpha", type=float, default=1.0, help="upl: scale of the LoRA (UNet, and text encoder)")
    p.add_argument("--text-encoder-alpha", type=float, help="upl: text-encoder scale (default: --alpha)")
    p.add_argument("--half", action="store_true", help="upl-ckpt: store fp16")
    p.add_argument("--weights", type=float, nargs="+", help="lpl: one weight per LoRA (default 1/n each)")
    p.add_argument("--merge-mode", choices=("concat", "svd", "legacy-sum-factors"), default="concat")
    p.add_argument("--rank", type=int, help="lpl --merge-mode svd: target rank")
    p.add_argument("--names", nargs="+", help="ljl: one adapter name per part")
    p.add_argument("--allow-mixed-bases", action="store_true", help="combine LoRAs recorded for different bases")
    p.set_defaults(func=run, field_flags={"mode": "--merge-mode"})  # merge_loras(mode=) is --merge-mode
