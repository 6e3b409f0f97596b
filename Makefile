# The two commands of the README:
#   make demo   set up .venv and run the default experiment on the embedded digits
#   make test   set up .venv and run the fast test suite
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: demo test test-all bench venv clean

# Python 3.12: plain python3.12 if it works, else a pyenv-installed 3.12.
$(PY):
	@set -e; \
	for cand in "python3.12" "env PYENV_VERSION=3.12.1 python3.12" \
	            "$$(pyenv root 2>/dev/null)/versions/3.12.1/bin/python3.12" \
	            $$(ls -d $$(pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 2>/dev/null); do \
	  if $$cand -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)' >/dev/null 2>&1; then \
	    echo "creating $(VENV) with $$cand"; $$cand -m venv $(VENV); exit 0; fi; \
	done; \
	echo "error: Python 3.12 with the venv module is needed" \
	     "(the jax >= 0.12 of setup.py requires it)." \
	     "Install it (e.g. 'pyenv install 3.12' or your package manager) and rerun." >&2; exit 1

$(VENV)/.installed: setup.py | $(PY)
	$(PY) -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -m pip install -q -e '.[test]' 2>&1 | grep -v "^WARNING: Location" || true
	$(PY) -c 'import cdiff_jax, jax, flax, optax, orbax.checkpoint, pytest'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m experiments.minority --config=configs/digits_minority.py --workdir=$(WORKDIR)

test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 -m "not slow" $(PYTEST_ARGS)

test-all: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Speed benchmarks (README, Speed; the full log: benchmarks/README.md). PyTorch for the
# side-by-side runs in its own venv, made with TORCH_PYTHON. PyPI's default Linux build of
# torch bundles CUDA (a few GB; it runs on a CPU too); for the CPU-only build set
# TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_VENV := .venv-torch
TORCH_PYTHON ?= $(firstword $(shell command -v python3.11 python3.12 2>/dev/null))
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

$(TORCH_VENV)/bin/python:
	$(TORCH_PYTHON) -m venv $(TORCH_VENV)
	$(TORCH_VENV)/bin/pip install -q numpy
	$(TORCH_VENV)/bin/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) '$(TORCH_SPEC)'

bench: $(VENV)/.installed $(TORCH_VENV)/bin/python
	$(PY) benchmarks/train_step.py --torch-python $(TORCH_VENV)/bin/python
	$(PY) benchmarks/sampling.py --torch-python $(TORCH_VENV)/bin/python
	$(PY) benchmarks/constrained_step.py
	$(PY) benchmarks/tiw_step.py
	$(PY) benchmarks/group_norm.py
	$(PY) benchmarks/conv_layers.py --torch-python $(TORCH_VENV)/bin/python

clean:
	rm -rf $(VENV) runs .pytest_cache
