"""The registered LoRA as an MLflow pyfunc model, and the serving lookup `lora-registry get NAME@ALIAS`.

A model version's folder holds `MLmodel`, the models-from-code file `pyfunc_model.py` (it imports
`LoraPipelineModel` from the installed project: no pickled code) and `artifacts/lora.safetensors` +
`artifacts/metadata.json`; `metadata.json` names the base model (hub id, local folder or s3:// prefix).
`mlflow.pyfunc.load_model("models:/NAME@champion").predict(["a photo of <s1>"])` returns PIL images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

LORA_FILE = "lora.safetensors"
METADATA_FILE = "metadata.json"
MODEL_CODE = Path(__file__).with_name("pyfunc_model.py")
PIP_REQUIREMENTS = ["lora-pipeline", "torch", "diffusers", "transformers", "peft", "safetensors", "minio", "pillow"]


class LoraPipelineModel(mlflow.pyfunc.PythonModel):
    """Text-to-image with the base model named in the metadata plus the registered LoRA.

    `predict` takes prompts (a string, a list of strings, a dict/DataFrame with a `prompt` column) and
    returns one PIL image per prompt. Optional params: num_inference_steps (default 30), guidance_scale
    (7.5), seed (0), height, width, scale (LoRA scale for UNet and text encoder, default 1.0).
    """

    def load_context(self, context):
        self.lora_path = context.artifacts["lora"]
        self.metadata = json.loads(Path(context.artifacts["metadata"]).read_text())
        self._pipe = None

    def _pipeline(self):
        if self._pipe is None:
            import torch

            from lora_ops import load_pipeline, patch_pipeline

            from .models import resolve_base_model

            base = resolve_base_model(self.metadata["base_model"])
            device = "cuda" if torch.cuda.is_available() else "cpu"
            dtype = torch.float16 if device == "cuda" else torch.float32
            pipe = load_pipeline(base.path, device=device, dtype=dtype)
            patch_pipeline(pipe, self.lora_path, adapter_name="registered")
            self._pipe = pipe
        return self._pipe

    def predict(self, context, model_input, params=None):
        import torch

        from lora_ops import set_scales

        prompts = _prompts(model_input)
        params = dict(params or {})
        pipe = self._pipeline()
        scale = float(params.get("scale", 1.0))
        set_scales(pipe, "registered", unet=scale, text_encoder=scale)
        generator = torch.Generator("cpu").manual_seed(int(params.get("seed", 0)))
        kwargs = {
            "num_inference_steps": int(params.get("num_inference_steps", 30)),
            "guidance_scale": float(params.get("guidance_scale", 7.5)),
            "generator": generator,
        }
        for key in ("height", "width"):
            if params.get(key):
                kwargs[key] = int(params[key])
        return pipe(prompts, **kwargs).images


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


def _signature():
    """Prompts in; the documented `predict` params, which MLflow passes on only when the signature names them."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    params = ParamSchema(
        [
            ParamSpec("num_inference_steps", "long", 30),
            ParamSpec("guidance_scale", "double", 7.5),
            ParamSpec("seed", "long", 0),
            ParamSpec("height", "long", 0),  # 0: the model's own size
            ParamSpec("width", "long", 0),
            ParamSpec("scale", "double", 1.0),
        ]
    )
    return ModelSignature(inputs=Schema([ColSpec("string")]), params=params)


SIGNATURE = _signature()


def save_pyfunc(folder: str | Path, lora_path: str | Path, metadata: dict[str, Any]) -> Path:
    """Write the pyfunc model folder for a LoRA file and its metadata; returns the folder."""
    folder = Path(folder)
    staging = Path(tempfile.mkdtemp(prefix="lora-pyfunc-"))
    try:
        shutil.copyfile(lora_path, staging / LORA_FILE)
        (staging / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str))
        mlflow.pyfunc.save_model(
            str(folder),
            python_model=str(MODEL_CODE),  # models-from-code: loading imports the installed class
            artifacts={"lora": str(staging / LORA_FILE), "metadata": str(staging / METADATA_FILE)},
            pip_requirements=PIP_REQUIREMENTS,
            signature=SIGNATURE,
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

    from .artifacts import IntegrityError, sha256_file

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
    from .common import main as run_main

    return run_main("lora-registry", lambda _argv: get_lora(args.ref, args.out), None)


if __name__ == "__main__":
    sys.exit(main())
