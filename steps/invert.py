"""invert: textual inversion (phase 1 of pivotal tuning): dataset -> learned token embeddings.

    python -m lora_pipeline.steps.invert --run-id RUN_ID --dataset URI --base-model REF [--base-model-config REF] --out URI
        --placeholder-tokens "<s1>|<s2>" [--initializer-tokens WORDS] [--template object|style|none]
        [--steps N] [--lr F] [--resolution N] [--seed N] [--use-masks] [--save-steps N]
        [--enable-bucket auto|true|false] [--bucket-reso-steps N]

Writes `tokens.safetensors` (a native LoRA file with tokens only).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import common
from .artifacts import fetch, find_completed, publish, uri_of
from .models import resolve_base_model
from .tracking import start_step

STEP = "invert"
TOKENS_FILE = "tokens.safetensors"


def build_parser():
    p = common.parser(STEP, __doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="dataset prefix (normally the preprocess output)")
    common.add_base_model_args(p)
    p.add_argument("--placeholder-tokens", required=True, help='new tokens, e.g. "<s1>|<s2>"')
    p.add_argument("--initializer-tokens", default=None, help='one word per token ("dog|toy") or one for all')
    p.add_argument("--template", default="object", choices=["object", "style", "none"], help="prompt templates")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate of the token rows (default 5e-4)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1, help="images per optimizer step (default 1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--use-masks", action="store_true", help="weight the loss by the dataset's masks")
    p.add_argument("--save-steps", type=int, default=500, help="checkpoint every N steps (local)")
    common.add_bucket_args(p)
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from lora_ops.training.config import PTIConfig
    from lora_ops.training.pti import run_inversion

    args = common.parse(build_parser(), argv, inputs=("--dataset", "--base-model", "--base-model-config"))
    params = {
        "placeholder_tokens": args.placeholder_tokens,
        "initializer_tokens": args.initializer_tokens,
        "template": args.template,
        "steps": args.steps,
        "lr": args.lr,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "use_masks": args.use_masks,
        **common.bucket_options(args),
    }
    with tempfile.TemporaryDirectory(prefix="lora-invert-") as tmp:
        tmp = Path(tmp)
        dataset = fetch(args.dataset, tmp / "dataset", name="--dataset", include=common.is_dataset_file)
        base = resolve_base_model(args.base_model, config=args.base_model_config)
        inputs = {"dataset": dataset.lineage(), "base_model": base.lineage()}
        done = find_completed(args.out, STEP, inputs, params)
        if done is not None:
            return done
        config = PTIConfig(
            pretrained_model_name_or_path=base.path,
            single_file_config=base.config_path,
            instance_data_dir=str(dataset.path),
            output_dir=str(tmp / "train"),
            out_name="tokens",
            placeholder_tokens=args.placeholder_tokens,
            initializer_tokens=args.initializer_tokens,
            use_template=args.template,
            max_train_steps_ti=args.steps,
            learning_rate_ti=args.lr,
            resolution=args.resolution,
            train_batch_size=args.batch_size,
            seed=args.seed,
            use_masks=args.use_masks,
            **common.bucket_options(args),
            save_steps=args.save_steps,
            device=args.device,
            resume="auto",
            perform_tuning=False,
        )
        with start_step(STEP, args.run_id, args.experiment, params={**params, "dataset": args.dataset,
                        "base_model": args.base_model}, tags=common.lineage_tags()) as tracker:  # fmt: skip
            trained = run_inversion(config, callback=tracker.loss_callback())
            out_dir = tmp / "out"
            out_dir.mkdir()
            shutil.copyfile(trained.path, out_dir / TOKENS_FILE)
            tracker.log_metrics({f"final/{k}": v for k, v in trained.metrics.items()})
            result = {
                "step": STEP,
                "run_id": args.run_id,
                "out": args.out,
                "tokens": uri_of(args.out, TOKENS_FILE),
                "placeholder_tokens": args.placeholder_tokens,
                "loss": trained.metrics.get("inversion/loss"),
            }
            result = publish(out_dir, args.out, step=STEP, run_id=args.run_id, inputs=inputs, parameters=params,
                             result=result)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    return common.main(STEP, run, argv)


if __name__ == "__main__":
    sys.exit(main())
