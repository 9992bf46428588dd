# Developer entry points. `make test` and `make demo` work on a fresh machine: they create .venv and install.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch/torchvision versions for the venv; override to use another build (TORCH_SPEC="torch torchvision").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv test test-fast demo info benchmark clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test,train]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

info: venv
	$(VENV)/bin/overlock info
