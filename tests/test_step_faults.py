"""Faults: the S3 server restarting mid-upload, a tune step killed mid-training, corrupted objects, bad credentials."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from lora_pipeline.steps import distill, tune
from lora_pipeline.steps.artifacts import (
    IntegrityError,
    StorageError,
    Store,
    StoreConfig,
    fetch,
    find_completed,
    parse_uri,
    publish,
    read_manifest,
    sha256_file,
)
from minio import Minio
from test_register import make_lora
from test_steps import raw_images, upload_folder

from lora_pipeline.devstack import start_seaweedfs


def _many_files(folder, n=8, size=1024 * 1024):
    folder.mkdir()
    for i in range(n):
        (folder / f"part{i}.bin").write_bytes(os.urandom(size))
    return folder


@pytest.fixture
def own_s3(tmp_path, monkeypatch):
    """A SeaweedFS of this test only (it gets killed), with the environment pointing at it."""
    holder = {"server": start_seaweedfs(tmp_path / "s3data")}
    for key, value in holder["server"].env.items():
        monkeypatch.setenv(key, value)
    yield holder
    holder["server"].stop()


def _kill_on_upload(monkeypatch, holder, at: int, restart_after: float | None):
    """Kill the S3 server when the `at`-th file upload starts; optionally start it again in the background."""
    original = Store.put_file
    calls = {"n": 0}

    def put_file(self, src, loc, **kwargs):
        calls["n"] += 1
        if calls["n"] == at:
            holder["server"].kill()
            if restart_after is not None:

                def restart():
                    time.sleep(restart_after)
                    holder["server"] = start_seaweedfs(**holder["server"].restart_args)

                threading.Thread(target=restart, daemon=True).start()
        return original(self, src, loc, **kwargs)

    monkeypatch.setattr(Store, "put_file", put_file)
    return calls


def test_s3_restart_during_upload_is_retried(tmp_path, own_s3, monkeypatch, capfd):
    src = _many_files(tmp_path / "out")
    calls = _kill_on_upload(monkeypatch, own_s3, at=3, restart_after=1.0)
    out = "s3://artifacts/runs/restart/tune/"
    result = publish(src, out, step="tune", run_id="restart", inputs={}, parameters={}, result={"ok": 1})
    assert calls["n"] == 8 and result["ok"] == 1
    assert "part2.bin: " in capfd.readouterr().err  # the third upload was retried while the server was down
    got = fetch(out, tmp_path / "got", require_manifest=True)  # every file is there and matches its hash
    assert sorted(p.name for p in got.path.iterdir()) == [f"part{i}.bin" for i in range(8)]


def test_upload_that_fails_leaves_no_trusted_prefix(tmp_path, own_s3, monkeypatch):
    src = _many_files(tmp_path / "out")
    _kill_on_upload(monkeypatch, own_s3, at=4, restart_after=None)
    store = Store(StoreConfig.from_env(attempts=2, backoff=0.1))
    out = "s3://artifacts/runs/torn/tune/"
    with pytest.raises(StorageError, match="still failing after 2 attempts"):
        publish(src, out, step="tune", run_id="torn", inputs={}, parameters={}, result={}, store=store)
    own_s3["server"] = start_seaweedfs(**own_s3["server"].restart_args)
    assert len(Store(StoreConfig.from_env()).list(parse_uri(out))) == 3  # the files before the kill arrived
    assert read_manifest(out) is None  # three files arrived, but no manifest: not a completed output
    assert find_completed(out, "tune", {}, {}) is None  # a retried step redoes the work
    with pytest.raises(IntegrityError, match="no manifest.json there"):
        fetch(out, tmp_path / "got", name="--lora", require_manifest=True)


def test_tune_killed_mid_training_resumes_from_uploaded_checkpoint(tmp_path, stack_env, tiny_model, monkeypatch, capfd):  # noqa: F811
    from lora_ops import LoraFile, save_lora

    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(tmp_path / "cache"))
    dataset = upload_folder(stack_env, raw_images(tmp_path / "raw"), "artifacts", "datasets/killed")
    tokens_dir = tmp_path / "tokens"
    tokens_dir.mkdir()
    save_lora(tokens_dir / "tokens.safetensors", LoraFile(tokens={"<s1>": torch.randn(32) * 0.4}))
    tokens = "s3://artifacts/runs/killed/invert/"
    publish(tokens_dir, tokens, step="invert", run_id="killed", inputs={}, parameters={"template": "object"},
            result={"tokens": tokens + "tokens.safetensors"})  # fmt: skip
    out = "s3://artifacts/runs/killed/tune/"
    argv = ["--run-id", "killed", "--dataset", dataset, "--tokens", tokens, "--base-model", str(tiny_model),
            "--out", out, "--rank", "2", "--steps", "6", "--save-steps", "2", "--resolution", "32", "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    proc = subprocess.Popen([sys.executable, "-m", "lora_pipeline.steps.tune", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    client = Minio(stack_env["S3_ENDPOINT_URL"].split("://")[1], access_key=stack_env["AWS_ACCESS_KEY_ID"],
                   secret_key=stack_env["AWS_SECRET_ACCESS_KEY"], secure=False)  # fmt: skip
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        names = [
            o.object_name for o in client.list_objects("artifacts", "runs/killed/tune/checkpoints/", recursive=True)
        ]
        if "runs/killed/tune/checkpoints/tuning-000002/manifest.json" in names:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"tune ended before it could be killed: {proc.communicate()[1][-2000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert read_manifest(out) is None  # killed: no output manifest

    # the retry (Airflow's next try), in this process: it must pick up the uploaded checkpoint
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    capfd.readouterr()
    assert tune.main(argv) == 0
    captured = capfd.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert result["resumed_from"] in ("tuning-000002", "tuning-000004")
    assert "resuming from checkpoint" in captured.err
    resumed_at = int(result["resumed_from"].split("-")[1])
    # the resumed attempt trained only the remaining steps
    assert captured.err.count("uploaded checkpoint") == (6 - resumed_at) // 2
    manifest, _ = read_manifest(out)
    assert [f["path"] for f in manifest["files"]] == ["lora.safetensors"]


def test_corrupted_input_fails_the_step_with_a_clear_error(tmp_path, stack_env, tiny_model, capsys):  # noqa: F811
    folder = tmp_path / "tune"
    folder.mkdir()
    make_lora(tiny_model, folder / "lora.safetensors")
    out = "s3://artifacts/runs/corrupt-step/tune/"
    publish(folder, out, step="tune", run_id="corrupt-step", inputs={}, parameters={}, result={})
    data = bytearray((folder / "lora.safetensors").read_bytes())
    data[-10] ^= 0x01
    client = Minio(stack_env["S3_ENDPOINT_URL"].split("://")[1], access_key=stack_env["AWS_ACCESS_KEY_ID"],
                   secret_key=stack_env["AWS_SECRET_ACCESS_KEY"], secure=False)  # fmt: skip
    client.put_object("artifacts", "runs/corrupt-step/tune/lora.safetensors", io.BytesIO(data), len(data))
    code = distill.main(["--run-id", "corrupt-step", "--lora", out, "--rank", "1", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("distill: error: s3://artifacts/runs/corrupt-step/tune/lora.safetensors: sha256")
    assert "re-run the step that wrote it" in err[-1]
    assert not (tmp_path / "d").exists()
    assert sha256_file(folder / "lora.safetensors") != ""  # the source is untouched


def test_wrong_credentials_fail_the_step_with_a_clear_error(tmp_path, stack_env, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-1234")
    code = tune.main(["--run-id", "creds", "--dataset", "s3://artifacts/datasets/x/", "--tokens", "s3://artifacts/t/",
                      "--base-model", "org/model", "--out", "s3://artifacts/runs/creds/tune/"])  # fmt: skip
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "rejected the credentials" in err[0] and "AWS_SECRET_ACCESS_KEY" in err[0]
    assert "not-the-secret-1234" not in captured.err + captured.out


def _freeze(server, seconds: float | None):
    """SIGSTOP the S3 server's processes (requests hang, connections stay open); SIGCONT after `seconds`."""
    os.killpg(server.proc.pid, signal.SIGSTOP)
    if seconds is not None:
        threading.Timer(seconds, lambda: os.killpg(server.proc.pid, signal.SIGCONT)).start()


def test_s3_frozen_longer_than_the_read_timeout_is_retried(tmp_path, own_s3, monkeypatch, capfd):
    src = _many_files(tmp_path / "out", n=2, size=1024)
    out = "s3://artifacts/runs/frozen/tune/"
    publish(src, out, step="tune", run_id="frozen", inputs={}, parameters={}, result={})
    store = Store(StoreConfig.from_env(read_timeout=1.0, attempts=6, backoff=0.5))
    _freeze(own_s3["server"], 4.0)  # four read timeouts' worth
    t0 = time.monotonic()
    got = fetch(out, tmp_path / "got", store=store, require_manifest=True)
    assert time.monotonic() - t0 >= 3.0 and sorted(p.name for p in got.path.iterdir()) == ["part0.bin", "part1.bin"]
    assert "ReadTimeoutError" in capfd.readouterr().err  # each timed-out request was logged and retried


def test_s3_frozen_for_good_fails_the_step_with_exit_3(tmp_path, own_s3, monkeypatch, capsys):
    monkeypatch.setenv("LORA_PIPELINE_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("LORA_PIPELINE_S3_ATTEMPTS", "2")
    _freeze(own_s3["server"], None)
    try:
        code = distill.main(["--run-id", "fz", "--lora", "s3://artifacts/runs/fz/tune/", "--rank", "1",
                             "--out", "s3://artifacts/runs/fz/distill/"])  # fmt: skip
    finally:
        os.killpg(own_s3["server"].proc.pid, signal.SIGCONT)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and err[-1].startswith("distill: storage unavailable:") and "after 2 attempts" in err[-1]


def test_missing_bucket_is_one_clear_line(tmp_path, stack_env, capsys):  # noqa: F811
    code = distill.main(["--run-id", "nb", "--lora", "s3://no-such-bucket-here/runs/nb/tune/", "--rank", "1",
                         "--out", str(tmp_path / "d")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "s3://no-such-bucket-here/runs/nb/tune/" in err[0] and ("NoSuchBucket" in err[0] or "no manifest" in err[0])


def test_mlflow_down_exits_3(tmp_path, stack_env, tiny_model, monkeypatch, capsys):  # noqa: F811
    from lora_pipeline.devstack import free_ports

    folder = tmp_path / "tune"
    folder.mkdir()
    make_lora(tiny_model, folder / "lora.safetensors")
    out = "s3://artifacts/runs/mlflow-down/tune/"
    publish(folder, out, step="tune", run_id="mlflow-down", inputs={}, parameters={}, result={})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_ports(1)[0]}")  # nothing listens there
    code = distill.main(["--run-id", "mlflow-down", "--lora", out, "--rank", "1", "--out",
                         "s3://artifacts/runs/mlflow-down/distill/"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and "MLflow unreachable" in err[-1], err[-3:]
    assert read_manifest("s3://artifacts/runs/mlflow-down/distill/") is None


def test_publish_removes_a_stale_manifest_before_uploading(tmp_path, own_s3, monkeypatch):
    """A prefix that held an earlier output must not look complete while new files replace the old ones."""
    out = "s3://artifacts/runs/stale/tune/"
    old = _many_files(tmp_path / "old", n=2, size=1024)
    publish(old, out, step="tune", run_id="stale", inputs={}, parameters={"v": 1}, result={})
    new = tmp_path / "new"
    new.mkdir()
    for i in range(4):
        (new / f"part{i}.bin").write_bytes(os.urandom(2048))
    _kill_on_upload(monkeypatch, own_s3, at=3, restart_after=None)
    store = Store(StoreConfig.from_env(attempts=2, backoff=0.1))
    with pytest.raises(StorageError):
        publish(new, out, step="tune", run_id="stale", inputs={}, parameters={"v": 2}, result={}, store=store)
    own_s3["server"] = start_seaweedfs(**own_s3["server"].restart_args)
    # part0/part1 were replaced by new bytes: the old manifest would now vouch for files it never listed
    assert read_manifest(out) is None
    with pytest.raises(IntegrityError, match="no manifest.json there"):
        fetch(out, tmp_path / "got", name="--lora", require_manifest=True)


def test_two_tune_steps_at_once_on_the_same_run(tmp_path, stack_env, tiny_model):  # noqa: F811
    """An Airflow retry racing a zombie attempt: both finish, and the output verifies against its manifest."""
    from lora_pipeline.steps.artifacts import verify
    from test_steps import raw_images, upload_folder

    dataset_dir = raw_images(tmp_path / "raw", n=2)
    for p in dataset_dir.glob("*.png"):
        p.with_suffix(".txt").write_text("a photo of <s1>")
    dataset = upload_folder(stack_env, dataset_dir, "artifacts", "datasets/twotune")
    base = upload_folder(stack_env, tiny_model, "models", "tiny-twotune")
    tokens_dir = tmp_path / "tokens"
    tokens_dir.mkdir()
    from lora_ops import LoraFile, save_lora

    save_lora(tokens_dir / "lora.safetensors", LoraFile(tokens={"<s1>": torch.randn(32)}))
    tokens = "s3://artifacts/runs/twotune/invert/"
    publish(tokens_dir, tokens, step="invert", run_id="twotune", inputs={}, parameters={}, result={})
    out = "s3://artifacts/runs/twotune/tune/"
    argv = [sys.executable, "-m", "lora_pipeline.steps.tune", "--run-id", "twotune", "--dataset", dataset, "--tokens", tokens,
            "--base-model", base, "--out", out, "--steps", "3", "--rank", "2", "--resolution", "32",
            "--device", "cpu"]  # fmt: skip
    env = {**os.environ, "LORA_PIPELINE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=600)
        assert proc.returncode == 0, stderr[-2000:]
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    manifest = verify(out)  # every listed file is there with its size and sha256
    assert manifest["step"] == "tune" and any(f["path"] == "lora.safetensors" for f in manifest["files"])
    _, digest = read_manifest(out)
    assert digest in {r["manifest_sha256"] for r in results}  # the manifest that stands is one an attempt returned
