# segassist: `make demo` runs the product on a real CT, `make test` runs the checks CI runs.
# Both create .venv if missing and install the project with its dev extras (CPU-only torch).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.segassist-installed

.PHONY: demo test install

demo: install
	$(BIN)/segassist demo

# pytest exits 5 when it collects no test: make stops on it like on any failure.
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest

install: $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else "segassist needs Python >= 3.11: set PYTHON=/path/to/python3.11")'
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so that no dependency pulls a multi-GB CUDA build of it.
# MONAI Label 0.8.5 only for its client (the one 3D Slicer bundles; it needs only requests),
# which the compatibility tests drive: --no-deps keeps its torch/MONAI pins out.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e '.[dev]'
	$(BIN)/python -m pip install --no-deps "monailabel==0.8.5"
	touch $(STAMP)
