"""`lora-ops distill --tuned DIR --base DIR --rank R OUT`: a fine-tuned model as a LoRA, by SVD of ΔW."""

from __future__ import annotations


def run(args) -> int:
    from ..distill import DistillConfig, distill
    from ..lora_file import save_lora

    config = DistillConfig(
        rank=args.rank,
        unet_targets=None if args.unet_targets == "none" else args.unet_targets,
        text_encoder_targets=None if args.text_encoder_targets == "none" else args.text_encoder_targets,
        clamp_quantile=args.clamp_quantile,
        method=args.method,
        device=args.device,
    )
    lora, report = distill(args.tuned, args.base, config)
    lora.metadata["base_model"] = str(args.base)
    save_lora(args.output, lora, dtype=args.dtype)
    print(report.table())
    print(f"wrote {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("distill", help="SVD-distill a fully fine-tuned model into a LoRA against its base")
    p.add_argument("output", help="native LoRA file to write")
    p.add_argument("--tuned", required=True, help="fine-tuned diffusers folder")
    p.add_argument("--base", required=True, help="base diffusers folder it was tuned from")
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--unet-targets", default="unet", help="unet, unet-extended (adds resnet convs) or none")
    p.add_argument("--text-encoder-targets", default="text_encoder", help="text_encoder or none")
    p.add_argument("--clamp-quantile", type=float, default=0.99, help="clamp factors to this quantile (1: exact)")
    p.add_argument("--method", choices=("full", "randomized"), default="full")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.set_defaults(func=run)
