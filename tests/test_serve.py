"""The registered model serves: `mlflow models serve` answers REST requests with the asked images, and the loaded
pyfunc model honours its params, against real SeaweedFS + MLflow servers.

The base model lives on S3 (as in production), so loading a version needs the object store's environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import urllib.request
import warnings

import pytest
from lora_pipeline.steps import register
from lora_pipeline.steps.artifacts import publish
from test_register import publish_candidate, publish_evaluation

from lora_pipeline.devstack import Server, free_ports, server_binary, wait_http
from lora_pipeline.serving import PARAMS, decode_png

NAME = "serve-lora"
REQUEST = {"num_inference_steps": 2, "height": 48, "width": 48, "seed": 1}


@pytest.fixture(scope="module")
def registered(tmp_path_factory, s3_server, mlflow_server, tiny_model):  # noqa: F811
    """One champion version of NAME whose base model is an s3:// prefix: the client environment, and the
    warnings MLflow gave while registering it."""
    tmp = tmp_path_factory.mktemp("serve")
    env = {
        **s3_server.env,
        **mlflow_server.env,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "LORA_PIPELINE_CACHE": str(tmp / "cache"),
    }
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        base = "s3://artifacts/models/serve-tiny/"
        publish(tiny_model, base, step="base-model", run_id="serve-1", inputs={}, parameters={}, result={})
        cand = publish_candidate(tmp, "serve-1", tiny_model)
        evaluation = publish_evaluation(tmp, "serve-1", cand, {"clip_i": 0.5, "clip_t": 0.3}, base)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = register.run(["--run-id", "serve-1", "--evaluation", evaluation, "--model-name", NAME])
    assert result["alias"] == "champion", result
    # what MLflow warned about while the version was logged (type hints, input example, signature)
    env_warnings = [f"{w.filename}: {w.message}" for w in caught if "mlflow" in w.filename]
    return {"env": env, "mlflow_warnings": env_warnings}


def _pixels_differ(a: str, b: str) -> float:
    """Mean absolute pixel difference of two base64 PNGs."""
    import numpy as np

    return float(np.abs(np.asarray(decode_png(a), float) - np.asarray(decode_png(b), float)).mean())


def test_signature_names_every_documented_param(registered, stack_env):  # noqa: F811
    from importlib.metadata import version
    from pathlib import Path

    import mlflow.models
    import mlflow.pyfunc
    from packaging.version import Version

    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    assert {p.name for p in info.signature.params.params} == set(PARAMS)
    assert info.signature.outputs.input_names() == ["image", "width", "height"]
    requirements = mlflow.pyfunc.get_model_dependencies(f"models:/{NAME}@champion")
    pins = dict(line.split("==") for line in Path(requirements).read_text().split())  # every line pinned
    assert "lora-pipeline" not in pins and {"torch", "diffusers", "peft", "mlflow", "minio"} <= set(pins), pins
    assert all(Version(version(name)).public == pinned for name, pinned in pins.items()), pins


def test_served_model_answers_rest_requests_with_the_asked_images(registered, tmp_path):
    port = free_ports(1)[0]
    # `mlflow models serve` execs `uvicorn` from PATH: this environment's, as after `source .venv/bin/activate`
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, **registered["env"], "PATH": path}
    cmd = [server_binary("mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--timeout", "240"]  # fmt: skip
    log_path = tmp_path / "serve.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
                                start_new_session=True)  # fmt: skip
    server = Server("mlflow models serve", f"http://127.0.0.1:{port}", proc, log_path)
    try:
        wait_http(server, "/ping", timeout=300, ok=(200,))

        def invoke(body: dict) -> list[dict]:
            request = urllib.request.Request(
                server.url + "/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(request, timeout=240) as resp:
                    return json.loads(resp.read())["predictions"]
            except urllib.error.HTTPError as exc:
                raise AssertionError(f"{exc.code}: {exc.read()[:2000]!r}\n{server.log_tail()}") from None

        first = invoke({"inputs": ["a photo of <s1> dog"], "params": REQUEST})
        assert len(first) == 1 and (first[0]["width"], first[0]["height"]) == (48, 48), first[0].keys()
        assert decode_png(first[0]["image"]).size == (48, 48)
        # the same request again: the same image (the seed is honoured, not ignored for a random one)
        again = invoke({"dataframe_records": [{"prompt": "a photo of <s1> dog"}], "params": REQUEST})
        assert again[0]["image"] == first[0]["image"]
        # another seed and another size, two prompts: params reach the model
        other = invoke({"inputs": ["a photo of <s1> dog", "<s1> on a beach"],
                        "params": {**REQUEST, "seed": 2, "height": 40, "width": 56}})  # fmt: skip
        assert [decode_png(r["image"]).size for r in other] == [(56, 40), (56, 40)]
        same_size = invoke({"inputs": ["a photo of <s1> dog"], "params": {**REQUEST, "seed": 2}})
        assert _pixels_differ(first[0]["image"], same_size[0]["image"]) > 0.5
    finally:
        server.stop()
    assert proc.poll() is not None


def test_loaded_model_honours_params(registered, stack_env):  # noqa: F811
    import mlflow.pyfunc

    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict(["a photo of <s1> dog", "<s1> on a beach"], params=REQUEST)
    assert list(out.columns) == ["image", "width", "height"] and len(out) == 2
    assert [decode_png(s).size for s in out["image"]] == [(48, 48), (48, 48)]
    assert out["width"].tolist() == [48, 48] and out["height"].tolist() == [48, 48]
    base = out["image"][0]
    # each param changes the image; the defaults are the model's own size (the tiny model: 32 px)
    for change in ({"seed": 2}, {"scale": 0.0}, {"guidance_scale": 1.0}, {"negative_prompt": "blurry"},
                   {"num_inference_steps": 3}):  # fmt: skip
        changed = model.predict(["a photo of <s1> dog"], params={**REQUEST, **change})["image"][0]
        assert _pixels_differ(base, changed) > 0.5, change
    assert decode_png(model.predict("a photo of <s1> dog", params={"num_inference_steps": 2})["image"][0]).size == (
        32,
        32,
    )
    with pytest.raises(ValueError, match="height=30"):
        model.predict(["x"], params={**REQUEST, "height": 30})


def test_version_loads_without_the_project_installed(registered, tmp_path):
    """The version carries the project's code: an interpreter that cannot import the installed project (no .pth
    files processed, so no editable-install finder) still loads it and generates the asked image."""
    script = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('lora_pipeline') is None, 'the project is importable'\n"
        "import mlflow.pyfunc\n"
        "m = mlflow.pyfunc.load_model(sys.argv[1])\n"
        "from lora_pipeline.serving import decode_png\n"  # from the version's code/, now first on sys.path
        "out = m.predict(['a photo of <s1> dog'], params={'num_inference_steps': 2, 'height': 48, 'width': 48})\n"
        "print(sys.modules['lora_pipeline.steps.models'].__file__)\n"
        "print(decode_png(out['image'][0]).size)\n"
    )
    env = {**os.environ, **registered["env"], "PYTHONPATH": sysconfig.get_paths()["purelib"]}
    proc = subprocess.run([sys.executable, "-S", "-c", script, f"models:/{NAME}@champion"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert "/code/lora_pipeline/steps/models.py" in lines[-2] and lines[-1] == "(48, 48)", proc.stdout


def test_lora_registry_prints_no_warning(registered, tmp_path):
    """Registering, `lora-registry --help` and `get` give no MLflow warning the project causes (the type-hint
    warning was printed on every call, the input-example one on every registration)."""
    assert registered["mlflow_warnings"] == []
    env = {**os.environ, **registered["env"]}
    helped = subprocess.run(
        [server_binary("lora-registry"), "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert helped.returncode == 0 and helped.stderr == "", helped.stderr
    got = subprocess.run([server_binary("lora-registry"), "get", f"{NAME}@champion", "--out", str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert "warning" not in got.stderr.lower(), got.stderr
    assert json.loads(got.stdout.strip().splitlines()[-1])["name"] == NAME
