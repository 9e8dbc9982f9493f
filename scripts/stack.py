"""The local stack: SeaweedFS (S3) and an MLflow server (SQLite, artifacts proxied to SeaweedFS) on loopback.

    python scripts/stack.py up       # start what is not running (idempotent), wait until healthy
    python scripts/stack.py status   # exit 0 when both answer
    python scripts/stack.py env      # `export ...` lines for a shell: eval "$(python scripts/stack.py env)"
    python scripts/stack.py env --airflow   # the same plus the local Airflow profile (scripts/airflow.sh)
    python scripts/stack.py down     # stop both

Everything lives under one state directory (default `.state/`, or `$LORA_PIPELINE_STATE`): data, logs
(`*.log`), pid files (`*.pid`) and `stack.env` (endpoint, credentials, tracking URI; mode 0600). The
credentials are generated on the first `up` and kept. Ports: S3 8333, MLflow 5000
(`LORA_PIPELINE_S3_PORT`, `LORA_PIPELINE_MLFLOW_PORT`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

BUCKET = "lora-pipeline"  # datasets, base models and run outputs
ARTIFACT_BUCKET = "mlflow"  # MLflow's proxied artifact store


def state_dir() -> Path:
    return Path(os.environ.get("LORA_PIPELINE_STATE") or ROOT / ".state").resolve()


def _port(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"{name}: expected a port number, got {raw!r}")
    return int(raw)


def read_env(state: Path) -> dict[str, str]:
    path = state / "stack.env"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.removeprefix("export ").partition("=")
        if sep:
            out[key.strip()] = value.strip().strip("'")
    return out


def write_env(state: Path, env: dict[str, str]) -> None:
    path = state / "stack.env"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(f"export {k}='{v}'\n" for k, v in env.items()))
    tmp.chmod(0o600)
    os.replace(tmp, path)


def airflow_env(state: Path, stack: dict[str, str]) -> dict[str, str]:
    """Airflow settings of the local profile: SQLite under the state dir, this repo's DAGs, loopback only,
    the local step executor with this interpreter, and the stack's endpoints for the steps."""
    port = _port("LORA_PIPELINE_AIRFLOW_PORT", 8080)
    return {
        **stack,
        "AIRFLOW_HOME": str(state / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",  # loopback only: no login page
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
        "LORA_PIPELINE_EXECUTOR": "local",
        "LORA_PIPELINE_PYTHON": sys.executable,
    }


def _pid(state: Path, name: str, marker: str) -> int | None:
    """The pid in `<name>.pid` if that process is alive and is still ours (its command line has `marker`)."""
    try:
        pid = int((state / f"{name}.pid").read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (OSError, ValueError):
        return None
    return pid if marker in cmdline else None


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code in (403, 404)  # the server answers
    except OSError:
        return False


def _port_busy(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def status(state: Path) -> dict[str, dict]:
    env = read_env(state)
    s3_url = env.get("S3_ENDPOINT_URL", f"http://127.0.0.1:{_port('LORA_PIPELINE_S3_PORT', 8333)}")
    mlflow_url = env.get("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_port('LORA_PIPELINE_MLFLOW_PORT', 5000)}")
    return {
        "seaweedfs": {"pid": _pid(state, "seaweedfs", "weed"), "url": s3_url, "healthy": _healthy(s3_url + "/")},
        "mlflow": {
            "pid": _pid(state, "mlflow", "mlflow"),
            "url": mlflow_url,
            "healthy": _healthy(mlflow_url + "/health"),
        },
    }


def up(state: Path) -> dict[str, str]:
    """Start SeaweedFS and MLflow unless they already run; return the client environment."""
    from lora_pipeline.devstack import start_mlflow, start_seaweedfs

    state.mkdir(parents=True, exist_ok=True)
    env = read_env(state)
    s3_port = _port("LORA_PIPELINE_S3_PORT", 8333)
    mlflow_port = _port("LORA_PIPELINE_MLFLOW_PORT", 5000)
    access = env.get("AWS_ACCESS_KEY_ID") or "lora-pipeline"
    secret = env.get("AWS_SECRET_ACCESS_KEY") or secrets.token_urlsafe(24)
    env = {
        "S3_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}",
        "AWS_ACCESS_KEY_ID": access,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_REGION": "us-east-1",
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "LORA_PIPELINE_BUCKET": BUCKET,
        "LORA_PIPELINE_CACHE": str(state / "cache"),
    }
    write_env(state, env)
    now = status(state)

    s3 = None
    if now["seaweedfs"]["pid"] and now["seaweedfs"]["healthy"]:
        print(f"seaweedfs: already running (pid {now['seaweedfs']['pid']}) at {env['S3_ENDPOINT_URL']}")
    else:
        if _port_busy(s3_port):
            raise RuntimeError(f"port {s3_port} is taken by another program: stop it or set LORA_PIPELINE_S3_PORT")
        print(f"seaweedfs: starting on {env['S3_ENDPOINT_URL']} (log {state / 'seaweedfs.weed.log'}) ...", flush=True)
        s3 = start_seaweedfs(
            state / "seaweedfs", s3_port=s3_port, access_key=access, secret_key=secret, buckets=(BUCKET,)
        )
        (state / "seaweedfs.pid").write_text(str(s3.proc.pid))
        print(f"seaweedfs: up (pid {s3.proc.pid})")

    if now["mlflow"]["pid"] and now["mlflow"]["healthy"]:
        print(f"mlflow: already running (pid {now['mlflow']['pid']}) at {env['MLFLOW_TRACKING_URI']}")
    else:
        if _port_busy(mlflow_port):
            raise RuntimeError(
                f"port {mlflow_port} is taken by another program: stop it or set LORA_PIPELINE_MLFLOW_PORT"
            )
        if s3 is None:  # SeaweedFS was already running: describe it for start_mlflow
            from lora_pipeline.devstack import Server

            s3 = Server("seaweedfs", env["S3_ENDPOINT_URL"], None, state / "seaweedfs.weed.log", env=env)
        print(f"mlflow: starting on {env['MLFLOW_TRACKING_URI']} (log {state / 'mlflow' / 'mlflow.log'}) ...")
        mlflow = start_mlflow(state / "mlflow", s3, port=mlflow_port, bucket=ARTIFACT_BUCKET)
        (state / "mlflow.pid").write_text(str(mlflow.proc.pid))
        print(f"mlflow: up (pid {mlflow.proc.pid})")
    _ensure_bucket(env)
    return env


def _ensure_bucket(env: dict[str, str]) -> None:
    from minio import Minio

    client = Minio(
        env["S3_ENDPOINT_URL"].split("://")[1],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        secure=False,
    )
    if not client.bucket_exists(BUCKET):
        client.make_bucket(BUCKET)


def down(state: Path) -> None:
    for name, marker in (("mlflow", "mlflow"), ("seaweedfs", "weed")):
        pid = _pid(state, name, marker)
        if pid is None:
            print(f"{name}: not running")
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)  # the server and its workers (started in their own session)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and _pid(state, name, marker):
                time.sleep(0.2)
            if _pid(state, name, marker):
                os.killpg(pid, signal.SIGKILL)
            print(f"{name}: stopped (pid {pid})")
        (state / f"{name}.pid").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["up", "down", "status", "env"])
    p.add_argument("--airflow", action="store_true", help="env: add the local Airflow profile")
    args = p.parse_args(argv)
    state = state_dir()
    try:
        if args.command == "up":
            env = up(state)
            print(f"\nS3 (SeaweedFS): {env['S3_ENDPOINT_URL']}  bucket s3://{BUCKET}/")
            print(f"MLflow UI:      {env['MLFLOW_TRACKING_URI']}")
            print(
                f'Environment:    eval "$({sys.executable} scripts/stack.py env)"  (written to {state / "stack.env"})'
            )
        elif args.command == "down":
            down(state)
        elif args.command == "env":
            env = read_env(state)
            if not env:
                raise RuntimeError(f"no {state / 'stack.env'}: run `make up` first")
            if args.airflow:
                env = airflow_env(state, env)
            print("".join(f"export {k}='{v}'\n" for k, v in env.items()), end="")
        else:
            ok = True
            for name, info in status(state).items():
                state_word = "up" if info["pid"] and info["healthy"] else "down"
                ok &= state_word == "up"
                print(f"{name:10s} {state_word:5s} {info['url']}  pid {info['pid'] or '-'}")
            return 0 if ok else 1
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
