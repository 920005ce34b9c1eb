# Quick start:  make run   (the whole pipeline, locally)   ·   make test   (lint, types, tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STORAGE ?= storage
# Container images (make images REGISTRY=registry.example.com/ml TAG=0.1.0)
REGISTRY ?= mnist-pipeline
TAG      ?= 0.1.0
DOCKER   ?= docker
# checkov (~290 MB) lives in its own environment: its pins clash with the project's.
CHECKOV_VENV    ?= .venv-checkov
CHECKOV_VERSION := 3.3.30

.PHONY: run test lint bench images push-images clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 resolves to the CPU build; an unpinned torch would pull CUDA.
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/mnist-pipeline run --storage $(STORAGE)

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests $(wildcard benchmarks)
	$(BIN)/ruff format --check src tests $(wildcard benchmarks)
	$(BIN)/mypy

$(CHECKOV_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet checkov==$(CHECKOV_VERSION)

test: lint $(CHECKOV_VENV)/bin/checkov
	$(BIN)/pytest

images:
	$(DOCKER) build -f docker/pipeline.Dockerfile -t $(REGISTRY)/pipeline:$(TAG) .
	$(DOCKER) build -f docker/client.Dockerfile -t $(REGISTRY)/client:$(TAG) .

push-images: images
	$(DOCKER) push $(REGISTRY)/pipeline:$(TAG)
	$(DOCKER) push $(REGISTRY)/client:$(TAG)

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(STORAGE) .pytest_cache .mypy_cache .ruff_cache
