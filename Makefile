# twinpipe: `make train` (the default recipe on the embedded corpus) and `make test`.
# Both bootstrap .venv themselves. Without CUDA, torch is the pinned CPU wheel (2.13.0), installed
# before anything else so no requirement can pull the CUDA build.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export WANDB_MODE ?= offline
export DS_ACCELERATOR ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)

.PHONY: train test venv bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "setuptools>=64" wheel
	if command -v nvidia-smi >/dev/null 2>&1; then true; \
	else $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(VENV)/bin/twinpipe-train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf runs outputs .pytest_cache
