"""The artifact layer against a real SeaweedFS S3 server and local folders."""

from __future__ import annotations

import io
import json
import os

import pytest
from lora_pipeline.steps.artifacts import (
    MANIFEST,
    CredentialsError,
    IntegrityError,
    Store,
    StoreConfig,
    fetch,
    find_completed,
    parse_uri,
    publish,
    read_manifest,
    run_prefix_of,
    sha256_file,
)
from lora_pipeline.steps.models import resolve_base_model
from minio import Minio


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # noqa: F811
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return s3_server.env


def _client(env) -> Minio:
    return Minio(
        env["S3_ENDPOINT_URL"].split("://")[1],
        access_key=env["AWS_ACCESS_KEY_ID"],
        secret_key=env["AWS_SECRET_ACCESS_KEY"],
        secure=False,
    )


def _folder(tmp_path, name="out"):
    root = tmp_path / name
    (root / "grids").mkdir(parents=True)
    (root / "lora.safetensors").write_bytes(os.urandom(3000))
    (root / "grids" / "a.png").write_bytes(b"not really a png")
    return root


def test_parse_uri_forms_and_errors(tmp_path):
    assert str(parse_uri("s3://bucket/runs/r1/tune")) == "s3://bucket/runs/r1/tune"
    assert str(parse_uri("s3://bucket/runs/r1/tune").as_prefix()) == "s3://bucket/runs/r1/tune/"
    assert parse_uri(f"file://{tmp_path}").key == str(tmp_path)
    assert parse_uri(str(tmp_path)).scheme == "file"
    with pytest.raises(ValueError, match="--dataset='gs://x/y'.*unsupported scheme"):
        parse_uri("gs://x/y", "--dataset")
    with pytest.raises(ValueError, match="needs a bucket"):
        parse_uri("s3:///nobucket", "--out")


@pytest.mark.parametrize("where", ["s3", "local"])
def test_publish_then_fetch_verifies_every_file(where, tmp_path, s3_env):
    out = "s3://artifacts/runs/roundtrip/tune/" if where == "s3" else str(tmp_path / "pub")
    src = _folder(tmp_path)
    inputs = {"dataset": {"uri": "s3://data/d/", "sha256": "ab" * 32}}
    result = publish(
        src, out, step="tune", run_id="r1", inputs=inputs, parameters={"rank": 4}, result={"lora": out + "lora"}
    )
    assert result["reused"] is False and len(result["manifest_sha256"]) == 64

    manifest, digest = read_manifest(out)
    assert digest == result["manifest_sha256"]
    assert manifest["step"] == "tune" and manifest["parameters"] == {"rank": 4} and manifest["inputs"] == inputs
    assert {f["path"] for f in manifest["files"]} == {"lora.safetensors", "grids/a.png"}
    lora = next(f for f in manifest["files"] if f["path"] == "lora.safetensors")
    assert lora == {"path": "lora.safetensors", "size": 3000, "sha256": sha256_file(src / "lora.safetensors")}
    assert {"python", "torch", "minio"} <= set(manifest["versions"])

    got = fetch(out, tmp_path / "got", require_manifest=True)
    assert got.sha256 == digest
    assert (tmp_path / "got" / "lora.safetensors").read_bytes() == (src / "lora.safetensors").read_bytes()

    # same inputs and parameters: the recorded result; other parameters: a clear refusal
    again = find_completed(out, "tune", inputs, {"rank": 4})
    assert again["reused"] is True and again["lora"] == out + "lora"
    with pytest.raises(ValueError, match="other inputs or parameters"):
        find_completed(out, "tune", inputs, {"rank": 8})
    assert find_completed(str(tmp_path / "never-written"), "tune", inputs, {}) is None


def test_every_manifest_of_a_run_carries_the_raw_dataset_hash(tmp_path):
    raw = {"uri": "s3://data/datasets/dog/", "sha256": "a" * 64}
    pre = str(tmp_path / "runs" / "r1" / "preprocess")
    publish(_folder(tmp_path, "p"), pre, step="preprocess", run_id="r1", inputs={"dataset": raw}, parameters={},
            result={})  # fmt: skip
    assert read_manifest(pre)[0]["source_dataset_sha256"] == "a" * 64  # the first step: its input's own hash
    dataset = fetch(pre, tmp_path / "got", require_manifest=True)
    assert dataset.sha256 != "a" * 64 and dataset.lineage()["source_dataset_sha256"] == "a" * 64
    tune = str(tmp_path / "runs" / "r1" / "tune")
    inputs = {"dataset": dataset.lineage(), "base_model": {"uri": "m", "sha256": "b" * 64}}
    publish(_folder(tmp_path, "t"), tune, step="tune", run_id="r1", inputs=inputs, parameters={}, result={})
    assert read_manifest(tune)[0]["source_dataset_sha256"] == "a" * 64  # carried, not the preprocessed hash
    assert run_prefix_of(tune) == str(tmp_path / "runs" / "r1")
    assert run_prefix_of("s3://b/runs/r1/evaluate/") == "s3://b/runs/r1/"
    assert run_prefix_of("s3://b/runs/r1/distill-r4") == "s3://b/runs/r1/"


def test_prefix_without_manifest_is_not_trusted(tmp_path, s3_env):
    client = _client(s3_env)
    if not client.bucket_exists("artifacts"):
        client.make_bucket("artifacts")
    client.put_object("artifacts", "runs/crashed/tune/lora.safetensors", io.BytesIO(b"half"), 4)
    with pytest.raises(IntegrityError, match="no manifest.json there"):
        fetch("s3://artifacts/runs/crashed/tune/", tmp_path / "x", name="--lora", require_manifest=True)
    assert find_completed("s3://artifacts/runs/crashed/tune/", "tune", {}, {}) is None


def test_corrupted_object_fails_the_hash_check(tmp_path, s3_env):
    out = "s3://artifacts/runs/corrupt/distill/"
    src = _folder(tmp_path)
    publish(src, out, step="distill", run_id="corrupt", inputs={}, parameters={}, result={})
    data = bytearray((src / "lora.safetensors").read_bytes())
    data[100] ^= 0xFF  # same size, one flipped byte
    _client(s3_env).put_object("artifacts", "runs/corrupt/distill/lora.safetensors", io.BytesIO(data), len(data))
    with pytest.raises(IntegrityError, match=r"lora.safetensors: sha256 .* does not match the manifest"):
        fetch(out, tmp_path / "got", require_manifest=True)


@pytest.mark.parametrize("where", ["s3", "local"])
def test_publish_survives_a_concurrent_attempt_interleaving(where, tmp_path, s3_env, monkeypatch):
    """Another attempt's file lands after ours but before our manifest: the prefix ends consistent anyway."""
    out = "s3://artifacts/runs/interleave/tune/" if where == "s3" else str(tmp_path / "pub")
    ours, theirs = _folder(tmp_path, "ours"), _folder(tmp_path, "theirs")
    store = Store.for_uri(out)
    loc = parse_uri(out).as_prefix()
    real_put_bytes = Store.put_bytes
    landed = []

    def put_bytes(self, data, where_, content_type="application/octet-stream"):
        if where_.key.endswith(MANIFEST) and not landed:  # the zombie's upload, once, just before our manifest
            landed.append(where_)
            self.put_file(theirs / "lora.safetensors", loc.join("lora.safetensors"),
                          sha256=sha256_file(theirs / "lora.safetensors"))  # fmt: skip
        return real_put_bytes(self, data, where_, content_type)

    monkeypatch.setattr(Store, "put_bytes", put_bytes)
    result = publish(ours, out, step="tune", run_id="r", inputs={}, parameters={}, result={}, store=store)
    assert landed, "the interleaving upload never happened"
    got = fetch(out, tmp_path / "got", require_manifest=True)  # every file matches the manifest that stands
    assert got.sha256 == result["manifest_sha256"] and result["reused"] is False
    assert (got.path / "lora.safetensors").read_bytes() == (ours / "lora.safetensors").read_bytes()


def test_publish_refuses_a_concurrent_attempt_with_other_parameters(tmp_path, monkeypatch):
    out = str(tmp_path / "pub")
    ours, theirs = _folder(tmp_path, "ours"), _folder(tmp_path, "theirs")
    real_put_bytes = Store.put_bytes

    def put_bytes(self, data, where_, content_type="application/octet-stream"):
        real_put_bytes(self, data, where_, content_type)
        if where_.key.endswith(MANIFEST) and b'"rank": 4' in data:  # theirs overwrites ours at once
            monkeypatch.setattr(Store, "put_bytes", real_put_bytes)
            publish(theirs, out, step="tune", run_id="r", inputs={}, parameters={"rank": 8}, result={})

    monkeypatch.setattr(Store, "put_bytes", put_bytes)
    with pytest.raises(ValueError, match="another 'tune' attempt with other inputs or parameters"):
        publish(ours, out, step="tune", run_id="r", inputs={}, parameters={"rank": 4}, result={})


def test_multipart_upload_of_a_large_file(tmp_path, s3_env):
    big = tmp_path / "big" / "unet.bin"
    big.parent.mkdir()
    big.write_bytes(os.urandom(11 * 1024 * 1024 + 17))
    store = Store(StoreConfig.from_env(part_size=5 * 1024 * 1024))
    publish(big.parent, "s3://artifacts/runs/big/m/", step="m", run_id="big", inputs={}, parameters={}, result={})
    publish(big.parent, "s3://artifacts/runs/big/p/", step="m", run_id="big", inputs={}, parameters={}, result={},
            store=store)  # fmt: skip
    stat = _client(s3_env).stat_object("artifacts", "runs/big/p/unet.bin")
    assert stat.etag.endswith("-3"), f"expected a 3-part multipart ETag, got {stat.etag}"
    got = fetch("s3://artifacts/runs/big/p/", tmp_path / "got", store=store, require_manifest=True)
    assert sha256_file(got.path / "unet.bin") == sha256_file(big)


def test_wrong_credentials_give_a_clear_error(tmp_path, s3_env, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "definitely-wrong-secret")
    with pytest.raises(CredentialsError, match="rejected the credentials.*AWS_ACCESS_KEY_ID") as info:
        publish(_folder(tmp_path), "s3://artifacts/runs/creds/x/", step="x", run_id="c", inputs={}, parameters={},
                result={})  # fmt: skip
    assert "definitely-wrong-secret" not in str(info.value)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(CredentialsError, match="AWS_SECRET_ACCESS_KEY must be set"):
        StoreConfig.from_env()


def test_unreachable_store_retries_then_fails(tmp_path, monkeypatch):
    from lora_pipeline.steps.artifacts import StorageError

    from lora_pipeline.devstack import free_ports

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_ports(1)[0]}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = Store(StoreConfig.from_env(attempts=3, backoff=0.05))
    with pytest.raises(StorageError, match="still failing after 3 attempts"):
        read_manifest("s3://artifacts/x/", store)


def test_base_model_from_s3_is_downloaded_once(tmp_path, s3_env, tiny_model, monkeypatch):
    monkeypatch.setenv("LORA_PIPELINE_CACHE", str(tmp_path / "cache"))
    client = _client(s3_env)
    if not client.bucket_exists("models"):
        client.make_bucket("models")
    for path in sorted(tiny_model.rglob("*")):
        if path.is_file():
            client.fput_object("models", f"tiny/{path.relative_to(tiny_model).as_posix()}", str(path))
    first = resolve_base_model("s3://models/tiny/")
    assert (tmp_path / "cache" / "models" / first.sha256 / "model_index.json").is_file()
    marker = tmp_path / "cache" / "models" / first.sha256 / "marker"
    marker.write_text("kept")  # a second resolve must reuse this folder, not download again
    second = resolve_base_model("s3://models/tiny/")
    assert second.path == first.path and marker.read_text() == "kept"
    # the local folder gives the same content hash as the downloaded copy
    assert resolve_base_model(str(tiny_model)).sha256 == first.sha256
    index = json.loads((tmp_path / "cache" / "models" / "index.json").read_text())
    assert list(index.values()) == [first.sha256]
    with pytest.raises(ValueError, match="--base-model='not a model'"):
        resolve_base_model("not a model")
    assert MANIFEST == "manifest.json"


def test_manifest_paths_cannot_escape_the_download_folder(tmp_path):
    out = tmp_path / "pub"
    publish(_folder(tmp_path), str(out), step="tune", run_id="r1", inputs={}, parameters={}, result={})
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"][0]["path"] = "../../escaped.safetensors"
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IntegrityError, match="outside the download folder"):
        fetch(str(out), tmp_path / "got" / "deeper", require_manifest=True)
    assert not (tmp_path / "escaped.safetensors").exists()


def test_step_errors_mask_credentials_and_url_passwords(monkeypatch):
    from lora_pipeline.steps.common import _redact

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-123456")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-abcdef")
    text = _redact("http://alice:pw0rd@mlflow:5000 failed with tok-123456 and secret-abcdef")
    assert text == "http://***@mlflow:5000 failed with *** and ***"
