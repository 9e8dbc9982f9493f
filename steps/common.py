"""What every step shares: common flags, the result line, XCom, exit codes and one-line errors."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_ops import image_files

from .artifacts import CredentialsError, IntegrityError, StorageError, local_names, refuse_overlap

XCOM_DIR = Path("/airflow/xcom")
EXIT_OK, EXIT_UNEXPECTED, EXIT_INPUT, EXIT_INFRA = 0, 1, 2, 3


def parser(step: str, description: str, compute: bool = True, out_required: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"python -m lora_pipeline.steps.{step}", description=description)
    p.add_argument(
        "--run-id",
        default=os.environ.get("AIRFLOW_CTX_DAG_RUN_ID"),
        help="pipeline run id (default: $AIRFLOW_CTX_DAG_RUN_ID)",
    )
    p.add_argument("--out", required=out_required, help="output prefix: s3://bucket/runs/<run_id>/<step>/ or a folder")
    p.add_argument("--experiment", default="lora-pipeline", help="MLflow experiment (default lora-pipeline)")
    if compute:
        p.add_argument(
            "--device",
            default="auto",
            choices=["auto", "cpu", "cuda"],
            help="compute device: auto (CUDA if available, else CPU), cpu, cuda (default: auto)",
        )
    return p


BASE_MODEL_HELP = (
    "hub id, diffusers folder, s3:// prefix, or a one-file .safetensors/.ckpt checkpoint (file or s3:// object)"
)


def add_base_model_args(p: argparse.ArgumentParser) -> None:
    """`--base-model` and, for a one-file checkpoint, `--base-model-config` (its architecture's configs)."""
    p.add_argument("--base-model", required=True, help=BASE_MODEL_HELP)
    p.add_argument("--base-model-config", default=None,
                   help="for a one-file checkpoint: a hub id, diffusers folder or s3:// prefix of the same "
                   "architecture (configs and tokenizer)")  # fmt: skip


def add_bucket_args(p: argparse.ArgumentParser) -> None:
    """Aspect-ratio bucketing flags of the training steps (the trainers' `enable_bucket`, `bucket_reso_steps`)."""
    p.add_argument("--enable-bucket", default="auto", choices=["auto", "true", "false"],
                   help="aspect-ratio bucketing: auto = on for SDXL bases, off (square crops) for SD 1.x/2.x")  # fmt: skip
    p.add_argument("--bucket-reso-steps", type=int, default=64, help="bucket sides step by N pixels (default 64)")


def bucket_options(args: argparse.Namespace) -> dict[str, Any]:
    """The trainer options of `add_bucket_args`' flags (also the step's recorded parameters)."""
    return {
        "enable_bucket": {"auto": None, "true": True, "false": False}[args.enable_bucket],
        "bucket_reso_steps": args.bucket_reso_steps,
    }


def parse(p: argparse.ArgumentParser, argv: list[str] | None, inputs: tuple[str, ...] = ()) -> argparse.Namespace:
    """Parse the flags; `inputs` names the flags holding input URIs, which `--out` must not overlap."""
    args = p.parse_args(argv)
    if not args.run_id:
        p.error("--run-id is required (or set AIRFLOW_CTX_DAG_RUN_ID)")
    if "/" in args.run_id or args.run_id.strip() != args.run_id:
        p.error(f"--run-id={args.run_id!r} must not contain '/' or surrounding spaces")
    refuse_overlap(args.out, {flag: getattr(args, flag.lstrip("-").replace("-", "_")) for flag in inputs})
    return args


def device(name: str) -> str:
    """`auto` -> CUDA, else MPS, else CPU (`lora_ops.devices.resolve_device`); any other name as given."""
    from lora_ops.devices import resolve_device

    return resolve_device(name)


def lineage_tags() -> dict[str, str]:
    """Airflow context, image digest and code version from the environment (when known)."""
    out = {}
    for env_key, tag in (
        ("AIRFLOW_CTX_DAG_ID", "airflow_dag_id"),
        ("AIRFLOW_CTX_DAG_RUN_ID", "airflow_run_id"),
        ("LORA_PIPELINE_IMAGE_DIGEST", "image_digest"),
        ("LORA_PIPELINE_CODE_VERSION", "code_version"),
    ):
        if os.environ.get(env_key):
            out[tag] = os.environ[env_key]
    return out


def emit(result: dict[str, Any]) -> None:
    """The result JSON: last stdout line, and /airflow/xcom/return.json when that folder exists."""
    line = json.dumps(result, sort_keys=True, default=str)
    xcom = Path(os.environ.get("LORA_PIPELINE_XCOM_DIR") or XCOM_DIR)
    if xcom.is_dir():
        tmp = xcom / ".return.json.tmp"
        tmp.write_text(line)
        os.replace(tmp, xcom / "return.json")
    sys.stdout.flush()
    print(line, flush=True)


_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


def _redact(text: str) -> str:
    """Mask credential values from the environment and any `user:password@` part of a URL."""
    for key in _SECRET_ENV:
        value = os.environ.get(key)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1***@", text)


def main(step: str, run: Callable[[list[str] | None], dict[str, Any]], argv: list[str] | None = None) -> int:
    """Run a step's `run(argv) -> result`, print the result, map failures to one line and an exit code.

    Exit codes: 0 ok; 2 bad input, configuration, credentials or integrity (retrying will not help);
    3 object store or tracking server unreachable after retries; 1 anything unexpected.
    """
    try:
        result = run(argv)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        print(f"{step}: interrupted", file=sys.stderr)
        return 130
    except (CredentialsError, IntegrityError, ValueError, TypeError, FileNotFoundError) as exc:
        print(_redact(local_names(f"{step}: error: {exc}")), file=sys.stderr)
        return EXIT_INPUT
    except StorageError as exc:
        print(_redact(f"{step}: storage unavailable: {exc}"), file=sys.stderr)
        return EXIT_INFRA
    except Exception as exc:
        if _is_tracking_unreachable(exc):
            print(
                _redact(f"{step}: MLflow unreachable at {os.environ.get('MLFLOW_TRACKING_URI')}: {exc}"),
                file=sys.stderr,
            )
            return EXIT_INFRA
        print(_redact(traceback.format_exc()), file=sys.stderr)
        print(_redact(local_names(f"{step}: unexpected error: {type(exc).__name__}: {exc}")), file=sys.stderr)
        return EXIT_UNEXPECTED
    emit(result)
    return EXIT_OK


def _is_tracking_unreachable(exc: BaseException) -> bool:
    try:
        from mlflow.exceptions import MlflowException
    except ImportError:
        return False
    text = str(exc)
    return isinstance(exc, MlflowException) and ("Max retries exceeded" in text or "Connection refused" in text)


DATASET_SUFFIXES = (*image_files.DATASET_SUFFIXES, image_files.CAPTION_SUFFIX)  # masks end in .png


def is_dataset_file(rel: str) -> bool:
    """Top-level images, `.txt` captions and `.mask.png` masks: what the trainer reads from a dataset prefix."""
    return "/" not in rel and rel.lower().endswith(DATASET_SUFFIXES)
