"""preprocess: a folder of subject images -> a captioned, masked, square-cropped training dataset.

    python -m lora_pipeline.steps.preprocess --run-id RUN_ID --dataset URI --out URI
        [--resolution 512] [--caption-model ID|none] [--mask clipseg|face|none] [--mask-model ID]
        [--mask-phrases "face"] [--crop center|mask] [--token-substitution WORD|TOKENS]
        [--caption-prefix TEXT] [--on-error raise|skip] [--seed N]

Writes `<name>.png`, `<name>.txt`, `<name>.mask.png`, `dataset.json` (the preprocessing record) and
`preview/contact_sheet.png`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from . import common
from .artifacts import fetch, find_completed, publish, uri_of
from .tracking import start_step

STEP = "preprocess"


def build_parser():
    p = common.parser(STEP, __doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="prefix of the raw images (captions as <name>.txt optional)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument(
        "--caption-model",
        default="Salesforce/blip-image-captioning-base",
        help="BLIP hub id or folder; 'none' keeps <name>.txt or the file name",
    )
    p.add_argument("--mask", default="clipseg", choices=["clipseg", "face", "none"], help="how masks are made")
    p.add_argument("--mask-model", default="CIDAS/clipseg-rd64-refined", help="CLIPSeg hub id or folder")
    p.add_argument("--mask-phrases", default="face", help='phrases naming the subject, "|"-separated')
    p.add_argument("--crop", default="mask", choices=["center", "mask"])
    p.add_argument(
        "--token-substitution",
        default=None,
        help='"WORD|TOKENS": replace WORD in captions by TOKENS (e.g. "a dog|<s1><s2>"); TOKENS alone prepends',
    )
    p.add_argument("--caption-prefix", default="", help="text put before every caption")
    p.add_argument("--on-error", default="raise", choices=["raise", "skip"], help="bad input images")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from lora_ops.preprocess import PreprocessConfig, preprocess_dataset

    args = common.parse(build_parser(), argv, inputs=("--dataset",))
    caption_model = None if args.caption_model.lower() == "none" else args.caption_model
    substitute: tuple[str, ...] = ()
    token = None
    if args.token_substitution:
        parts = args.token_substitution.split("|")
        if len(parts) == 1:
            token = parts[0]
        elif len(parts) == 2 and all(parts):
            substitute, token = (parts[0],), parts[1]
        else:
            raise ValueError(f"--token-substitution={args.token_substitution!r}: expected WORD|TOKENS or TOKENS")
    params = {
        "resolution": args.resolution,
        "caption_model": caption_model,
        "mask": args.mask,
        "mask_model": args.mask_model if args.mask == "clipseg" else None,
        "mask_phrases": args.mask_phrases,
        "crop": args.crop,
        "token_substitution": args.token_substitution,
        "caption_prefix": args.caption_prefix,
        "on_error": args.on_error,
        "seed": args.seed,
    }
    with tempfile.TemporaryDirectory(prefix="lora-preprocess-") as tmp:
        tmp = Path(tmp)
        raw = fetch(args.dataset, tmp / "raw", name="--dataset")
        inputs = {"dataset": raw.lineage()}
        done = find_completed(args.out, STEP, inputs, params)
        if done is not None:
            return done
        with start_step(STEP, args.run_id, args.experiment, params={**params, "dataset": args.dataset},
                        tags=common.lineage_tags()) as tracker:  # fmt: skip
            out_dir = tmp / "out"
            result_lib = preprocess_dataset(
                PreprocessConfig(
                    input_dir=raw.path,
                    output_dir=out_dir,
                    resolution=args.resolution,
                    caption_model=caption_model,
                    caption_prefix=args.caption_prefix,
                    caption_token=token,
                    caption_substitute=substitute,
                    mask=args.mask,
                    mask_model=args.mask_model,
                    mask_prompts=tuple(p for p in args.mask_phrases.split("|") if p),
                    crop=args.crop,
                    # real photos under 64 px are bad input; a model trained at a smaller size takes its own size
                    min_size=min(64, args.resolution),
                    on_error=args.on_error,
                    device=common.device(args.device),
                    seed=args.seed,
                )
            )
            n = len(result_lib.items)
            tracker.log_metrics({"num_images": n, "skipped": len(result_lib.skipped)})
            if result_lib.contact_sheet and Path(result_lib.contact_sheet).is_file():
                tracker.log_image(result_lib.contact_sheet, "preview/contact_sheet.png")
            result = {
                "step": STEP,
                "run_id": args.run_id,
                "out": args.out,
                "dataset": args.out,
                "num_images": n,
                "skipped": len(result_lib.skipped),
                "contact_sheet": uri_of(args.out, "preview/contact_sheet.png"),
            }
            result = publish(out_dir, args.out, step=STEP, run_id=args.run_id, inputs=inputs, parameters=params,
                             result=result)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    return common.main(STEP, run, argv)


if __name__ == "__main__":
    sys.exit(main())
