"""distill: a LoRA re-ranked to rank N by SVD of its factors (no dense ΔW); one invocation per rank.

python -m lora_pipeline.steps.distill --run-id RUN_ID --lora URI --rank N --out URI
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from . import common
from .artifacts import fetch, find_completed, publish, uri_of
from .tracking import start_step

STEP = "distill"
LORA_FILE = "lora.safetensors"


def build_parser():
    p = common.parser(STEP, __doc__.splitlines()[0])
    p.add_argument("--lora", required=True, help="output prefix of tune (or another distill)")
    p.add_argument("--rank", required=True, type=int, help="target rank")
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    from lora_ops import load_lora, save_lora
    from lora_ops.resize import ResizeConfig, resize_lora

    args = common.parse(build_parser(), argv, inputs=("--lora",))
    if args.rank < 1:
        raise ValueError(f"--rank={args.rank}: must be a positive integer")
    params = {"rank": args.rank}
    with tempfile.TemporaryDirectory(prefix="lora-distill-") as tmp:
        tmp = Path(tmp)
        src = fetch(args.lora, tmp / "in", name="--lora", require_manifest=True, include=lambda p: p == LORA_FILE)
        inputs = {"lora": src.lineage()}
        done = find_completed(args.out, STEP, inputs, params)
        if done is not None:
            return done
        with start_step(STEP, args.run_id, args.experiment, params={**params, "lora": args.lora},
                        tags={"rank": args.rank}, run_name=f"distill-r{args.rank}") as tracker:  # fmt: skip
            lora = load_lora(src.path / LORA_FILE)
            before = max((m.r for comp in (lora.unet, lora.text_encoder) for m in comp.values()), default=0)
            resized, report = resize_lora(
                lora, ResizeConfig(mode="rank", rank=args.rank, device=common.device(args.device))
            )
            out_dir = tmp / "out"
            out_dir.mkdir()
            save_lora(out_dir / LORA_FILE, resized)
            (out_dir / "report.txt").write_text(report.table() + "\n")
            metrics = {"energy": report.energy, "rank_before": before, "rank": args.rank}
            tracker.log_metrics(metrics)
            result = {
                "step": STEP,
                "run_id": args.run_id,
                "out": args.out,
                "lora": uri_of(args.out, LORA_FILE),
                "rank": args.rank,
                "energy": report.energy,
            }
            result = publish(out_dir, args.out, step=STEP, run_id=args.run_id, inputs=inputs, parameters=params,
                             result=result)  # fmt: skip
            tracker.log_artifact(out_dir / "report.txt")
    return result


def main(argv: list[str] | None = None) -> int:
    return common.main(STEP, run, argv)


if __name__ == "__main__":
    sys.exit(main())
