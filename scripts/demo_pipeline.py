"""The whole pipeline on one machine: the local stack, Airflow, the tiny model and a sample dataset.

    python scripts/demo_pipeline.py [--out out/demo-pipeline]

1. starts SeaweedFS and MLflow (`scripts/stack.py up`; reused when already running),
2. builds the tiny Stable Diffusion model and tiny CLIP/DINO scorers (random weights, no downloads) and a
   sample dataset of drawn images, and uploads model and dataset to S3,
3. runs the `lora_finetune` DAG through Airflow (`airflow dags test`, the local executor: every step is a
   subprocess running the same command line a Kubernetes pod would),
4. prints the registered model version, its alias, the MLflow UI URL and the evaluation grid.

Nothing is downloaded; about 3-5 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

SUBJECT = "red-toy"
RESOLUTION = 32  # the tiny model's native size


def make_sample_dataset(directory: Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """`n` drawn photos of one subject (a red toy with yellow eyes) on varied backgrounds, with captions."""
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        bg = tuple(rng.randint(40, 220) for _ in range(3))
        img = Image.new("RGB", (size, size), bg)
        d = ImageDraw.Draw(img)
        for _ in range(4):  # background clutter
            x, y = rng.randint(0, size), rng.randint(0, size)
            d.rectangle([x, y, x + size // 5, y + size // 7], fill=tuple(rng.randint(0, 255) for _ in range(3)))
        r = size // 4 + rng.randint(-2, 2)
        cx, cy = size // 2 + rng.randint(-size // 8, size // 8), size // 2 + rng.randint(-size // 8, size // 8)
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=(200, 30, 30), outline=(90, 0, 0))
        for ex in (cx - r // 3, cx + r // 3):
            d.ellipse([ex - 2, cy - r // 3 - 2, ex + 2, cy - r // 3 + 2], fill=(250, 220, 0))
        img.save(directory / f"toy_{i:02d}.png")
        (directory / f"toy_{i:02d}.txt").write_text("a photo of a red toy")
    return directory


def upload_folder(local: Path, uri: str) -> int:
    """Upload every file of `local` under the s3:// prefix `uri`; returns the number of files."""
    from steps.artifacts import Store, parse_uri

    loc = parse_uri(uri, "uri").as_prefix()
    store = Store.for_uri(loc)
    store.ensure_bucket(loc)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        store.put_file(path, loc.join(path.relative_to(local).as_posix()))
    return len(files)


def prepare_inputs(work: Path, bucket: str) -> dict[str, str]:
    """Tiny model and scorers, the sample dataset; model and dataset uploaded. Returns their URIs/paths."""
    from lora_ops import make_tiny_model
    from lora_ops.tiny_vision import make_tiny_clip, make_tiny_dino

    model = make_tiny_model(work / "tiny-sd", arch="tiny")
    clip = make_tiny_clip(work / "tiny-clip")
    dino = make_tiny_dino(work / "tiny-dino")
    dataset = make_sample_dataset(work / "dataset" / SUBJECT)
    model_uri = f"s3://{bucket}/models/tiny-sd/"
    dataset_uri = f"s3://{bucket}/datasets/{SUBJECT}/"
    n_model = upload_folder(model, model_uri)
    n_data = upload_folder(dataset, dataset_uri)
    print(f"    uploaded {n_model} model files to {model_uri} and {n_data} dataset files to {dataset_uri}")
    return {"base_model": model_uri, "dataset_uri": dataset_uri, "clip_model": str(clip), "dino_model": str(dino)}


def demo_conf(inputs: dict[str, str], model_name: str, **overrides) -> dict:
    """A `lora_finetune` conf sized for the tiny model on a CPU."""
    conf = {
        "dataset_uri": inputs["dataset_uri"],
        "model_name": model_name,
        "base_model": inputs["base_model"],
        "placeholder_tokens": "<s1>|<s2>",
        "template": "object",
        "caption_model": "none",
        "mask": "none",
        "crop": "center",
        "token_substitution": "a red toy|<s1><s2>",
        "clip_model": inputs["clip_model"],
        "dino_model": inputs["dino_model"],
        "class_word": "toy",
        "eval_inference_steps": 4,
        "eval_sweep_steps": 0,
        "ranks": [1],
        "tune_rank": 2,
        "invert_steps": 6,
        "invert_lr": 5e-3,
        "tune_steps": 6,
        "tune_lr_unet": 1e-3,
        "tune_lr_text": 1e-4,
        "resolution": RESOLUTION,
        "seed": 0,
        "promotion_metric": "clip_i",
        "executor_profile": "cpu",
    }
    conf.update(overrides)
    return conf


PROGRESS = re.compile(r"\[DAG TEST\] (starting|end task) task_id=(\S+) map_index=(-?\d+)")


def run_finetune(conf: dict, env: dict[str, str], log_path: Path, echo=print) -> str:
    """`airflow dags test lora_finetune -c CONF`; progress lines on `echo`, the full log in `log_path`.

    Returns the Airflow run id; raises RuntimeError (with the log's tail) when the run fails.
    """
    cmd = [str(Path(sys.executable).parent / "airflow"), "dags", "test", "lora_finetune", "-c", json.dumps(conf)]
    run_id, t0 = None, time.monotonic()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            log.write(line)
            if run_id is None and (m := re.search(r"run_id=(manual__\S+?)[,\s>]", line)):
                run_id = m.group(1)
                echo(f"    airflow run {run_id}")
            m = PROGRESS.search(line)
            if m:
                name = m.group(2) + ("" if m.group(3) == "-1" else f"[{m.group(3)}]")
                verb = "started" if m.group(1) == "starting" else "ended"
                echo(f"    [{time.monotonic() - t0:5.0f}s] {name} {verb}")
            if "Task failed with exception" in line or "exit code" in line and "steps." in line:
                echo(f"    {line.strip()[-160:]}")
            if "DagRun Finished" in line:
                break
        for line in _drain(proc, grace=15.0):  # the CLI can linger after the run is over
            log.write(line)
        code = proc.wait()
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
    finished = [ln for ln in log_path.read_text(errors="replace").splitlines() if "DagRun Finished" in ln]
    if run_id is None or not finished or "state=success" not in finished[-1]:
        raise RuntimeError(f"lora_finetune failed (exit {code}); full log: {log_path}\n{tail}")
    return run_id


def _drain(proc: subprocess.Popen, grace: float):
    """The rest of `proc`'s output; terminate it when it has not exited `grace` seconds after the run ended."""
    import threading

    timer = threading.Timer(grace, proc.terminate)
    timer.start()
    try:
        yield from proc.stdout
    finally:
        timer.cancel()


def airflow_setup(env: dict[str, str], echo=print) -> None:
    """Migrate the SQLite metadata DB (idempotent) and create the GPU pool."""
    airflow = str(Path(sys.executable).parent / "airflow")
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    echo(f"    airflow db migrate ({env['AIRFLOW_HOME']})")
    out = subprocess.run([airflow, "db", "migrate"], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    subprocess.run([airflow, "pools", "set", "lora_gpu", "1", "GPU steps"], env=env, capture_output=True, check=True)


def registered_version(model_name: str, run_id: str, tracking_uri: str):
    """The model version the run registered, and the current champion version."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    quoted = run_id.replace("'", "\\'")
    (mv,) = client.search_model_versions(f"name = '{model_name}' and tags.pipeline_run_id = '{quoted}'")
    champion = client.get_model_version_by_alias(model_name, "champion")
    return client.get_model_version(model_name, mv.version), champion


def fetch_grids(run_uri: str, dest: Path) -> list[Path]:
    """Download the evaluation grids (`<run>/evaluate/grids/*.png`) into `dest`."""
    from steps.artifacts import Store, parse_uri

    loc = parse_uri(f"{run_uri}evaluate/", "evaluation").as_prefix()
    store = Store.for_uri(loc)
    out = []
    for rel, _ in store.list(loc):
        if rel.endswith(".png"):
            store.get_file(loc.join(rel), dest / rel)
            out.append(dest / rel)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo-pipeline", help="where the grid and the logs are written")
    p.add_argument("--model-name", default=f"lora-{SUBJECT}", help="registered model name")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    t0 = time.monotonic()

    import stack

    state = stack.state_dir()
    print("1/4 local stack: SeaweedFS (S3) + MLflow", flush=True)
    stack_env = stack.up(state)
    env = {**os.environ, **stack.airflow_env(state, stack_env)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    os.environ.update(stack_env)  # this process uploads and reads results too

    print(f"2/4 tiny model, scorers and sample dataset (no downloads) [{time.monotonic() - t0:.0f}s]", flush=True)
    inputs = prepare_inputs(out / "inputs", stack_env["LORA_PIPELINE_BUCKET"])

    print(f"3/4 lora_finetune through Airflow, local executor [{time.monotonic() - t0:.0f}s]", flush=True)
    airflow_setup(env)
    conf = demo_conf(inputs, args.model_name)
    run_id = run_finetune(conf, env, out / "airflow-dags-test.log", echo=lambda s: print(s, flush=True))

    print(f"4/4 results [{time.monotonic() - t0:.0f}s]", flush=True)
    mv, champion = registered_version(args.model_name, run_id, stack_env["MLFLOW_TRACKING_URI"])
    alias = "champion" if champion.version == mv.version else ", ".join(mv.aliases) or "challenger"
    lora_uri = mv.tags.get("lora_uri", "")
    run_uri = lora_uri[: lora_uri.index("/distill/") + 1] if "/distill/" in lora_uri else ""
    grids = fetch_grids(run_uri, out / "evaluation") if run_uri else []
    ui = stack_env["MLFLOW_TRACKING_URI"]
    print(f"\nregistered model:  {args.model_name} version {mv.version} (alias: {alias})")
    print(f"lineage:           dataset {mv.tags.get('dataset_sha256', '?')[:12]}, rank {mv.tags.get('rank')}, "
          f"run {mv.tags.get('pipeline_run_id')}")  # fmt: skip
    print(
        "metrics:           " + ", ".join(f"{k[7:]}={v}" for k, v in sorted(mv.tags.items()) if k.startswith("metric."))
    )
    print(f"MLflow UI:         {ui}/#/models/{args.model_name}/versions/{mv.version}")
    grids.sort(key=lambda g: (g.name != "comparison.png", len(g.parts), str(g)))
    print(f"evaluation grid:   {grids[0] if grids else '(none found under ' + run_uri + 'evaluate/)'}")
    print(f"serving lookup:    lora-registry get {args.model_name}@champion --out DIR")
    print(f"airflow log:       {out / 'airflow-dags-test.log'}   total {time.monotonic() - t0:.0f}s")
    print("the stack keeps running: `make down` stops it, `make airflow` opens the Airflow UI")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
