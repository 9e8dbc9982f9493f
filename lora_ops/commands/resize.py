"""`lora-ops resize IN OUT`: re-rank a LoRA (fixed rank, or per module by energy / Frobenius ratio)."""

from __future__ import annotations

from . import add_device_flag, examples, resolve_device


def run(args) -> int:
    from ..formats import read_any
    from ..lora_file import save_lora
    from ..resize import ResizeConfig, resize_lora

    device = resolve_device(args.device)
    if args.energy is not None:
        config = ResizeConfig(mode="energy", threshold=args.energy, rank=args.rank, device=device)
    elif args.frobenius is not None:
        config = ResizeConfig(mode="frobenius", threshold=args.frobenius, rank=args.rank, device=device)
    else:
        if args.rank is None:
            raise ValueError("give --rank R, or --energy T / --frobenius T (with --rank as the cap)")
        config = ResizeConfig(mode="rank", rank=args.rank, device=device)
    lora = read_any(args.input, base=args.base)
    out, report = resize_lora(lora, config)
    save_lora(args.output, out, dtype=args.dtype)
    print(report.table())
    print(f"wrote {args.output}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "resize",
        help="re-rank a LoRA by QR + small SVD (no dense ΔW), report kept energy",
        **examples(
            "lora-ops resize big.safetensors small.safetensors --rank 8",
            "lora-ops resize big.safetensors small.safetensors --energy 0.99 --rank 16",
        ),
    )
    p.add_argument("input", help="LoRA file (any supported format)")
    p.add_argument("output", help="native output file")
    p.add_argument("--rank", type=int, help="fixed rank; with --energy/--frobenius, the largest rank allowed")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--energy", type=float, help="per module, keep this fraction of Σ s² (e.g. 0.99)")
    mode.add_argument("--frobenius", type=float, help="per module, keep this fraction of ‖ΔW‖_F (e.g. 0.95)")
    p.add_argument("--base", help="base model folder (needed for lora_diffusion input)")
    add_device_flag(p)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.set_defaults(func=run)
