# lora-pipeline: `make test` and `make demo` work on a fresh machine (they create .venv and install).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= train,preprocess,pipeline,airflow,deploy,dev
OUT ?= out

.PHONY: install browser test test-fast lint format demo demo-library bench bench-quality load-check shapes-pretrain up down airflow images clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: this version is the CPU wheel that installs offline; an unpinned torch pulls CUDA
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# the browser tests (tests/test_airflow_ui.py) drive Debian's chromium: installed here when it is missing
browser:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=""; [ "$$(id -u)" -eq 0 ] || SUDO="sudo"; \
		echo "installing Debian's chromium for the browser tests (apt-get)"; \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

test: $(STAMP) lint browser
	$(PY) -m pytest -q -m "not gpu" $(PYTEST_ARGS)

# the quick subset for development: no end-to-end Airflow runs (CI runs everything: make test)
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not gpu and not slow" $(PYTEST_ARGS)

# the whole pipeline through Airflow on the local stack (tiny model, sample dataset, no downloads)
demo: $(STAMP)
	$(PY) scripts/demo_pipeline.py --out $(OUT)/demo-pipeline

# the library alone: inject, save, reload, alpha sweep grid
demo-library: $(STAMP)
	$(PY) -m lora_ops.demo --out $(OUT)/demo-library

bench: $(STAMP)
	$(PY) benchmarks/train_speed.py --arch tiny
	$(PY) benchmarks/resize_speed.py
	$(PY) benchmarks/lora_sizes.py

# what each recipe teaches the shapes world (docs/quality.md); about an hour on 2 CPU cores
bench-quality: $(STAMP)
	$(PY) benchmarks/quality.py --out $(OUT)/bench-quality

# N concurrent lora_finetune runs through Airflow on the local stack (docs/steps.md, "Load check")
load-check: $(STAMP)
	$(PY) scripts/load_check.py --runs 6 --out $(OUT)/load-check

# rebuild the shipped shapes-world models (seeded; see docs/quality.md for its wall time)
shapes-pretrain: $(STAMP)
	$(VENV)/bin/lora-ops shapes pretrain --out lora_ops/shapes/pretrained --overwrite

up: $(STAMP)
	$(PY) scripts/stack.py up

down: $(STAMP)
	$(PY) scripts/stack.py down

airflow: $(STAMP)
	bash scripts/airflow.sh

images:
	bash images/build.sh

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
