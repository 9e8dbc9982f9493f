#!/usr/bin/env bash
# Build the container images: `make images`, or `bash images/build.sh [step-cuda|step-cpu|airflow|mlflow ...]`.
# REGISTRY (default: none) and TAG (default: the project version) name them; PUSH=1 pushes them after the build.
set -euo pipefail
cd "$(dirname "$0")/.."

ALL_IMAGES=(step-cuda step-cpu airflow mlflow)
DOCKER=${DOCKER:-docker}

if ! command -v "${DOCKER}" >/dev/null 2>&1; then
    echo "images: no '${DOCKER}' command found; install Docker (or set DOCKER=podman) to build the images" >&2
    exit 2
fi
if ! "${DOCKER}" info >/dev/null 2>&1; then
    echo "images: no Docker engine is reachable ('${DOCKER} info' failed); start the Docker daemon or set DOCKER_HOST" >&2
    exit 2
fi

VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)
TAG=${TAG:-${VERSION}}
PREFIX=${REGISTRY:+${REGISTRY%/}/}

images=("$@")
if [ "${#images[@]}" -eq 0 ]; then
    images=("${ALL_IMAGES[@]}")
fi

for image in "${images[@]}"; do
    dockerfile="images/Dockerfile.${image}"
    if [ ! -f "${dockerfile}" ]; then
        echo "images: unknown image '${image}'; choose from: ${ALL_IMAGES[*]}" >&2
        exit 2
    fi
    ref="${PREFIX}lora-pipeline-${image}:${TAG}"
    echo "images: building ${ref} from ${dockerfile}"
    "${DOCKER}" build --file "${dockerfile}" --tag "${ref}" .
    if [ "${PUSH:-0}" = "1" ]; then
        "${DOCKER}" push "${ref}"
    fi
done
