"""The local stack's servers on loopback ports: SeaweedFS (S3) and an MLflow tracking server proxying artifacts to it.

Used by `scripts/stack.py` (`make up`, the demo) and by the test fixtures (`tests/conftest.py`): the same
servers a user's stack runs, started as processes of this machine. Every function is plain: start,
wait until healthy, stop.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "lora-pipeline-test"
SECRET_KEY = "lora-pipeline-test-secret"
ARTIFACT_BUCKET = "mlflow"


def free_ports(n: int) -> list[int]:
    """`n` distinct loopback ports that were free a moment ago."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def server_binary(name: str) -> str:
    """A console script of this virtual environment (next to the interpreter), else from PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name}: not installed (pip install -e '.[pipeline]')")
    return found


@dataclass
class Server:
    """A running server process with its URL and the environment a client needs."""

    name: str
    url: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    restart_args: dict = field(default_factory=dict)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL after `timeout`."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash, not a shutdown)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_http(server: Server, path: str, timeout: float, ok=(200, 403)) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.url + path, timeout=2) as resp:
                if resp.status in ok:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code in ok:
                return
        except OSError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"{server.name} did not answer on {server.url} within {timeout:.0f}s:\n{server.log_tail()}")


def start_seaweedfs(
    data_dir: str | Path,
    s3_port: int | None = None,
    access_key: str = ACCESS_KEY,
    secret_key: str = SECRET_KEY,
    buckets: tuple[str, ...] = (),
    timeout: float = 60.0,
) -> Server:
    """`weed mini` (master, volume, filer, S3) on loopback; every port is chosen free unless `s3_port` is given.

    Restarting with the same `data_dir` and `s3_port` keeps the data (see `restart_seaweedfs`).
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    ports = free_ports(12)
    s3_port = s3_port or ports[0]
    names = [
        "master.port",
        "master.port.grpc",
        "volume.port",
        "volume.port.grpc",
        "filer.port",
        "filer.port.grpc",
        "s3.port.grpc",
        "s3.port.iceberg",
        "s3.port.lance",
        "admin.port",
        "admin.port.grpc",
    ]
    args = [f"-{n}={p}" for n, p in zip(names, ports[1:], strict=True)]
    cmd = [
        server_binary("weed"),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}",
        *args,
        "-admin.ui=false",
        "-webdav=false",
        "-master.telemetry=false",
    ]
    if buckets:
        cmd.append(f"-bucket={','.join(buckets)}")
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    log_path = data_dir.parent / f"{data_dir.name}.weed.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{s3_port}"
    server = Server(
        "seaweedfs",
        url,
        proc,
        log_path,
        env={"S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
        restart_args={"data_dir": data_dir, "s3_port": s3_port, "access_key": access_key, "secret_key": secret_key},
    )
    wait_http(server, "/", timeout)
    _wait_s3_writable(server, timeout)
    return server


def _wait_s3_writable(server: Server, timeout: float) -> None:
    """The S3 port answers before the volume server has registered; wait until a write goes through."""
    import io

    from minio import Minio

    client = Minio(
        server.url.split("://")[1],
        access_key=server.env["AWS_ACCESS_KEY_ID"],
        secret_key=server.env["AWS_SECRET_ACCESS_KEY"],
        secure=False,
    )
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if not client.bucket_exists("stack-health"):
                client.make_bucket("stack-health")
            client.put_object("stack-health", "ping", io.BytesIO(b"ok"), 2)
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready yet"
            last = exc
            time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"seaweedfs never accepted a write: {last}\n{server.log_tail()}")


def restart_seaweedfs(server: Server, down_for: float = 0.0) -> Server:
    """Kill a SeaweedFS server and start it again on the same port and data directory."""
    server.kill()
    time.sleep(down_for)
    return start_seaweedfs(**server.restart_args)


def start_mlflow(
    data_dir: str | Path,
    s3: Server,
    port: int | None = None,
    bucket: str = ARTIFACT_BUCKET,
    timeout: float = 120.0,
) -> Server:
    """`mlflow server` with a SQLite backend and artifacts proxied to `s3://<bucket>/` on the SeaweedFS `s3`.

    Clients need only MLFLOW_TRACKING_URI (artifacts travel as mlflow-artifacts:/ through the server).
    """
    from minio import Minio

    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    client = Minio(
        s3.url.split("://")[1],
        access_key=s3.env["AWS_ACCESS_KEY_ID"],
        secret_key=s3.env["AWS_SECRET_ACCESS_KEY"],
        secure=False,
    )
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    port = port or free_ports(1)[0]
    cmd = [
        server_binary("mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{data_dir / 'mlflow.db'}",
        "--artifacts-destination",
        f"s3://{bucket}/",
    ]
    env = {
        **os.environ,
        **s3.env,
        "MLFLOW_S3_ENDPOINT_URL": s3.url,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "AWS_DEFAULT_REGION": os.environ.get("AWS_REGION", "us-east-1"),
    }
    log_path = data_dir / "mlflow.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    server = Server("mlflow", url, proc, log_path, env={"MLFLOW_TRACKING_URI": url})
    wait_http(server, "/health", timeout, ok=(200,))
    return server
