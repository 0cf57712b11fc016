# make help | setup | train | prepare | test | test-fast | lint | format | bench
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: help setup train prepare test test-fast lint format bench
help:
	@echo "make train [ARGS='key=value ...']   run the default experiment (sets up .venv first)"
	@echo "make test                           run every test (starts a local Slurm cluster when apt-get works)"
	@echo "make test-fast                      unit tests only (no slow, no slurm)"
	@echo "make prepare | lint | format | bench"

# The venv is rebuilt when the dependency files change. torch is pinned to the CPU build through the constraints.
$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip 2>/dev/null || true
	$(PY) -m pip install -q -c constraints-cpu.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(PY) launch.py $(ARGS)

prepare: setup
	$(PY) launch.py mode=prepare $(ARGS)

test: setup
	bash scripts/test.sh

test-fast: setup
	$(PY) -m pytest -m "not slow and not slurm" -q

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix . && $(PY) -m ruff format .

bench: setup
	$(PY) bench/bench_packing.py --scale 0.1
