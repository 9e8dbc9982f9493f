"""`lora-ops preprocess IN_DIR OUT_DIR`: caption, mask, crop and resize a folder of images."""

from __future__ import annotations

import json

from . import add_device_flag, examples, resolve_device


def run(args) -> int:
    from ..preprocess import PreprocessConfig, preprocess_dataset

    config = PreprocessConfig(
        input_dir=args.input_dir,
        output_dir=args.output_dir,
        resolution=args.resolution,
        caption_model=None if args.caption_model.lower() == "none" else args.caption_model,
        caption_prefix=args.caption_prefix,
        caption_token=args.caption_token,
        caption_substitute=args.substitute or (),
        caption_max_tokens=args.caption_max_tokens,
        caption_min_tokens=args.caption_min_tokens,
        mask=args.mask,
        mask_model=args.mask_model,
        mask_prompts=args.mask_prompt or ("face",),
        mask_threshold=args.mask_threshold,
        mask_temperature=args.mask_temperature,
        crop=args.crop,
        upscale_model=args.upscale_model,
        min_size=args.min_size,
        on_error="skip" if args.skip_bad else "raise",
        overwrite=args.overwrite,
        device=resolve_device(args.device),
        dtype=args.dtype,
        seed=args.seed,
    )
    result = preprocess_dataset(config)
    print(
        json.dumps(
            {
                "output_dir": str(result.output_dir),
                "images": len(result.items),
                "skipped": [s["file"] for s in result.skipped],
                "record": str(result.record),
                "contact_sheet": str(result.contact_sheet),
            }
        )
    )
    return 0


def register(sub) -> None:
    p = sub.add_parser(
        "preprocess",
        help="caption (BLIP), mask (CLIPSeg or faces), crop and resize images into a training dataset",
        description="Writes <name>.png, <name>.txt, <name>.mask.png, dataset.json (the record) and preview/contact_sheet.png.",
        **examples(
            'lora-ops preprocess photos/ dataset/ --resolution 512 --caption-token "<s1><s2>" --substitute "a man"',
            "lora-ops preprocess photos/ dataset/ --caption-model none --mask none --crop center",
        ),
    )
    p.add_argument("input_dir", help="folder of images")
    p.add_argument("output_dir", help="dataset folder to write (must be empty unless --overwrite)")
    p.add_argument("--resolution", type=int, default=512, help="side of the square output images")
    p.add_argument(
        "--caption-model",
        default="Salesforce/blip-image-captioning-base",
        help="BLIP hub id or folder; 'none' keeps <stem>.txt beside each image or the file name",
    )
    p.add_argument("--caption-prefix", default="", help="text before every caption, e.g. 'a photo of <s1><s2>,'")
    p.add_argument("--caption-token", default=None, help="learned token to put into every caption")
    p.add_argument(
        "--substitute", action="append", metavar="PHRASE", help="phrase the token replaces (repeatable), e.g. 'a man'"
    )
    p.add_argument("--caption-max-tokens", type=int, default=40)
    p.add_argument("--caption-min-tokens", type=int, default=5)
    p.add_argument("--mask", choices=("clipseg", "face", "none"), default="clipseg", help="how masks are made")
    p.add_argument("--mask-model", default="CIDAS/clipseg-rd64-refined", help="CLIPSeg hub id or folder")
    p.add_argument(
        "--mask-prompt", action="append", metavar="PHRASE", help="what to segment (repeatable; default 'face')"
    )
    p.add_argument("--mask-threshold", type=float, default=None, help="probability for binary masks (default: soft)")
    p.add_argument("--mask-temperature", type=float, default=1.0, help="CLIPSeg logit temperature")
    p.add_argument("--crop", choices=("mask", "center"), default="mask", help="square crop around the mask or center")
    p.add_argument(
        "--upscale-model", default=None, help="Swin2SR hub id or folder for images smaller than the resolution"
    )
    p.add_argument("--min-size", type=int, default=64, help="shorter sides below this are bad input")
    p.add_argument("--skip-bad", action="store_true", help="skip unreadable or tiny images with a warning")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    add_device_flag(p)
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(
        func=run,
        field_flags={"caption_substitute": "--substitute", "mask_prompts": "--mask-prompt", "on_error": "--skip-bad"},
    )
