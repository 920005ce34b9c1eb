# Quick start:  make run   (the whole pipeline, locally)   ·   make test   (lint, types, tests)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STORAGE ?= storage
# Container images: mnist-pipeline/<image>:$(TAG), under $(REGISTRY)/ when set (make images
# REGISTRY=registry.example.com/ml TAG=0.2.0); the chart's images.registry takes the same value.
REGISTRY ?=
IMAGE_PREFIX := $(if $(REGISTRY),$(REGISTRY:%/=%)/)mnist-pipeline
TAG      ?= 0.2.0
DOCKER   ?= docker
IMAGES   := pipeline client triton
# Extra `docker build` options for every image, e.g. --build-arg PYTHON_IMAGE=... (each
# Dockerfile's ARGs say what they change; an argument an image does not declare is ignored).
BUILD_ARGS ?=
# checkov (~290 MB) lives in its own environment: its pins clash with the project's.
CHECKOV_VENV    ?= .venv-checkov
CHECKOV_VERSION := 3.3.30

# perf_analyzer (make bench) lives in its own environment: tritonclient 2.51 ships it.
PERF_VENV ?= .venv-perf
# The tests' MLflow tracking server (tests/tracking) lives in its own environment: MLflow 3
# needs protobuf 7 and numpy 2, the pipeline's packages older majors. The pipeline itself
# speaks MLflow's REST API and needs none of it.
MLFLOW_VENV    ?= .venv-mlflow
MLFLOW_VERSION := 3.17.2
# What make test needs from Debian: libb64-0d (perf_analyzer loads libb64.so.0d),
# prometheus (with promtool: the tests start their own on free ports) and Ceph's radosgw
# with one monitor and one OSD (a real S3 server, started fresh per test session). test-deps
# installs the missing ones as root or with passwordless sudo, else stops with the command.
TEST_DEBS ?= libb64-0d prometheus radosgw ceph-mon ceph-osd ceph-common dnsmasq
# The container checks' engine and base-image tool: installed the same way where it can be;
# without root they cannot run anyway, and test-deps says so instead of stopping.
CONTAINER_DEBS ?= docker.io mmdebstrap

.PHONY: run test test-deps lint bench bench-distributed images push-images container-check clean $(addprefix image-,$(IMAGES))

$(BIN)/.installed: pyproject.toml
	@echo "Installing mnist-pipeline into $(VENV) (torch CPU, onnxruntime, tritonserver: 1-3 minutes, about 2 GB)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch==2.13.0 resolves to the CPU build; an unpinned torch would pull CUDA.
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/.installed
	$(BIN)/mnist-pipeline run --storage $(STORAGE)

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests benchmarks scripts
	$(BIN)/ruff format --check src tests benchmarks scripts
	$(BIN)/mypy

# The benchmarks import the test harness (tests/harness: local servers, free ports) as the
# tests do; pytest finds it through pyproject.toml's pythonpath.
HARNESS := PYTHONPATH=$(abspath tests)

# The benchmark suite (several minutes): docs/BENCHMARKS.md, docs/benchmarks/*.png and
# results.json. BENCH_ARGS=--quick for a smoke run into a temporary folder.
BENCH_ARGS ?= --out docs
bench: $(BIN)/.installed $(PERF_VENV)/bin/perf_analyzer
	$(HARNESS) PERF_ANALYZER=$(abspath $(PERF_VENV))/bin/perf_analyzer \
	    $(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# Needs libb64.so.0d at load (TEST_DEBS); libcudart comes from the wheel below.
$(PERF_VENV)/bin/perf_analyzer:
	@echo "Installing perf_analyzer into $(PERF_VENV) (tritonclient 2.51: a minute or two)"
	$(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install --quiet --upgrade pip
	$(PERF_VENV)/bin/pip install --quiet 'tritonclient[all]==2.51.0' nvidia-cuda-runtime-cu12==12.9.79

# 1 process x 2 threads against 2 DDP ranks x 1 thread, and the multi-node scaling model; the
# link sweep and the compression accuracies are its --links-only and --compression-accuracy
# (docs/DISTRIBUTED.md): writes docs/benchmarks/distributed.json.
bench-distributed: $(BIN)/.installed
	$(HARNESS) $(BIN)/python benchmarks/bench_distributed.py

$(CHECKOV_VENV)/bin/checkov:
	@echo "Installing checkov into $(CHECKOV_VENV) (290 MB: a minute or two)"
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet --upgrade pip
	$(CHECKOV_VENV)/bin/pip install --quiet checkov==$(CHECKOV_VERSION)

$(MLFLOW_VENV)/bin/mlflow:
	@echo "Installing MLflow into $(MLFLOW_VENV) (the tests' tracking server: a minute or two)"
	$(PYTHON) -m venv $(MLFLOW_VENV)
	$(MLFLOW_VENV)/bin/pip install --quiet --upgrade pip
	$(MLFLOW_VENV)/bin/pip install --quiet mlflow==$(MLFLOW_VERSION)

test-deps:
	@scripts/install_debs.sh $(TEST_DEBS)
	@scripts/install_debs.sh --optional "the container checks will not run" $(CONTAINER_DEBS)

# The environments install side by side (pip mostly waits on downloads and disk), lint and
# types checked once the project's own is in; then the tests.
TEST_TOOLS := lint $(CHECKOV_VENV)/bin/checkov $(PERF_VENV)/bin/perf_analyzer $(MLFLOW_VENV)/bin/mlflow

test: test-deps
	$(MAKE) --jobs=4 --output-sync=target $(TEST_TOOLS)
	PERF_ANALYZER=$(abspath $(PERF_VENV))/bin/perf_analyzer MLFLOW=$(abspath $(MLFLOW_VENV))/bin/mlflow \
	    $(BIN)/pytest

images: $(addprefix image-,$(IMAGES))

$(addprefix image-,$(IMAGES)): image-%:
	$(DOCKER) build $(BUILD_ARGS) -f docker/$*.Dockerfile -t $(IMAGE_PREFIX)/$*:$(TAG) .

push-images: images
	for image in $(IMAGES); do $(DOCKER) push $(IMAGE_PREFIX)/$$image:$(TAG) || exit 1; done

# The images built and run in a real container engine, and the chart's rehearsal in them
# (tests/rehearsal/test_containers.py, the [container] cases of tests/rehearsal/test_rehearsal.py): as root;
# installs CONTAINER_DEBS when missing. CI runs them within `make test` (CI=true).
container-check: test-deps $(BIN)/.installed
	$(BIN)/pytest -k container tests/rehearsal/test_containers.py tests/rehearsal/test_rehearsal.py

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) $(PERF_VENV) $(MLFLOW_VENV) $(STORAGE) .pytest_cache .mypy_cache .ruff_cache
