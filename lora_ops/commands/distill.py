"""`lora-ops distill --tuned DIR --base DIR --rank R OUT`: a fine-tuned model as a LoRA, by SVD of ΔW."""

from __future__ import annotations

from . import add_device_flag, examples, resolve_device


def run(args) -> int:
    from ..distill import DistillConfig, distill
    from ..lora_file import save_lora

    config = DistillConfig(
        rank=args.rank,
        unet_targets=None if args.unet_targets == "none" else args.unet_targets,
        text_encoder_targets=None if args.text_encoder_targets == "none" else args.text_encoder_targets,
        clamp_quantile=args.clamp_quantile,
        method=args.method,
        device=resolve_device(args.device),
    )
    lora, report = distill(args.tuned, args.base, config, model_config=args.model_config)
    lora.metadata["base_model"] = str(args.base)
    save_lora(args.output, lora, dtype=args.dtype)
    print(report.table())
    print(f"wrote {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "distill",
        help="SVD-distill a fully fine-tuned model into a LoRA against its base",
        description="ΔW = W_tuned - W_base of every targeted layer, truncated to --rank by SVD (the original "
        "lora_distill / cli_svd).",
        **examples(
            "lora-ops distill d.safetensors --tuned ./dreambooth-model --base ./sd15 --rank 16",
            "lora-ops distill d.safetensors --tuned finetune.safetensors --base sd15.safetensors --model-config ./sd15 "
            "--rank 32",
            "lora-ops distill d.safetensors --tuned ./tuned --base ./sd15 --rank 4 --unet-targets unet-extended "
            "--clamp-quantile 1",
        ),
    )
    p.add_argument("output", help="native LoRA file to write")
    p.add_argument("--tuned", required=True, help="fine-tuned diffusers folder or one-file .safetensors/.ckpt")
    p.add_argument("--base", required=True, help="base it was tuned from: diffusers folder or one-file checkpoint")
    p.add_argument(
        "--model-config",
        help="for one-file checkpoints: a diffusers folder or hub id of their architecture (configs, tokenizer)",
    )
    p.add_argument("--rank", type=int, default=4, help="rank of the LoRA (default: 4)")
    p.add_argument(
        "--unet-targets", default="unet", help="unet, unet-extended (adds resnet convs) or none (default: unet)"
    )
    p.add_argument(
        "--text-encoder-targets", default="text_encoder", help="text_encoder or none (default: text_encoder)"
    )
    p.add_argument(
        "--clamp-quantile", type=float, default=0.99, help="clamp factors to this quantile (1: exact; default: 0.99)"
    )
    p.add_argument("--method", choices=("full", "randomized"), default="full")
    add_device_flag(p)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.set_defaults(func=run)
