#!/bin/sh
# Entry point of the step images: `<step> [flags]` runs `python -m lora_pipeline.steps.<step> [flags]`.
# Any other command runs as given, so `python -m lora_pipeline.steps.tune ...` (what the DAG's pods run),
# `lora-registry ...`, `lora-ops ...` and `bash` all work.
set -eu

STEPS="scan preprocess invert tune distill evaluate register finish"

usage() {
    echo "usage: <step> [flags]   with <step> one of: ${STEPS}"
    echo "       lora-registry ... | lora-ops ... | python -m lora_pipeline.steps.<step> ...    (runs as given)"
    echo "       <step> --help shows the flags of one step"
}

if [ "$#" -eq 0 ] || [ "$1" = "--help" ] || [ "$1" = "-h" ]; then
    usage
    exit 0
fi

for step in ${STEPS}; do
    if [ "$1" = "${step}" ]; then
        shift
        exec python -m "lora_pipeline.steps.${step}" "$@"
    fi
done

exec "$@"
