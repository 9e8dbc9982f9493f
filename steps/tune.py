"""tune: LoRA tuning around learned tokens (phase 2 of pivotal tuning): dataset + tokens -> LoRA file.

    python -m lora_pipeline.steps.tune --run-id RUN_ID --dataset URI --tokens URI --base-model REF [--base-model-config REF] --out URI
        [--rank N] [--steps N] [--lr-unet F] [--lr-text F] [--train-text-encoder]
        [--resolution N] [--seed N] [--save-steps N] [--use-masks]
        [--enable-bucket auto|true|false] [--bucket-reso-steps N]

Writes `lora.safetensors`. Every `--save-steps` a checkpoint is uploaded to
`<out>/checkpoints/<phase>-<step>/` (with its own manifest); a retried step downloads the newest
complete one and resumes from it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import common
from .artifacts import MANIFEST, Store, fetch, find_completed, parse_uri, publish, uri_of
from .models import resolve_base_model
from .tracking import start_step

STEP = "tune"
LORA_FILE = "lora.safetensors"
CHECKPOINTS = "checkpoints"


def build_parser():
    p = common.parser(STEP, __doc__.splitlines()[0])
    p.add_argument("--dataset", required=True, help="dataset prefix (normally the preprocess output)")
    p.add_argument("--tokens", required=True, help="output prefix of the invert step")
    common.add_base_model_args(p)
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--lr-unet", type=float, default=1e-4)
    p.add_argument("--lr-text", type=float, default=1e-5)
    p.add_argument("--train-text-encoder", action="store_true", help="LoRA on the text encoder too")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1, help="images per optimizer step (default 1)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--save-steps", type=int, default=100, help="upload a checkpoint every N steps (default 100)")
    p.add_argument("--use-masks", action="store_true", help="weight the loss by the dataset's masks")
    common.add_bucket_args(p)
    return p


def remote_checkpoints(out: str, store: Store) -> list[str]:
    """Names of the complete (manifest written) checkpoints under `<out>/checkpoints/`, oldest first."""
    from lora_ops.training.checkpoints import checkpoint_order

    root = parse_uri(out, "--out").as_prefix().join(CHECKPOINTS)
    names = set()
    for rel, _ in store.list(root):
        parts = rel.split("/")
        if len(parts) == 2 and parts[1] == MANIFEST and checkpoint_order(parts[0]):
            names.add(parts[0])
    return sorted(names, key=checkpoint_order)


class CheckpointUploader:
    """Uploads every new complete local checkpoint folder; called from the training callback."""

    def __init__(self, train_dir: Path, out: str, run_id: str, store: Store, already: set[str]):
        self.train_dir, self.out, self.run_id, self.store = train_dir, out, run_id, store
        self.uploaded = set(already)

    def sync(self) -> list[str]:
        from lora_ops.training.checkpoints import list_checkpoints

        new = []
        for folder in list_checkpoints(self.train_dir):
            if folder.name in self.uploaded:
                continue
            dest = uri_of(self.out, f"{CHECKPOINTS}/{folder.name}")
            publish(folder, dest, step="checkpoint", run_id=self.run_id, inputs={}, parameters={},
                    result={"checkpoint": folder.name}, store=self.store)  # fmt: skip
            print(f"{STEP}: uploaded checkpoint {folder.name}", file=sys.stderr, flush=True)
            self.uploaded.add(folder.name)
            new.append(folder.name)
        return new


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from lora_ops import load_lora
    from lora_ops.training.config import PTIConfig
    from lora_ops.training.pti import run_tuning

    args = common.parse(build_parser(), argv, inputs=("--dataset", "--tokens", "--base-model", "--base-model-config"))
    if args.save_steps < 1:
        raise ValueError(f"--save-steps={args.save_steps}: must be >= 1")
    params = {
        "rank": args.rank,
        "steps": args.steps,
        "lr_unet": args.lr_unet,
        "lr_text": args.lr_text,
        "train_text_encoder": args.train_text_encoder,
        "resolution": args.resolution,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "use_masks": args.use_masks,
        **common.bucket_options(args),
    }
    store = Store.for_uri(args.out)
    with tempfile.TemporaryDirectory(prefix="lora-tune-") as tmp:
        tmp = Path(tmp)
        dataset = fetch(args.dataset, tmp / "dataset", name="--dataset", include=common.is_dataset_file)
        tokens = fetch(args.tokens, tmp / "tokens", name="--tokens", require_manifest=True)
        tokens_file = next(iter(sorted((tokens.path).glob("*.safetensors"))), None)
        if tokens_file is None:
            raise ValueError(f"--tokens={args.tokens}: holds no .safetensors tokens file")
        base = resolve_base_model(args.base_model, config=args.base_model_config)
        inputs = {"dataset": dataset.lineage(), "tokens": tokens.lineage(), "base_model": base.lineage()}
        done = find_completed(args.out, STEP, inputs, params)
        if done is not None:
            return done
        inversion = (tokens.manifest or {}).get("parameters", {})
        placeholder = "|".join(load_lora(tokens_file).tokens)
        if not placeholder:
            raise ValueError(f"--tokens={args.tokens}: the tokens file holds no learned tokens")

        # ---- resume: the newest complete checkpoint uploaded by an earlier attempt
        train_dir = tmp / "train"
        done_ckpts = remote_checkpoints(args.out, store)
        resumed_from = None
        if done_ckpts:
            resumed_from = done_ckpts[-1]
            fetch(uri_of(args.out, f"{CHECKPOINTS}/{resumed_from}"), train_dir / CHECKPOINTS / resumed_from,
                  store, name="checkpoint", require_manifest=True)  # fmt: skip
            print(f"{STEP}: resuming from checkpoint {resumed_from}", file=sys.stderr, flush=True)

        config = PTIConfig(
            pretrained_model_name_or_path=base.path,
            single_file_config=base.config_path,
            instance_data_dir=str(dataset.path),
            output_dir=str(train_dir),
            out_name="lora",
            placeholder_tokens=placeholder,
            use_template=inversion.get("template", "object"),
            max_train_steps_tuning=args.steps,
            lora_rank=args.rank,
            learning_rate_unet=args.lr_unet,
            learning_rate_text=args.lr_text,
            train_text_encoder=args.train_text_encoder,
            resolution=args.resolution,
            train_batch_size=args.batch_size,
            seed=args.seed,
            use_masks=args.use_masks,
            **common.bucket_options(args),
            save_steps=args.save_steps,
            device=args.device,
            resume="auto",
            perform_inversion=False,
        )
        with start_step(STEP, args.run_id, args.experiment, params={**params, "dataset": args.dataset,
                        "tokens": args.tokens, "base_model": args.base_model},
                        tags=common.lineage_tags()) as tracker:  # fmt: skip
            uploader = CheckpointUploader(train_dir, args.out, args.run_id, store, set(done_ckpts))
            log_loss = tracker.loss_callback()

            def callback(step: int, values: dict) -> None:
                log_loss(step, values)
                uploader.sync()  # the checkpoint of the previous step, if one was written

            trained = run_tuning(config, tokens_from=tokens_file, callback=callback)
            uploader.sync()
            out_dir = tmp / "out"
            out_dir.mkdir()
            shutil.copyfile(trained.path, out_dir / LORA_FILE)
            tracker.log_metrics({f"final/{k}": v for k, v in trained.metrics.items()})
            result = {
                "step": STEP,
                "run_id": args.run_id,
                "out": args.out,
                "lora": uri_of(args.out, LORA_FILE),
                "rank": args.rank,
                "loss": trained.metrics.get("tuning/loss"),
                "resumed_from": resumed_from,
            }
            result = publish(out_dir, args.out, step=STEP, run_id=args.run_id, inputs=inputs, parameters=params,
                             result=result, store=store)  # fmt: skip
    return result


def main(argv: list[str] | None = None) -> int:
    return common.main(STEP, run, argv)


if __name__ == "__main__":
    sys.exit(main())
