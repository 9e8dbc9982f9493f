#!/usr/bin/env bash
# The GPU part of the training-speed benchmark (docs/benchmarks.md), in one command:
#
#     bash benchmarks/gpu_run.sh [WHEELS_DIR] [OUT_DIR]
#
# On a machine with torch, transformers and peft, it installs what is missing (diffusers and the few
# packages it needs that transformers does not) from the wheels in WHEELS_DIR (default out/wheels; fill it on
# a connected machine, same Python version, with `bash benchmarks/gpu_run.sh --download`), then runs the benchmark
# on the SD 1.5 shape at 512 px, rank 4: batch 4 and batch 16 (reference loop, full fine-tune, the trainer)
# and the PTI end-to-end run (1000 + 1000 steps, batch 1 x 4). JSON and tables go to OUT_DIR
# (default out/bench-gpu). PY selects the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PACKAGES=(diffusers==0.42.1 importlib_metadata zipp regex safetensors filelock pillow)

if [[ "${1:-}" == "--download" ]]; then
    WHEELS=${2:-out/wheels}
    mkdir -p "$WHEELS"
    "$PY" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" "${PACKAGES[@]}"
    echo "wheels in $WHEELS: carry this folder to the GPU machine"
    exit 0
fi

WHEELS=${1:-out/wheels}
OUT=${2:-out/bench-gpu}
mkdir -p "$OUT"
if ! "$PY" -c "import diffusers" 2>/dev/null; then
    if [[ ! -d "$WHEELS" ]]; then
        echo "diffusers is not installed and $WHEELS holds no wheels (run: bash benchmarks/gpu_run.sh --download)" >&2
        exit 2
    fi
    "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" diffusers
fi
PYTHONPATH=. "$PY" -c "import lora_ops.training.pti" || { echo "a package lora_ops needs is missing (above)" >&2; exit 2; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"

BENCH=("$PY" benchmarks/train_speed.py --arch sd15 --device cuda --resolution 512 --rank 4)
"${BENCH[@]}" --batch 4 --json "$OUT/sd15_b4.json" | tee "$OUT/sd15_b4.md"
"${BENCH[@]}" --batch 16 --json "$OUT/sd15_b16.json" | tee "$OUT/sd15_b16.md"
"${BENCH[@]}" --batch 4 --skip reference,full,trainer --pti-e2e --steps "${PTI_STEPS:-1000}" \
    --json "$OUT/sd15_pti_e2e.json" | tee "$OUT/sd15_pti_e2e.txt"
echo "results in $OUT"
