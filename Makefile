# `make demo` and `make test` set everything up on a fresh machine: a .venv, the project, the default model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ferry-installed

.PHONY: install model demo lint format test test-all test-gpu bench-cpu gpu-wheels clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU machines take the local CPU build of torch; the GPU machine brings its own.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

model: install
	$(PY) -m engine.shared.model_files

demo: model
	$(PY) scripts/demo.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: model lint
	$(PY) -m pytest -q -m "not gpu" tests

test-gpu:
	# On the device machine: its own torch, plus carried wheels (scripts/gpu_wheels.sh) for the rest.
	python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
	PYTHONPATH=/tmp/site:$(CURDIR) python3 -m pytest -q -m gpu tests/scheduler_proc/test_gpu.py

bench-cpu: model
	$(PY) scripts/bench_cpu.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
