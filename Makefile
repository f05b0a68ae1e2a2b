# imagefleet developer entry points. `make run` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The repository root holds a folder named `operator`, like a standard-library module: keep the
# current directory off sys.path for every Python started from here (see operator/__init__.py).
export PYTHONSAFEPATH := 1
TORCH_VERSION ?= 2.11.0
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint check bench images e2e clean
.DEFAULT_GOAL := run

$(VENV)/.installed: pyproject.toml tools/install-torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	TORCH_VERSION=$(TORCH_VERSION) bash tools/install-torch.sh $(PY)
	$(PIP) install -q -e '.[pod,dev]'
	touch $@

install: $(VENV)/.installed ## create .venv with imagefleet and its dev tools

run: install ## local mode: router + one CPU pod serving the built-in `tiny` model
	$(VENV)/bin/imagefleet serve --model tiny

test: install k8s-tools ## every CPU test, the real control-plane tests included
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install ## unit and component tests only
	$(VENV)/bin/pytest -m "not cluster" $(PYTEST_ARGS)

e2e: install k8s-tools ## the tests on the real control plane only (operator, chart, process kubelet)
	$(VENV)/bin/pytest -m cluster $(PYTEST_ARGS)

lint: install ## ruff, mypy --strict and the import contracts (.importlinter)
	$(VENV)/bin/ruff check imagefleet inference_pod router operator tests bench
	$(VENV)/bin/ruff format --check imagefleet inference_pod router operator tests bench
	bash tools/typecheck.sh $(VENV)/bin/mypy
	bash tools/lint-imports.sh $(VENV)/bin/lint-imports

check: lint test ## what CI runs (.ci/run): lint, then every test

bench: install ## CPU benchmarks (GPU ones: see docs/benchmarks.md)
	PYTHONPATH=. $(PY) -m bench.router_overhead

IMAGE_REPO ?= ghcr.io/imagefleet
IMAGE_TAG ?= 0.1.0

images: ## the inference-pod and the operator+router images (needs a Docker engine)
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make images: no Docker engine here"; exit 1; }
	docker build --target pod -t $(IMAGE_REPO)/imagefleet:$(IMAGE_TAG) .
	docker build --target control -t $(IMAGE_REPO)/imagefleet-control:$(IMAGE_TAG) .

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache

-include tools/k8s/k8s.mk
