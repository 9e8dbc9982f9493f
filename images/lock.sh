#!/usr/bin/env bash
# Regenerate images/constraints.txt: every package the step images install, at the version pip resolves now,
# with torch at the images' TORCH_VERSION. Run it on Linux x86_64 with Python 3.11 (what the images run) after a
# dependency changes in pyproject.toml; the images build with `--constraint images/constraints.txt`.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
TORCH_VERSION=$(sed -n 's/^ARG TORCH_VERSION=//p' images/Dockerfile.step-cuda)
work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT

echo "torch==${TORCH_VERSION}" > "${work}/torch.txt"
echo "lock: resolving .[pipeline,preprocess,train] with torch==${TORCH_VERSION} (takes minutes)" >&2
# --isolated: the public index only, whatever local wheel folders this machine's pip configuration adds
"${PYTHON}" -m pip --isolated install --dry-run --ignore-installed --quiet \
    --report "${work}/report.json" --constraint "${work}/torch.txt" ".[pipeline,preprocess,train]"

"${PYTHON}" - "${work}/report.json" > images/constraints.txt <<'PY'
import json
import sys

report = json.load(open(sys.argv[1]))
pins = sorted(
    (item["metadata"]["name"].lower(), item["metadata"]["version"])
    for item in report["install"]
    if item["metadata"]["name"] != "lora-pipeline"
)
print("# Versions of everything the step images install (images/lock.sh writes this file; do not edit by hand).")
for name, version in pins:
    print(f"{name}=={version}")
PY
echo "lock: wrote images/constraints.txt ($(grep -c '==' images/constraints.txt) packages)" >&2
