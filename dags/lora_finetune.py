"""
### lora_finetune: one subject, from images to a registered LoRA

`preprocess → invert → tune → distill (one per rank) → evaluate → register`

Trigger it from the form (**Trigger DAG**): the dataset is a prefix of images (`s3://bucket/datasets/<subject>/`),
the result is a version of the registered model *model_name* in MLflow, aliased `champion` when its
promotion metric beats the current champion's, else `challenger`.

Every step writes to `s3://<LORA_PIPELINE_BUCKET>/runs/<run id>/<step>/` and is idempotent, so a retried
task resumes or reuses its own output. GPU steps share the `lora_gpu` pool (one slot per GPU). Where the
steps run (local subprocess, Docker, Kubernetes) is set by the deployment (`LORA_PIPELINE_EXECUTOR`).
"""

from __future__ import annotations

import os
import re
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import DAG, Param, task
from airflow.sdk.definitions.param import ParamValidationError

sys.path.insert(0, str(Path(__file__).parent))  # the DAG folder's own modules, wherever it is mounted
from lora_pipeline_tasks import ExecutorConfig, json_setting, step_task  # noqa: E402

CONFIG = ExecutorConfig.from_env()
TOKENS_PATTERN = r"^<[^<>|\s]+>(\|<[^<>|\s]+>)*$"
URI_PATTERN = r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/.*|/.+|file:///.+)$"

PARAMS = {
    # --- Data and model
    "dataset_uri": Param(
        "s3://lora-pipeline/datasets/example/",
        type="string",
        pattern=URI_PATTERN,
        title="Dataset",
        description="Prefix of 3-30 images (s3://bucket/datasets/<subject>/ or an absolute folder)",
        section="Data and model",
    ),
    "model_name": Param(
        "example-lora",
        type="string",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        title="Registered model name",
        description="The MLflow registered model that receives the new version",
        section="Data and model",
    ),
    "base_model": Param(
        "stable-diffusion-v1-5/stable-diffusion-v1-5",
        type="string",
        minLength=1,
        title="Base model",
        description="Hub id, local diffusers folder, s3:// prefix, or a one-file .safetensors/.ckpt checkpoint",
        section="Data and model",
    ),
    "base_model_config": Param(
        None,
        type=["null", "string"],
        title="Base model config",
        description="For a one-file checkpoint: hub id, folder or s3:// prefix of the same architecture "
        "(configs and tokenizer); empty otherwise",
        section="Data and model",
    ),
    # --- Tokens
    "placeholder_tokens": Param(
        "<s1>|<s2>",
        type="string",
        pattern=TOKENS_PATTERN,
        title="Placeholder tokens",
        description="The new tokens the model learns, '|'-separated, e.g. <s1>|<s2>",
        section="Tokens",
    ),
    "initializer_tokens": Param(
        None,
        type=["null", "string"],
        title="Initializer tokens",
        description="Words that initialise the new tokens, one per token, '|'-separated (empty: random)",
        section="Tokens",
    ),
    "template": Param(
        "object",
        enum=["object", "style", "none"],
        title="Prompt template",
        description="object / style prompt templates, or none (the captions only)",
        section="Tokens",
    ),
    # --- Captions and masks (the preprocess step; use_masks is where training uses them)
    "caption_model": Param(
        None,
        type=["null", "string"],
        title="Caption model",
        description="Captioning model id, 'none' to use the template only (empty: the step's default)",
        section="Captions and masks",
    ),
    "token_substitution": Param(
        None,
        type=["null", "string"],
        title="Token substitution",
        description='"WORD|TOKENS" replaces WORD in captions by the tokens; TOKENS alone prepends them (empty: off)',
        section="Captions and masks",
    ),
    "mask": Param(
        "clipseg",
        enum=["clipseg", "face", "none"],
        title="Masks",
        description="How subject masks are made (CLIPSeg on the phrases, face detection, or none)",
        section="Captions and masks",
    ),
    "mask_phrases": Param(
        "face",
        type="string",
        title="Mask phrases",
        description="What CLIPSeg looks for, '|'-separated (mask: clipseg)",
        section="Captions and masks",
    ),
    "crop": Param(
        "mask",
        enum=["mask", "center"],
        title="Crop",
        description="Square crop around the mask, or centred",
        section="Captions and masks",
    ),
    "use_masks": Param(
        False,
        type="boolean",
        title="Masked loss",
        description="Weight the loss of inversion and tuning by the subject masks",
        section="Captions and masks",
    ),
    # --- Training
    "ranks": Param(
        [4, 1],
        type="array",
        items={"type": "integer", "minimum": 1, "maximum": 256},
        minItems=1,
        maxItems=8,
        uniqueItems=True,
        title="Ranks to distill",
        description="One distilled LoRA per rank (each at most the tuning rank); the best one is registered",
        section="Training",
    ),
    "tune_rank": Param(
        4,
        type="integer",
        minimum=1,
        maximum=256,
        title="Rank while tuning",
        description="LoRA rank of pivotal tuning",
        section="Training",
    ),
    "batch_size": Param(
        1,
        type="integer",
        minimum=1,
        maximum=256,
        title="Batch size",
        description="Images per optimizer step",
        section="Training",
    ),
    "invert_steps": Param(
        1000,
        type="integer",
        minimum=1,
        maximum=100000,
        title="Inversion steps",
        description="Optimizer steps of textual inversion",
        section="Training",
    ),
    "invert_lr": Param(
        5e-4,
        type="number",
        exclusiveMinimum=0,
        maximum=1,
        title="Inversion LR",
        description="Learning rate of the new token embeddings",
        section="Training",
    ),
    "tune_steps": Param(
        1000,
        type="integer",
        minimum=1,
        maximum=100000,
        title="Tuning steps",
        description="Optimizer steps of LoRA tuning",
        section="Training",
    ),
    "tune_lr_unet": Param(
        1e-4,
        type="number",
        exclusiveMinimum=0,
        maximum=1,
        title="UNet LR",
        description="Learning rate of the UNet LoRA",
        section="Training",
    ),
    "tune_lr_text": Param(
        1e-5,
        type="number",
        minimum=0,
        maximum=1,
        title="Text encoder LR",
        description="Learning rate of the text-encoder LoRA (0: UNet only)",
        section="Training",
    ),
    "resolution": Param(
        512,
        type="integer",
        minimum=8,
        maximum=2048,
        multipleOf=8,
        title="Resolution",
        description="Training and evaluation image size in pixels (a multiple of 8)",
        section="Training",
    ),
    "enable_bucket": Param(
        "auto",
        enum=["auto", "true", "false"],
        title="Aspect-ratio bucketing",
        description="Train each image at its own aspect ratio: auto = on for SDXL bases, off (square crops) "
        "for SD 1.x/2.x",
        section="Training",
    ),
    "bucket_reso_steps": Param(
        64,
        type="integer",
        minimum=8,
        maximum=256,
        multipleOf=8,
        title="Bucket step",
        description="Bucket sides step by this many pixels (64; smaller for small test models)",
        section="Training",
    ),
    "seed": Param(
        0,
        type="integer",
        minimum=0,
        maximum=2**31 - 1,
        title="Seed",
        description="Seed of every step (preprocess, training, evaluation)",
        section="Training",
    ),
    # --- Evaluation
    "promotion_metric": Param(
        "clip_i",
        enum=["clip_i", "clip_t", "classifier"],
        title="Promotion metric",
        description="The new version becomes champion only if this metric beats the champion's",
        section="Evaluation",
    ),
    "clip_model": Param(
        None,
        type=["null", "string"],
        title="CLIP model for evaluation",
        description="Hub id or folder of the CLIP scorer (empty: the step's default)",
        section="Evaluation",
    ),
    "dino_model": Param(
        None,
        type=["null", "string"],
        title="DINO model for evaluation",
        description="Hub id or folder of the DINO scorer (empty: no DINO score)",
        section="Evaluation",
    ),
    "classifier_model": Param(
        None,
        type=["null", "string"],
        title="Classifier for evaluation",
        description="A shapes-world evaluator folder (`lora-ops shapes path evaluator`); empty: no accuracy metric",
        section="Evaluation",
    ),
    "classifier_target": Param(
        None,
        type=["null", "string"],
        pattern="^(shape|colour|style)=[a-z]+$",
        title="Classifier target",
        description='What the LoRA should make the classifier see, e.g. "shape=ring"',
        section="Evaluation",
    ),
    "class_word": Param(
        None,
        type=["null", "string"],
        title="Class word",
        description='The subject\'s class, e.g. "dog" (empty: none)',
        section="Evaluation",
    ),
    "eval_prompts": Param(
        None,
        type=["null", "array"],
        items={"type": "string", "minLength": 1},
        maxItems=16,
        title="Evaluation prompts",
        description='Prompt templates with "{token}", one per line (empty: the step\'s defaults)',
        section="Evaluation",
    ),
    "eval_inference_steps": Param(
        30,
        type="integer",
        minimum=1,
        maximum=200,
        title="Sampling steps of the evaluation",
        description="Denoising steps of each evaluation image",
        section="Evaluation",
    ),
    "eval_guidance_scale": Param(
        7.5,
        type="number",
        minimum=0,
        maximum=30,
        title="Guidance scale of the evaluation",
        description="Classifier-free guidance of the evaluation images (the shapes world draws best at 5).",
        section="Evaluation",
    ),
    "eval_sweep_steps": Param(
        5,
        type="integer",
        minimum=0,
        maximum=20,
        title="Frames of the LoRA-scale sweep GIF (0: off)",
        description="Images of the sweep from LoRA scale 0 to 1 (0: no sweep)",
        section="Evaluation",
    ),
    # --- Execution
    "executor_profile": Param(
        "auto",
        enum=["auto", "cuda", "cpu"],
        title="Executor profile",
        description="Device of the compute steps: auto (GPU when the executor provides one), cuda, cpu",
        section="Execution",
    ),
}


def with_form_defaults(params: dict[str, Param], raw: str) -> dict[str, Param]:
    """`params` with the deployment's own defaults: `raw` is a JSON object {param: default} (empty: none).

    The local profile (`make airflow`) sets `LORA_PIPELINE_FINETUNE_DEFAULTS` to the shapes world's setup, so
    that the form triggers a run that works on a CPU without downloads. Raises ValueError naming the
    variable for malformed JSON, an unknown param or a default its schema rejects.
    """
    defaults = json_setting("LORA_PIPELINE_FINETUNE_DEFAULTS", raw, dict)
    if not defaults:
        return params
    unknown = sorted(set(defaults) - set(params))
    if unknown:
        raise ValueError(f"LORA_PIPELINE_FINETUNE_DEFAULTS: unknown param(s) {unknown}")
    out = dict(params)
    for name, value in defaults.items():
        out[name] = Param(value, params[name].description, schema=params[name].schema)
        try:
            out[name].resolve()
        except ParamValidationError as exc:
            raise ValueError(
                f"LORA_PIPELINE_FINETUNE_DEFAULTS: {name}={value!r} is invalid: {str(exc).splitlines()[0]}"
            ) from None
    return out


PARAMS = with_form_defaults(PARAMS, os.environ.get("LORA_PIPELINE_FINETUNE_DEFAULTS", ""))


def run_key(run_id: str) -> str:
    """An Airflow run id as one safe object-key segment (`manual__2026-01-01T00:00:00+00:00` -> `manual__2026-01-01T00-00-00-00-00`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", run_id)


def build_commands(run_id: str, params: dict[str, Any], bucket: str) -> dict[str, Any]:
    """The flags of every step of one run (docs/steps.md). Pure: tested without Airflow.

    Raises ValueError for combinations the form's schema cannot express.
    """
    ranks = [int(r) for r in params["ranks"]]
    if max(ranks) > int(params["tune_rank"]):
        raise ValueError(f"ranks={ranks}: distilled ranks must not exceed tune_rank={params['tune_rank']}")
    tokens = params["placeholder_tokens"].split("|")
    init = (params["initializer_tokens"] or "").strip()
    if init and len(init.split("|")) != len(tokens):
        raise ValueError(
            f"initializer_tokens={init!r}: give one word per placeholder token ({len(tokens)}), '|'-separated"
        )
    root = f"s3://{bucket}/runs/{run_key(run_id)}"
    out = {step: f"{root}/{step}/" for step in ("preprocess", "invert", "tune", "evaluate")}
    distill_out = {r: f"{root}/distill/r{r}/" for r in ranks}
    common = ["--run-id", run_id]
    device = ["--device", params["executor_profile"]]
    model = ["--base-model", params["base_model"]]
    if (params.get("base_model_config") or "").strip():
        model += ["--base-model-config", params["base_model_config"].strip()]
    shape = ["--resolution", str(params["resolution"]), "--seed", str(params["seed"])]
    shape += ["--batch-size", str(params.get("batch_size", 1))]
    buckets = ["--enable-bucket", str(params.get("enable_bucket", "auto"))]
    buckets += ["--bucket-reso-steps", str(params.get("bucket_reso_steps", 64))]

    preprocess = [*common, *device, "--dataset", params["dataset_uri"], "--out", out["preprocess"]]
    preprocess += ["--resolution", str(params["resolution"])]
    if params["caption_model"]:
        preprocess += ["--caption-model", params["caption_model"]]
    preprocess += ["--mask", params["mask"], "--mask-phrases", params["mask_phrases"], "--crop", params["crop"]]
    if params["token_substitution"]:
        preprocess += ["--token-substitution", params["token_substitution"]]
    preprocess += ["--seed", str(params["seed"])]
    invert = [*common, *device, "--dataset", out["preprocess"], *model, "--out", out["invert"]]
    invert += ["--placeholder-tokens", params["placeholder_tokens"], "--template", params["template"]]
    if init:
        invert += ["--initializer-tokens", init]
    invert += ["--steps", str(params["invert_steps"]), "--lr", str(params["invert_lr"]), *shape, *buckets]
    masks = ["--use-masks"] if params["use_masks"] else []
    invert += masks
    tune = [*common, *device, "--dataset", out["preprocess"], "--tokens", out["invert"], *model, "--out", out["tune"]]
    tune += ["--rank", str(params["tune_rank"]), "--steps", str(params["tune_steps"])]
    tune += ["--lr-unet", str(params["tune_lr_unet"]), "--lr-text", str(params["tune_lr_text"])]
    if float(params["tune_lr_text"]) > 0:
        tune += ["--train-text-encoder"]
    tune += [*shape, *buckets, *masks]
    distill = [[*common, *device, "--lora", out["tune"], "--rank", str(r), "--out", distill_out[r]] for r in ranks]
    evaluate = [*common, *device, "--dataset", out["preprocess"], *model, "--out", out["evaluate"]]
    for r in ranks:
        evaluate += ["--lora", distill_out[r]]
    evaluate += ["--seed", str(params["seed"]), "--resolution", str(params["resolution"])]
    evaluate += ["--num-inference-steps", str(params["eval_inference_steps"])]
    evaluate += ["--guidance-scale", str(params.get("eval_guidance_scale", 7.5))]
    evaluate += ["--sweep-steps", str(params["eval_sweep_steps"]), "--select-metric", params["promotion_metric"]]
    for flag in ("clip_model", "dino_model", "class_word"):
        if params[flag]:
            evaluate += [f"--{flag.replace('_', '-')}", params[flag]]
    for flag in ("classifier_model", "classifier_target"):
        if params.get(flag):
            evaluate += [f"--{flag.replace('_', '-')}", params[flag]]
    if params["eval_prompts"]:
        evaluate += ["--prompts", *params["eval_prompts"]]
    register = [*common, "--evaluation", out["evaluate"], "--model-name", params["model_name"]]
    register += ["--promotion-metric", params["promotion_metric"]]
    return {
        "run_uri": f"{root}/",
        "preprocess": preprocess,
        "invert": invert,
        "tune": tune,
        "distill": distill,
        "evaluate": evaluate,
        "register": register,
        "finish": [*common, "--status", "FINISHED"],
        "finish_failed": [*common, "--status", "FAILED"],
    }


with DAG(
    dag_id="lora_finetune",
    description="Fine-tune, distill, evaluate and register a LoRA for one subject",
    doc_md=__doc__,
    schedule=None,
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=4,
    tags=["lora", "training"],
    params=PARAMS,
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30), "retry_exponential_backoff": True},
) as dag:

    @task(multiple_outputs=True)
    def plan(run_id=None, params=None) -> dict[str, Any]:
        """Every step's flags for this run; rejects inconsistent forms before any GPU time is spent."""
        from airflow.sdk.exceptions import AirflowFailException

        try:
            return build_commands(run_id, dict(params), CONFIG.bucket)
        except ValueError as exc:
            raise AirflowFailException(str(exc)) from None

    @task
    def per_rank(distill: list[list[str]]) -> list[list[str]]:
        """The distill flags, one list per rank, as a return value that a mapped task can expand over."""
        return distill

    commands = plan()
    distill_commands = per_rank(commands["distill"])
    preprocess = step_task("preprocess", commands["preprocess"], gpu=True, config=CONFIG)
    invert = step_task("invert", commands["invert"], gpu=True, config=CONFIG)
    tune = step_task("tune", commands["tune"], gpu=True, config=CONFIG)
    distill = step_task("distill", None, gpu=True, config=CONFIG, expand=distill_commands, map_index_flag="--rank")
    evaluate = step_task("evaluate", commands["evaluate"], gpu=True, config=CONFIG)
    register = step_task("register", commands["register"], config=CONFIG)
    # the run's MLflow runs end with the DAG run: FINISHED after register, FAILED as soon as any step failed
    finish = step_task("finish", commands["finish"], config=CONFIG, retries=3)
    failed = step_task("finish", commands["finish_failed"], task_id="finish_failed", config=CONFIG, retries=3,
                       trigger_rule="one_failed")  # fmt: skip

    commands >> distill_commands >> preprocess >> invert >> tune >> distill >> evaluate >> register >> finish
    [preprocess, invert, tune, distill, evaluate, register] >> failed
