# Two commands for a fresh clone: `make repro` (set up, run the pipeline, print the matrix)
# and `make test` (set up, run the test suite). Both create the venv when it is missing.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export DVC_NO_ANALYTICS = 1
export CLEARML_OFFLINE_MODE = 1
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: venv repro test lint paper clean-run

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[text,dev]'
	$(BIN)/pip install --quiet --no-deps 'torchreid==0.2.5'
	touch $(STAMP)

repro: venv
	$(BIN)/dvc repro
	@echo
	@cat reports/eval_matrix.md

test: venv
	$(BIN)/pytest -o addopts="" -q

lint: venv
	$(BIN)/ruff check dmf_core stages tests benchmarks

# Switch to the paper profile (real datasets, ViT-B/16, GPU): see docs/datasets.md first.
# The params.yaml it replaces is kept as params.yaml.bak-<YYYYmmdd-HHMMSS> (a -1, -2, ... suffix
# when that name is taken: an earlier backup is never overwritten); the recipe prints the name.
# Restore with `cp params.yaml.bak-<stamp> params.yaml`. Nothing is backed up when params.yaml
# already equals configs/paper.yaml.
paper:
	@set -e; \
	if [ -f params.yaml ] && ! cmp -s params.yaml configs/paper.yaml; then \
	  backup=params.yaml.bak-$$(date +%Y%m%d-%H%M%S); base=$$backup; n=0; \
	  while [ -e "$$backup" ] || [ -L "$$backup" ]; do n=$$((n + 1)); backup=$$base-$$n; done; \
	  cp -p params.yaml "$$backup"; \
	  echo "make paper: saved your previous params.yaml as $$backup (restore: cp $$backup params.yaml)"; \
	fi; \
	cp configs/paper.yaml params.yaml; \
	echo "make paper: params.yaml is now configs/paper.yaml"
