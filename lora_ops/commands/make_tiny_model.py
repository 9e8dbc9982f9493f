"""`lora-ops make-tiny-model DIR`: a diffusers folder with random weights, offline."""

from __future__ import annotations

from . import examples

ARCHS = (
    "tiny",
    "sd15",
    "sd21",
    "sdxl-tiny",
    "sdxl",
)  # lora_ops.tiny.ARCHS (a test checks they agree); importing it loads torch


def run(args) -> int:
    from ..tiny import make_tiny_model

    path = make_tiny_model(args.dir, arch=args.arch, inpainting=args.inpainting, seed=args.seed)
    print(path)
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "make-tiny-model",
        help="write a Stable Diffusion folder with random weights (no download)",
        **examples("lora-ops make-tiny-model ./tiny", "lora-ops make-tiny-model ./sd15-shape --arch sd15"),
    )
    p.add_argument("dir", help="output folder")
    p.add_argument(
        "--arch", choices=ARCHS, default="tiny", help="tiny or sdxl-tiny (CPU tests), or the SD 1.5 / 2.1 / SDXL shapes"
    )
    p.add_argument("--inpainting", action="store_true", help="9-channel inpainting UNet")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
