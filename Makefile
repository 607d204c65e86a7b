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
# DeepSpeed builds its CPU communication extension on first use; keep the build inside this venv so
# two checkouts do not rebuild a shared ~/.cache/torch_extensions for each other.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
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

# `make train`: the default recipe as a DualPipeV pipeline over NPROC local ranks (gloo on CPU, one
# rank per GPU with NCCL where there are enough GPUs). `make train NPROC=1` runs one process;
# ARGS adds Hydra overrides, e.g. ARGS="train.steps=50".
NPROC ?= 2
train: $(STAMP)
	PYTHON=$(PY) launch/torchrun.sh $(NPROC) parallel.pp=$(NPROC) parallel.schedule=dualpipev train.micro_batch=2 \
	  run.dir=runs/make-train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(ARGS)

clean:
	rm -rf runs outputs .pytest_cache
