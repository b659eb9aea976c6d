# The two commands of the README. Both create .venv from nothing but Python.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision first and pinned: the CPU machines here carry exactly these wheels on disk.
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: run test install install-test clean gpu-wheels

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/vitscale run $(CONFIG)

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The wheels a bare GPU machine lacks, for infra/bench-gpu.sh to install offline (Python 3.12, x86_64).
gpu-wheels: install
	PYTHON=$(BIN)/python infra/gpu-wheels.sh

clean:
	rm -rf $(VENV) runs .gpu-wheels
