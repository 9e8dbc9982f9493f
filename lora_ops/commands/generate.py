"""`lora-ops generate`: text-to-image, image-to-image or inpainting with zero or more LoRAs."""

from __future__ import annotations

from . import add_device_flag, examples, resolve_device


def run(args) -> int:
    from ..generate import GenerateConfig, LoraUse, generate, save_images

    config = GenerateConfig(
        model=args.model,
        prompts=args.prompt,
        loras=[LoraUse.parse(s) for s in args.lora],
        task=args.task,
        init_image=args.init_image,
        mask_image=args.mask_image,
        seeds=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        strength=args.strength,
        device=resolve_device(args.device),
        dtype=args.dtype,
        model_config=args.model_config,
    )
    paths, grid = save_images(generate(config), config, args.out)
    print(f"wrote {len(paths)} images and {grid}")
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="generate images with a base model and LoRAs",
        **examples(
            'lora-ops generate --model ./sd15 --prompt "a photo of <s1><s2>" --lora my_lora.safetensors --out imgs/',
            'lora-ops generate --model ./sd15 --prompt "a dog" --lora a.safetensors:0.8:0.5 --seed 0 --seed 1 '
            "--out imgs/",
            'lora-ops generate --model ./sd15 --task img2img --init-image in.png --strength 0.6 --prompt "a dog" '
            "--out imgs/",
        ),
    )
    p.add_argument("--model", required=True, help="base model: hub id, diffusers folder or one-file .safetensors/.ckpt")
    p.add_argument(
        "--model-config",
        help="for a one-file checkpoint: a diffusers folder or hub id of the same architecture (configs, tokenizer)",
    )
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for several)")
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:UNET[:TEXT]]",
        help="LoRA file with optional UNet and text-encoder scales (repeat for several)",
    )
    p.add_argument("--task", choices=["text2img", "img2img", "inpaint"], default="text2img")
    p.add_argument("--init-image", help="input image for img2img / inpaint")
    p.add_argument("--mask-image", help="mask for inpaint (white = repaint)")
    p.add_argument("--seed", type=int, action="append", default=None, help="seed (repeat for several; default 0)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--negative-prompt")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--strength", type=float, default=0.75, help="img2img/inpaint strength")
    add_device_flag(p)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--out", required=True, help="output folder (PNGs and grid.png)")
    p.set_defaults(
        func=lambda a: run(_defaults(a)),
        field_flags={"prompts": "--prompt", "loras": "--lora", "seeds": "--seed", "guidance_scale": "--guidance"},
    )


def _defaults(args):
    args.seed = args.seed or [0]
    return args
