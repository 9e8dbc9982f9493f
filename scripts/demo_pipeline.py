"""The whole pipeline on one machine: the local stack, Airflow, the shapes world and a new subject.

    python scripts/demo_pipeline.py [--out out/demo-pipeline]

1. starts SeaweedFS and MLflow (`scripts/stack.py up`; reused when already running),
2. takes the shapes world's pretrained Stable Diffusion and its scorers (CLIP, DINO slot, evaluator;
   shipped with the project, no downloads) and the new subject's instance images (six rings, red and
   blue, captioned "a red ring"), and uploads model and dataset to S3,
3. runs the `lora_finetune` DAG through Airflow (`airflow dags test`, the local executor: every step is a
   subprocess running the same command line a Kubernetes pod would): pivotal tuning learns the ring as
   "a <s1> circle", distill compresses it, evaluate draws it in every colour,
4. prints the metrics of the base model and of each candidate, the registered version and its alias, and
   the evaluation grid and alpha sweep (the ring appearing from LoRA scale 0 to 1).
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

SUBJECT = "ring"
RESOLUTION = 32  # the shapes world's native size
COLOURS = ("red", "blue", "green", "yellow", "purple")  # red and blue are the instances' colours


def _recipe():
    """The quality benchmark's pivotal-tuning settings (lora_ops.shapes.recipes.RecipeConfig)."""
    from lora_ops.shapes.recipes import RecipeConfig

    return RecipeConfig()


def upload_folder(local: Path, uri: str) -> int:
    """Upload every file of `local` under the s3:// prefix `uri`; returns the number of files."""
    from lora_pipeline.steps.artifacts import Store, parse_uri

    loc = parse_uri(uri, "uri").as_prefix()
    store = Store.for_uri(loc)
    store.ensure_bucket(loc)
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for path in files:
        store.put_file(path, loc.join(path.relative_to(local).as_posix()))
    return len(files)


def prepare_inputs(work: Path, bucket: str, subject: str = SUBJECT) -> dict[str, str]:
    """The shapes world's model and scorers, a held-out concept's dataset (`subject`: ring, star, striped);
    model and dataset uploaded."""
    from lora_ops.shapes import pretrained
    from lora_ops.shapes.world import write_concept_dataset

    dataset = write_concept_dataset(subject, work / "dataset" / subject)
    model_uri = f"s3://{bucket}/models/shapes-sd/"
    dataset_uri = f"s3://{bucket}/datasets/{subject}/"
    n_model = upload_folder(pretrained("sd"), model_uri)
    n_data = upload_folder(dataset, dataset_uri)
    print(f"    uploaded {n_model} model files to {model_uri} and {n_data} dataset files to {dataset_uri}")
    return {
        "base_model": model_uri,
        "dataset_uri": dataset_uri,
        "clip_model": str(pretrained("clip")),
        "dino_model": str(pretrained("dino")),
        "classifier_model": str(pretrained("evaluator")),
    }


def demo_conf(inputs: dict[str, str], model_name: str, **overrides) -> dict:
    """A `lora_finetune` conf for the new subject on the shapes world: the benchmark's "pti" recipe."""
    from lora_ops.shapes.quality import GUIDANCE, STEPS

    recipe = _recipe()
    conf = {
        "dataset_uri": inputs["dataset_uri"],
        "model_name": model_name,
        "base_model": inputs["base_model"],
        "placeholder_tokens": "<s1>",
        "initializer_tokens": "circle",
        "template": "none",
        "caption_model": "none",
        "mask": "none",
        "crop": "center",
        "token_substitution": "ring|<s1> circle",
        "clip_model": inputs["clip_model"],
        "dino_model": inputs["dino_model"],
        "classifier_model": inputs["classifier_model"],
        "classifier_target": "shape=ring",
        "class_word": "",
        "eval_prompts": [f"a {c} {{token}} circle" for c in COLOURS],
        "eval_inference_steps": STEPS,
        "eval_guidance_scale": GUIDANCE,
        "eval_sweep_steps": 5,
        "ranks": [recipe.rank],
        "tune_rank": recipe.rank,
        "batch_size": recipe.batch_size,
        "invert_steps": recipe.pti_steps()[0],
        "invert_lr": recipe.learning_rate_ti,
        "tune_steps": recipe.pti_steps()[1],
        "tune_lr_unet": recipe.learning_rate_unet,
        "tune_lr_text": 0.0,
        "resolution": RESOLUTION,
        "seed": 0,
        "promotion_metric": "classifier",  # the share of rings: the world's judge (CLIP-I favours the instances' colours)
        "executor_profile": "cpu",
    }
    conf.update(overrides)
    return conf


PROGRESS = re.compile(r"\[DAG TEST\] (starting|end task) task_id=(\S+) map_index=(-?\d+)")


def run_finetune(conf: dict, env: dict[str, str], log_path: Path, echo=print, logical_date: str | None = None) -> str:
    """`airflow dags test lora_finetune -c CONF [LOGICAL_DATE]`; progress lines on `echo`, the full log in
    `log_path`. Runs started at the same moment need distinct `logical_date`s (the run id is made from it).

    Returns the Airflow run id; raises RuntimeError (with the log's tail) when the run fails.
    """
    # the logical date right after the DAG id: argparse matches the optional positional only there
    date = [logical_date] if logical_date else []
    cmd = [str(Path(sys.executable).parent / "airflow"), "dags", "test", "lora_finetune", *date, "-c", json.dumps(conf)]
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


class AirflowServices:
    """The Airflow 3 servers of one AIRFLOW_HOME on loopback: api-server (UI, REST API, execution API),
    scheduler (LocalExecutor: every task a subprocess) and dag-processor. `airflow_setup` must have run.

    Auth is the simple auth manager with every user an admin (loopback only, no login page: the UI and the
    REST API answer without a token). Use as a context manager, or `start()` / `stop()`.
    """

    COMPONENTS = ("api-server", "scheduler", "dag-processor")

    def __init__(self, env: dict[str, str], port: int, logs: Path):
        import secrets

        self.url = f"http://127.0.0.1:{port}"
        self.logs = Path(logs)
        self.env = {
            **env,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__API__BASE_URL": self.url,
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__CORE__PARALLELISM": env.get("AIRFLOW__CORE__PARALLELISM", "8"),  # LocalExecutor processes
            # the api-server signs the tasks' tokens, the scheduler hands them out: one secret for all three
            "AIRFLOW__API_AUTH__JWT_SECRET": env.get("AIRFLOW__API_AUTH__JWT_SECRET") or secrets.token_urlsafe(32),
        }
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, timeout: float = 180.0) -> AirflowServices:
        """Start the three servers and wait until the API answers and every DAG file is parsed."""
        airflow = str(Path(sys.executable).parent / "airflow")
        self.logs.mkdir(parents=True, exist_ok=True)
        for name in self.COMPONENTS:
            with open(self.logs / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen([airflow, name], env=self.env, stdout=log,
                                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            try:
                dags = {d["dag_id"] for d in self.api("GET", "/api/v2/dags?limit=100")["dags"]}
                if {"lora_finetune", "lora_batch", "lora_retrain", "lora_dataset_updated"} <= dags:
                    return self
            except OSError:
                pass
            self._check_alive()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"Airflow did not list the DAGs within {timeout:.0f}s\n{self.log_tail()}")
            time.sleep(1)

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"airflow {name} exited with {proc.returncode}\n{self.log_tail(name)}")

    def stop(self, timeout: float = 20.0) -> None:
        import signal

        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout)

    def __enter__(self) -> AirflowServices:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log_tail(self, name: str | None = None, n: int = 30) -> str:
        out = []
        for component in [name] if name else self.COMPONENTS:
            path = self.logs / f"{component}.log"
            lines = path.read_text(errors="replace").splitlines()[-n:] if path.exists() else []
            out.append(f"--- {path}\n" + "\n".join(lines))
        return "\n".join(out)

    def api(self, method: str, path: str, body: dict | None = None, attempts: int = 4) -> dict:
        """One REST API call (`/api/v2/...`); raises RuntimeError with the server's answer on an HTTP error.

        GET and PATCH (idempotent) are retried on a server error: on SQLite, a write waits at most 5 s for
        the scheduler's and the dag-processor's, then fails with a 500 "Database error".
        """
        import urllib.error
        import urllib.request

        data = None if body is None else json.dumps(body).encode()
        attempt = 1
        while True:
            req = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read() or b"{}")
            except urllib.error.HTTPError as exc:
                answer = exc.read().decode(errors="replace")[:500]
                if exc.code < 500 or method not in ("GET", "PATCH") or attempt >= attempts:
                    raise RuntimeError(f"{method} {path}: HTTP {exc.code}: {answer}") from None
            time.sleep(2 * attempt)
            attempt += 1

    def unpause(self, *dag_ids: str) -> None:
        for dag_id in dag_ids:
            self.api("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict | None = None) -> str:
        """A manual run of `dag_id` (its form defaults, updated by `conf`); returns the run id."""
        run = self.api("POST", f"/api/v2/dags/{dag_id}/dagRuns", {"logical_date": None, "conf": conf or {}})
        return run["dag_run_id"]

    def runs(self, dag_id: str) -> list[dict]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns?limit=100&order_by=start_date")["dag_runs"]

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float, echo=print) -> dict:
        """Poll until the run ends; returns it when it succeeded, raises RuntimeError (with the failed tasks'
        log tails) when it failed or did not end within `timeout` seconds."""
        deadline, state = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            run = self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}")
            if run["state"] != state:
                state = run["state"]
                echo(f"    {dag_id} {run_id}: {state}")
            if state == "success":
                return run
            if state == "failed":
                raise RuntimeError(f"{dag_id} {run_id} failed\n{self.failed_logs(dag_id, run_id)}")
            self._check_alive()
            time.sleep(3)
        raise RuntimeError(f"{dag_id} {run_id} still {state} after {timeout:.0f}s\n{self.log_tail('scheduler')}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        return self.api("GET", f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=100")["task_instances"]

    def failed_logs(self, dag_id: str, run_id: str, n: int = 25) -> str:
        out = []
        for ti in self.task_instances(dag_id, run_id):
            if ti["state"] not in ("failed", "upstream_failed"):
                continue
            out.append(f"--- {ti['task_id']}[{ti['map_index']}] {ti['state']}")
            if ti["state"] == "failed":
                path = (f"/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{ti['task_id']}/logs/"
                        f"{max(ti['try_number'], 1)}?map_index={ti['map_index']}&full_content=true")  # fmt: skip
                try:
                    events = self.api("GET", path).get("content", [])
                    lines = [e.get("event", "") if isinstance(e, dict) else str(e) for e in events]
                    out += lines[-n:]
                except RuntimeError as exc:
                    out.append(str(exc))
        return "\n".join(out) or self.log_tail("scheduler")


def registered_version(model_name: str, run_id: str, tracking_uri: str):
    """The model version the run registered, and the current champion version."""
    from lora_pipeline.steps.tracking import KEY_TAG, quote, run_key
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    (mv,) = client.search_model_versions(f"name = {quote(model_name)} and tags.`{KEY_TAG}` = '{run_key(run_id)}'")
    champion = client.get_model_version_by_alias(model_name, "champion")
    return client.get_model_version(model_name, mv.version), champion


def fetch_evaluation(run_uri: str, dest: Path) -> list[Path]:
    """Download the evaluation's pictures and tables (`<run>/evaluate/`: PNG, GIF, metrics) into `dest`."""
    from lora_pipeline.steps.artifacts import Store, parse_uri

    loc = parse_uri(f"{run_uri}evaluate/", "evaluation").as_prefix()
    store = Store.for_uri(loc)
    out = []
    for rel, _ in store.list(loc):
        if rel.endswith((".png", ".gif", ".md")) or rel == "metrics.json":
            store.get_file(loc.join(rel), dest / rel)
            out.append(dest / rel)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="out/demo-pipeline", help="where the grid and the logs are written")
    p.add_argument("--model-name", default=f"lora-{SUBJECT}", help="registered model name")
    p.add_argument("--print-form-defaults", action="store_true",
                   help="upload the shapes world to the running stack and print the demo's conf as JSON: "
                        "lora_finetune's form defaults of the local profile (scripts/airflow.sh)")  # fmt: skip
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    t0 = time.monotonic()

    import stack

    state = stack.state_dir()
    if args.print_form_defaults:
        stack_env = stack.read_env(state)
        if not stack_env:
            raise RuntimeError(f"no {state / 'stack.env'}: run `make up` first")
        os.environ.update(stack_env)
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON only
            inputs = prepare_inputs(state / "demo-inputs", stack_env["LORA_PIPELINE_BUCKET"])
        print(json.dumps(demo_conf(inputs, args.model_name)))
        return 0
    print("1/4 local stack: SeaweedFS (S3) + MLflow", flush=True)
    stack_env = stack.up(state)
    env = {**os.environ, **stack.airflow_env(state, stack_env)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    os.environ.update(stack_env)  # this process uploads and reads results too

    print(f"2/4 shapes-world model, scorers and the new subject's images [{time.monotonic() - t0:.0f}s]", flush=True)
    inputs = prepare_inputs(out / "inputs", stack_env["LORA_PIPELINE_BUCKET"])

    print(f"3/4 lora_finetune through Airflow, local executor [{time.monotonic() - t0:.0f}s]", flush=True)
    airflow_setup(env)
    conf = demo_conf(inputs, args.model_name)
    run_id = run_finetune(conf, env, out / "airflow-dags-test.log", echo=lambda s: print(s, flush=True))

    print(f"4/4 results [{time.monotonic() - t0:.0f}s]", flush=True)
    mv, champion = registered_version(args.model_name, run_id, stack_env["MLFLOW_TRACKING_URI"])
    alias = "champion" if champion.version == mv.version else ", ".join(mv.aliases) or "challenger"
    run_uri = mv.tags.get("run_prefix", "")  # register's lineage tag: where the run's outputs lie
    files = fetch_evaluation(run_uri, out / "evaluation") if run_uri else []
    grids = [f for f in files if f.suffix == ".png"]
    table = out / "evaluation" / "comparison.md"
    if table.is_file():
        print("\n" + table.read_text().strip())
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
    sweep = out / "evaluation" / "sweep.png"
    if sweep.is_file():
        print(f"alpha sweep:       {sweep} (LoRA scale 0 -> 1; GIFs beside it)")
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
