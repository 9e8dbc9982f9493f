"""The registered LoRA as an MLflow pyfunc model, and the serving lookup `lora-registry get NAME@ALIAS`.

A model version's folder holds `MLmodel`, the models-from-code file `pyfunc_model.py`, the project's code
under `code/` (`lora_ops/` and `lora_pipeline/` with its steps, source files only: no pickled code, no model weights),
`requirements.txt` (the libraries that code needs, pinned to the versions it was registered with) and
`artifacts/lora.safetensors` + `artifacts/metadata.json`; `metadata.json` names the base model (hub id,
local folder or s3:// prefix). Loading the version imports `LoraPipelineModel` from its own `code/`, so
`mlflow models serve -m models:/NAME@champion --env-manager local` runs the code the version was
registered with, in any environment that has the pinned libraries.

`predict` takes a column of prompts (named `prompt` or not) and returns one row per prompt: `image` (a base64 PNG), `width`,
`height`; `decode_png(row["image"])` turns the string back into a PIL image. The params are the
signature's (`PARAMS`); MLflow drops any other.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd

LORA_FILE = "lora.safetensors"
METADATA_FILE = "metadata.json"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
PROJECT = "lora-pipeline"
# beyond the project's own dependencies (pyproject.toml), what loading a version imports: minio for
# s3:// base models (lora_pipeline.steps.models), mlflow for the pyfunc itself
SERVING_EXTRAS = ("minio", "mlflow")
# the project's packages logged with each version (code_paths), without the shapes world's weights
CODE_PACKAGES = ("lora_ops", "lora_pipeline", "lora_pipeline.steps")  # the last one installs from steps/
CODE_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "pretrained")


class LoraPipelineModel(mlflow.pyfunc.PythonModel):
    """Text-to-image with the base model named in the metadata plus the registered LoRA.

    `predict` takes a DataFrame with a `prompt` column (MLflow turns a list of strings or a
    `{"prompt": [...]}` dict into one) and returns a DataFrame with one row per prompt: `image` (base64
    PNG), `width`, `height`. Params (`PARAMS`): num_inference_steps (default 30), guidance_scale (7.5),
    seed (0), height and width (0: the model's own size), scale (LoRA scale for UNet and text encoder,
    1.0), negative_prompt ("": none).
    """

    def load_context(self, context):
        # the pipeline loads here, not on the first request: `mlflow models serve` answers /ping once it is ready,
        # and the first request's time is one generation, not a base model download
        import torch

        from lora_ops import load_pipeline, patch_pipeline
        from lora_ops.devices import resolve_device

        from .steps.models import resolve_base_model

        self.lora_path = context.artifacts["lora"]
        self.metadata = json.loads(Path(context.artifacts["metadata"]).read_text())
        base = resolve_base_model(self.metadata["base_model"], config=self.metadata.get("base_model_config"))
        device = resolve_device("auto")
        dtype = torch.float16 if device == "cuda" else torch.float32
        self.pipe = load_pipeline(base.path, device=device, dtype=dtype, config=base.config_path)
        patch_pipeline(self.pipe, self.lora_path, adapter_name="registered")

    # the type hints say what MLflow hands over (the signature is explicit; a DataFrame hint infers none)
    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        import torch

        from lora_ops import set_scales

        prompts = _prompts(model_input)
        params = {**PARAM_DEFAULTS, **(params or {})}
        steps = int(params["num_inference_steps"])
        if steps < 1:
            raise ValueError(f"num_inference_steps={steps}: must be >= 1")
        kwargs: dict[str, Any] = {"num_inference_steps": steps, "guidance_scale": float(params["guidance_scale"])}
        for key in ("height", "width"):
            value = int(params[key])
            if value < 0 or value % 8:
                raise ValueError(f"{key}={value}: must be a multiple of 8 (0: the model's own size)")
            if value:
                kwargs[key] = value
        if params["negative_prompt"]:
            kwargs["negative_prompt"] = [str(params["negative_prompt"])] * len(prompts)
        pipe = self.pipe
        scale = float(params["scale"])
        set_scales(pipe, "registered", unet=scale, text_encoder=scale)
        kwargs["generator"] = torch.Generator("cpu").manual_seed(int(params["seed"]))
        images = pipe(prompts, **kwargs).images
        return pd.DataFrame(
            {
                "image": [encode_png(im) for im in images],
                "width": [im.width for im in images],
                "height": [im.height for im in images],
            }
        )


def encode_png(image) -> str:
    """A PIL image -> the base64 PNG string `predict` returns (JSON-safe, for the REST server)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png(data: str):
    """A base64 PNG string from `predict` (or the REST server's `predictions`) -> a PIL image."""
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
    image.load()
    return image


def _prompts(model_input) -> list[str]:
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "columns"):  # a pandas DataFrame
        column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
        return [str(p) for p in model_input[column].tolist()]
    if isinstance(model_input, dict):
        value = model_input.get("prompt", model_input.get("prompts"))
        return _prompts(value)
    if isinstance(model_input, (list, tuple)) and all(isinstance(p, str) for p in model_input) and model_input:
        return list(model_input)
    raise ValueError(f"model_input={model_input!r}: expected a prompt, a list of prompts or a 'prompt' column")


# name -> (MLflow type, default); MLflow passes on only the params the signature names
PARAMS: dict[str, tuple[str, Any]] = {
    "num_inference_steps": ("long", 30),
    "guidance_scale": ("double", 7.5),
    "seed": ("long", 0),
    "height": ("long", 0),  # 0: the model's own size
    "width": ("long", 0),
    "scale": ("double", 1.0),  # LoRA scale, UNet and text encoder
    "negative_prompt": ("string", ""),  # "": none
}
PARAM_DEFAULTS = {name: default for name, (_, default) in PARAMS.items()}


def _signature():
    """A `prompt` column in, one image row per prompt out, and the `predict` params."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "image"), ColSpec("long", "width"), ColSpec("long", "height")]),
        params=ParamSchema([ParamSpec(name, kind, default) for name, (kind, default) in PARAMS.items()]),
    )


SIGNATURE = _signature()


def pip_requirements() -> list[str]:
    """The project's runtime dependencies (its installed metadata, i.e. pyproject.toml) and `SERVING_EXTRAS`,
    each pinned to the version installed here (public part: `torch==2.13.0` for a `2.13.0+cpu` build).

    The project itself is not listed (no index has it): its code travels with the model (`CODE_PACKAGES`).
    """
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        declared = [Requirement(r) for r in requires(PROJECT) or []]
    except PackageNotFoundError:
        raise ValueError(
            f"{PROJECT} is not installed (pip install -e '.[pipeline]'); cannot pin its requirements"
        ) from None
    names = {r.name.lower() for r in declared if r.marker is None or r.marker.evaluate({"extra": ""})}
    return [f"{name}=={Version(version(name)).public}" for name in sorted(names | set(SERVING_EXTRAS))]


def _stage_code(staging: Path) -> list[str]:
    """Copies of the project's packages (source only) for `code_paths`."""
    import importlib

    for package in CODE_PACKAGES:
        source = Path(importlib.import_module(package).__file__).parent
        shutil.copytree(source, staging.joinpath(*package.split(".")), ignore=CODE_IGNORE, dirs_exist_ok=True)
    return [str(staging / package) for package in CODE_PACKAGES if "." not in package]


def save_pyfunc(folder: str | Path, lora_path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write the pyfunc model folder for a LoRA file and its metadata; returns the folder."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix="lora-pyfunc-"))
    try:
        shutil.copyfile(lora_path, staging / LORA_FILE)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        token = next(iter(metadata.get("tokens") or []), "")
        mlflow.pyfunc.save_model(
            str(folder),
            python_model=str(MODEL_CODE),  # models-from-code: loading imports the class from code/
            artifacts={"lora": str(staging / LORA_FILE), "metadata": str(staging / METADATA_FILE)},
            code_paths=_stage_code(staging / "code"),
            pip_requirements=pip_requirements(),
            signature=SIGNATURE,
            input_example=[f"a photo of {token}".strip()],
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'NAME@ALIAS' or 'NAME/VERSION' -> (name, alias, version)."""
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        if name and alias:
            return name, alias, None
    elif "/" in ref:
        name, version = ref.rsplit("/", 1)
        if name and version.isdigit():
            return name, None, version
    raise ValueError(f"ref={ref!r}: expected NAME@ALIAS (e.g. my-lora@champion) or NAME/VERSION")


def get_lora(ref: str, out: str | Path, tracking_uri: str | None = None) -> dict[str, Any]:
    """Download the LoRA file and metadata of a registered version into `out`.

    Returns {"name", "version", "lora", "metadata", "base_model", ...}; checks the file's sha256 against
    the one recorded at registration.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from .steps.artifacts import IntegrityError, sha256_file

    name, alias, version = parse_ref(ref)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        mv = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as exc:
        raise ValueError(f"{ref}: no such registered model version ({exc.message.splitlines()[0]})") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lora-registry-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{mv.version}", dst_path=tmp, tracking_uri=tracking_uri
        )
        found = {p.name: p for p in Path(local).rglob("*") if p.name in (LORA_FILE, METADATA_FILE)}
        if set(found) != {LORA_FILE, METADATA_FILE}:
            raise ValueError(
                f"{ref}: version {mv.version} has no {LORA_FILE}/{METADATA_FILE}; not a lora-pipeline model"
            )
        shutil.copyfile(found[LORA_FILE], out / LORA_FILE)
        shutil.copyfile(found[METADATA_FILE], out / METADATA_FILE)
    metadata = json.loads((out / METADATA_FILE).read_text())
    if metadata.get("lora_sha256") and sha256_file(out / LORA_FILE) != metadata["lora_sha256"]:
        raise IntegrityError(f"{ref}: downloaded {LORA_FILE} does not match the sha256 recorded at registration")
    return {
        "name": name,
        "version": int(mv.version),
        "aliases": sorted(mv.aliases or []),
        "lora": str(out / LORA_FILE),
        "metadata": str(out / METADATA_FILE),
        "base_model": metadata.get("base_model"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lora-registry", description="Look up registered LoRAs in MLflow.")
    sub = p.add_subparsers(dest="command", required=True)
    get = sub.add_parser("get", help="download a registered LoRA and its metadata")
    get.add_argument("ref", help="NAME@ALIAS (e.g. my-lora@champion) or NAME/VERSION")
    get.add_argument("--out", required=True, help="folder to write lora.safetensors and metadata.json into")
    args = p.parse_args(argv)
    from .steps.common import main as run_main

    return run_main("lora-registry", lambda _argv: get_lora(args.ref, args.out), None)


if __name__ == "__main__":
    sys.exit(main())
