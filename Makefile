# finetune-operator: the targets a newcomer can guess.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEVCLUSTER := tests/cluster/devcluster.py

.PHONY: help venv lint unit integration trainer-tests test crds cluster-binaries cluster-up cluster-down demo bench-trainer tmux krew-archive

help:
	@echo "make demo          bring up the local cluster and fine-tune a tiny Llama for real on it"
	@echo "                   (make demo DEMO_FLAGS=--replay: a recorded run on simulated A40 nodes)"
	@echo "make test          lint, unit, trainer and integration tests"
	@echo "make lint          ruff, mypy and the import contract"
	@echo "make crds          regenerate crds/ from the pydantic models"
	@echo "make cluster-up    start the local control plane (builds it from source the first time)"
	@echo "make cluster-down  stop it"
	@echo "make bench-trainer packing and throughput benchmark of the trainer"

# The virtual environment is rebuilt whenever a pyproject.toml changes. It holds the three distributions: the
# contract, the operator (with the dev tools) and the trainer (for its CPU tests).
PYPROJECTS := pyproject.toml contract/pyproject.toml trainer-image/pyproject.toml
$(VENV)/.installed: $(PYPROJECTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./contract -e ./trainer-image -e '.[dev,kubectl]'
	touch $@

venv: $(VENV)/.installed

# Test directories are type-checked one at a time: each has its own conftest module.
lint: venv
	$(VENV)/bin/ruff check contract operator trainer-image tests plugins
	$(VENV)/bin/ruff format --check contract operator trainer-image tests plugins
	$(VENV)/bin/mypy
	MYPYPATH=tests/cluster $(VENV)/bin/mypy tests/unit
	MYPYPATH=tests/cluster $(VENV)/bin/mypy tests/trainer
	MYPYPATH=tests/cluster:tests/integration $(VENV)/bin/mypy --explicit-package-bases tests/cluster tests/integration
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint operator/Dockerfile trainer-image/Dockerfile

unit: venv
	$(VENV)/bin/pytest -q tests/unit

trainer-tests: venv
	$(VENV)/bin/pytest -q tests/trainer

integration: venv cluster-binaries tmux
	$(VENV)/bin/pytest -q tests/integration

# `kubectl ftj watch` is tested in a real terminal: tmux, from the distribution's packages when it is missing.
tmux:
	@command -v tmux >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
		&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq tmux >/dev/null; } \
		|| { echo "tmux is needed by the integration tests: install it (apt-get install tmux)" >&2; exit 1; }

test: lint unit trainer-tests integration

crds: venv
	$(PY) -m finetune_operator.crdgen crds charts/finetune-operator/crds

cluster-binaries: venv
	$(PY) $(DEVCLUSTER) build

cluster-up: cluster-binaries
	$(PY) $(DEVCLUSTER) up

cluster-down: venv
	$(PY) $(DEVCLUSTER) down

# DEMO_FLAGS=--replay plays a recorded trainer run on the simulated A40 nodes instead of training for real.
demo: cluster-up
	$(PY) tests/cluster/demo.py $(DEMO_FLAGS)

# The archive of plugins/krew/ftj.yaml (kubectl ftj through krew), for a release.
krew-archive:
	$(PYTHON) plugins/krew/archive.py dist

bench-trainer: venv
	$(PY) -m finetune_trainer.bench
