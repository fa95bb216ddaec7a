# finetune-operator: the targets a newcomer can guess.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEVCLUSTER := tests/cluster/devcluster.py

.PHONY: help venv lint unit integration trainer-tests test crds cluster-binaries cluster-up cluster-down demo \
	bench-trainer bench-gpu trainer-lock trainer-image-check tmux krew-archive bench-operator chaos

help:
	@echo "make demo          bring up the local cluster and fine-tune a tiny Llama for real on it"
	@echo "                   (make demo DEMO_FLAGS=--replay: a recorded run on simulated A40 nodes)"
	@echo "make test          lint, unit, trainer and integration tests"
	@echo "make lint          ruff, mypy and the import contract"
	@echo "make crds          regenerate crds/ from the pydantic models"
	@echo "make cluster-up    start the local control plane (builds it from source the first time)"
	@echo "make cluster-down  stop it"
	@echo "make bench-trainer packing, attention and memory-plan benchmark of the trainer (CPU)"
	@echo "make bench-gpu     the same, Llama-2-7B-shaped on one CUDA GPU; figures in bench-gpu.json"
	@echo "make trainer-lock  re-pin the trainer image's dependencies with hashes (trainer-image/requirements.lock)"
	@echo "make trainer-image-check  hadolint, and the image's venv built from the lock runs the entrypoint"
	@echo "make bench-operator the operator's cost per FineTuneJob against bare Jobs (N=100,300,1000; BENCH_ARGS=...)"
	@echo "make chaos         200 FineTuneJobs through operator kills, API server and etcd restarts, evictions (CHAOS_ARGS=...)"

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
	$(VENV)/bin/mypy tests/conftest.py
	MYPYPATH=tests/cluster $(VENV)/bin/mypy tests/unit
	MYPYPATH=tests/cluster $(VENV)/bin/mypy tests/trainer
	MYPYPATH=tests/cluster:tests/integration $(VENV)/bin/mypy --explicit-package-bases tests/cluster tests/integration
	$(VENV)/bin/lint-imports
	$(VENV)/bin/hadolint operator/Dockerfile trainer-image/Dockerfile

# The chart's tests render it with the helm that cluster-binaries builds.
unit: venv cluster-binaries
	$(VENV)/bin/pytest -q tests/unit

trainer-tests: venv
	$(VENV)/bin/pytest -q tests/trainer

# The API server writes its audit log: the operator benchmark's small form counts the operator's requests from it.
integration: venv cluster-binaries tmux
	DEVCLUSTER_AUDIT=1 $(VENV)/bin/pytest -q tests/integration

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

# A random Llama-2-7B-shaped model (no download), sized to finish within 8 minutes on one H100-class GPU.
bench-gpu: venv
	$(PY) -m finetune_trainer.bench --device cuda --validate-mb --output bench-gpu.json

# The trainer image's dependencies for linux/x86_64, every transitive one and the build backend, with hashes.
TRAINER_LOCK := trainer-image/requirements.lock
trainer-lock: venv
	echo "hatchling==1.33.0" | $(VENV)/bin/uv pip compile trainer-image/pyproject.toml - \
	    --override <(echo "finetune-contract @ ./contract") --no-emit-package finetune-contract \
	    --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	    --custom-compile-command "make trainer-lock" --output-file $(TRAINER_LOCK)

# What can be checked of the image without Docker: hadolint, and a venv built as the Dockerfile builds it (the
# locked wheels by hash, then the contract and the trainer without build isolation) whose entrypoint runs.
# Downloads the CUDA wheels (about 4 GB) into a temporary directory.
trainer-image-check: venv
	$(VENV)/bin/hadolint trainer-image/Dockerfile
	set -e; scratch=$$(mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	$(PYTHON) -m venv "$$scratch/venv"; \
	PIP_NO_CACHE_DIR=1 "$$scratch/venv/bin/pip" install --quiet --require-hashes --no-deps -r $(TRAINER_LOCK); \
	"$$scratch/venv/bin/pip" install --quiet --no-deps --no-build-isolation ./contract ./trainer-image; \
	"$$scratch/venv/bin/pip" check; \
	"$$scratch/venv/bin/finetune-trainer" --help

BENCH_ARGS ?=
bench-operator: cluster-binaries
	$(PY) tests/cluster/bench_operator.py $(BENCH_ARGS)

CHAOS_ARGS ?=
chaos: cluster-binaries
	$(PY) tests/cluster/chaos.py $(CHAOS_ARGS)
