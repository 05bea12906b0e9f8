# Two entry points on a fresh machine: `make demo` and `make test`.
# TORCH picks the torch build: the pinned version resolves to the local CPU wheel on
# CI machines and to the CUDA build from PyPI on a GPU machine.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test setup bench clean tiny-base

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m finetune.demo

test: $(STAMP)
	$(PY) -m pytest -n 2 --timeout 900 -q

# Remake the demo's pretrained tiny Wan (assets/tiny-wan-base) from the sample footage: CPU, ~12 min on 2 cores.
tiny-base: $(STAMP)
	$(PY) -m finetune.tiny_base

bench: $(STAMP)
	$(PY) bench/prep.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
