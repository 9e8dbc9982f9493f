"""`lora-ops convert IN OUT --to FORMAT`: between native, diffusers, kohya, lora_diffusion, A1111 embeddings."""

from __future__ import annotations

from . import add_model_config_flag, examples, resolve_base

FORMATS = ("native", "diffusers", "kohya", "lora_diffusion", "a1111_embedding")


def run(args) -> int:
    from ..formats import read_any, write_any

    if args.tokens != "bundle" and args.to != "kohya":
        raise ValueError(f"--tokens {args.tokens}: only --to kohya has a choice (diffusers always writes them apart)")
    base = resolve_base(args.base, args.model_config)
    lora = read_any(args.input, base=base, token=args.token)
    path = write_any(args.output, lora, args.to, base=base, tokens=args.tokens)
    print(f"{lora.metadata.get('source_format', 'native')} -> {args.to}: {path}")
    separate = args.to == "kohya" and args.tokens == "separate"
    if (separate or args.to == "diffusers" and str(args.output).endswith(".safetensors")) and lora.tokens:
        from ..diffusers_export import token_file_name

        stem = path.with_suffix("").name
        how = "clip_l into text_encoder, clip_g into text_encoder_2" if lora.tokens_2 else "pipe.load_textual_inversion"
        for token in lora.tokens:
            print(f"token {token}: {path.parent / (stem + '.' + token_file_name(token))} ({how}, token={token!r})")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a LoRA or embedding between formats (native, diffusers, kohya, lora_diffusion, A1111)",
        description="Reads any supported format (.safetensors, or .pt/.bin read with weights_only=True) and "
        "writes FORMAT. Scales are preserved exactly (see docs/surgery.md).",
        **examples(
            "lora-ops convert pti.safetensors a1111.safetensors --to kohya                   # tokens bundled",
            "lora-ops convert pti.safetensors comfy.safetensors --to kohya --tokens separate  # + comfy.s1.safetensors",
            "lora-ops convert pti.safetensors out/ --to diffusers",
        ),
    )
    p.add_argument("input", help="input file (format detected from metadata and keys)")
    p.add_argument(
        "output",
        help="output file; for --to diffusers a folder (LoRA + one embedding per token), or a .safetensors file "
        "with the tokens beside it as <stem>.<token>.safetensors",
    )
    p.add_argument("--to", choices=FORMATS, required=True, help="output format")
    p.add_argument(
        "--base",
        help="base model (diffusers folder or one-file checkpoint with --model-config): needed for lora_diffusion "
        "in or out and for kohya SDXL files of UNets other than SDXL 1.0's; checks shapes when given",
    )
    add_model_config_flag(p)
    p.add_argument("--token", help="token name for an A1111 embedding input (default: <file stem>)")
    p.add_argument(
        "--tokens",
        choices=["bundle", "separate", "none"],
        default="bundle",
        help="learned tokens in a kohya file: bundle (bundle_emb.* keys in the file: A1111 reads them; diffusers' "
        "load_lora_weights refuses them, ComfyUI ignores them), separate (one A1111 embedding <stem>.<token>."
        "safetensors per token beside it: diffusers' load_textual_inversion, ComfyUI's embedding:name, A1111), "
        "none (drop them)",
    )
    p.set_defaults(func=run)
