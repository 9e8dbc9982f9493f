"""finish: end the pipeline run's MLflow runs when the DAG run ends (the parent with the run's outcome).

    python -m lora_pipeline.steps.finish --run-id RUN_ID --status FINISHED|FAILED

The DAG runs it last twice over: with FINISHED when every step succeeded, with FAILED when any failed
(Airflow trigger rules `all_success` / `one_failed`). Nested runs still RUNNING (a step killed before it
could end its own run) end as FAILED. Without MLFLOW_TRACKING_URI there is nothing to end.
"""

from __future__ import annotations

import sys
from typing import Any

from . import common
from .tracking import end_pipeline

STEP = "finish"


def build_parser():
    p = common.parser(STEP, __doc__.splitlines()[0], compute=False, out_required=False)
    p.add_argument("--status", required=True, choices=["FINISHED", "FAILED"], help="the DAG run's outcome")
    return p


def run(argv: list[str] | None = None) -> dict[str, Any]:
    args = common.parse(build_parser(), argv)
    return {"step": STEP, "run_id": args.run_id, **end_pipeline(args.run_id, args.status, args.experiment)}


def main(argv: list[str] | None = None) -> int:
    return common.main(STEP, run, argv)


if __name__ == "__main__":
    sys.exit(main())
