#!/usr/bin/env bash
# The Airflow UI (airflow standalone) on loopback with this project's DAGs and the local executor profile:
# steps run as subprocesses of this virtual environment against the local stack (started if needed).
#   make airflow   ->  http://127.0.0.1:8080  (LORA_PIPELINE_AIRFLOW_PORT to change)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
cd "$ROOT"

"$PY" scripts/stack.py up
eval "$("$PY" scripts/stack.py env --airflow)"
export PATH="$(dirname "$PY"):$PATH"
mkdir -p "$AIRFLOW_HOME"

# lora_finetune's form opens with the demo's setup (the shapes world, uploaded now): Trigger runs on a CPU
LORA_PIPELINE_FINETUNE_DEFAULTS="$("$PY" scripts/demo_pipeline.py --print-form-defaults)"
export LORA_PIPELINE_FINETUNE_DEFAULTS

echo "airflow: migrating the metadata database in $AIRFLOW_HOME ..."
airflow db migrate >"$AIRFLOW_HOME/migrate.log" 2>&1 || { tail -20 "$AIRFLOW_HOME/migrate.log"; exit 1; }
airflow pools set lora_gpu "${LORA_PIPELINE_GPU_SLOTS:-1}" "GPU steps: one slot per GPU" >/dev/null
echo "airflow: UI on http://$AIRFLOW__API__HOST:$AIRFLOW__API__PORT (DAGs from $AIRFLOW__CORE__DAGS_FOLDER); Ctrl-C stops it"
echo "airflow: trigger lora_finetune from its form (defaults: the demo's ring on the shapes world, a few minutes on a CPU); MLflow UI on $MLFLOW_TRACKING_URI"
exec airflow standalone
