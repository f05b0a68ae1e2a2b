# imagefleet developer entry points. `make run` and `make test` are all a fresh machine needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The repository root holds a folder named `operator`, like a standard-library module: keep the
# current directory off sys.path for every Python started from here (see operator/__init__.py).
export PYTHONSAFEPATH := 1
# Where a CPU build of torch may already lie as a wheel (pip's find-links on this kind of machine).
TORCH_WHEEL_DIR ?= /opt/wheels
TORCH_VERSION ?= 2.11.0
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint bench images e2e clean
.DEFAULT_GOAL := run

$(VENV)/.installed: pyproject.toml tools/install-torch.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	TORCH_WHEEL_DIR=$(TORCH_WHEEL_DIR) TORCH_VERSION=$(TORCH_VERSION) bash tools/install-torch.sh $(PY)
	$(PIP) install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed ## create .venv with imagefleet and its dev tools

run: install ## local mode: router + one CPU pod serving the built-in `tiny` model
	$(VENV)/bin/imagefleet serve --model tiny

test: install k8s-tools ## every CPU test, the real control-plane tests included
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: install ## unit and component tests only
	$(VENV)/bin/pytest -m "not cluster" $(PYTEST_ARGS)

lint: install ## ruff and mypy --strict
	$(VENV)/bin/ruff check imagefleet inference_pod router operator tests bench
	$(VENV)/bin/ruff format --check imagefleet inference_pod router operator tests bench
	bash tools/typecheck.sh $(VENV)/bin/mypy

bench: install ## CPU benchmarks (GPU ones: see docs/benchmarks.md)
	PYTHONPATH=. $(PY) -m bench.router_overhead

images: ## container image of the inference pod (needs a Docker engine)
	docker build -t imagefleet:dev .

clean:
	rm -rf $(VENV) build .mypy_cache .ruff_cache .pytest_cache

-include tools/k8s/k8s.mk
