# Targets document themselves: `make help`.
PYTHON ?= python3
# A failing `scripts/lock.py requirements | pip ...` fails the recipe.
SHELL := bash
.SHELLFLAGS := -o pipefail -c
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=
# The Python packages mypy checks, and every folder ruff reads.
PY_PACKAGES := spacer_core server shell
PY_DIRS := $(PY_PACKAGES) tests benchmarks scripts
# Exact versions of every package the tests install (`make lock` rewrites it).
CONSTRAINTS := constraints.txt
# The tests' oracle. pyspacer pins old torch/scikit-learn; its runtime needs are ours, so skip its pins.
PYSPACER := pyspacer==0.14.0
# `make test-latest` keeps the newest versions pyproject's ranges allow here.
VENV_LATEST ?= .venv-latest
# pyproject's requirements (and the named extras) plus maturin, on stdin of pip's `-r /dev/stdin`.
REQUIREMENTS := $(PYTHON) scripts/lock.py requirements --build
PIP_PINNED := $(PIP) install -c $(CONSTRAINTS)
# What the long steps of `make serve` and `make deps` say before they start.
SAY_PACKAGES := Python packages at the versions in $(CONSTRAINTS) (first time: about 3 GB to download, torch and its CUDA libraries most of it)
SAY_RUST := building the Rust extension crop_rs (release build, ~2-3 min the first time) and installing spacer-server

.DEFAULT_GOAL := help
.PHONY: help deps build-dev proto test test-rust test-py fuzz bench soak serve lint gpu-check lock test-latest

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-11s %s\n", $$1, $$2}'

deps: ## Install the package (builds the Rust extension) with test tools, OpenVINO (fast precision) and the pyspacer oracle, at the versions in constraints.txt
	@echo "==> 1/3 system packages: cmake, nasm, a C compiler (build); chromium (report tests). apt-get, with sudo when not root, only if missing"
	bash scripts/install-system-deps.sh --test
	@echo "==> 2/3 $(SAY_PACKAGES)"
	$(REQUIREMENTS) test ray fast | $(PIP_PINNED) -r /dev/stdin
	$(PIP_PINNED) --no-deps '$(PYSPACER)'
	@echo "==> 3/3 $(SAY_RUST) in place (editable)"
	$(PIP) install -v --no-build-isolation --no-deps -e .

build-dev: ## Rebuild the Rust extension in place after editing crop_rs/
	$(PIP) install -q --no-build-isolation --no-deps -e .

proto: ## Regenerate the committed gRPC stubs from proto/
	$(PYTHON) scripts/gen_proto.py

test: deps lint test-rust fuzz test-py ## Install everything, then type-check, run the Rust tests, a 60 s decoder fuzz and pytest

lock: ## Rewrite constraints.txt: resolve pyproject's ranges in a throwaway fresh venv and freeze it (after changing dependencies)
	$(PYTHON) scripts/lock.py lock --no-deps '$(PYSPACER)'

test-latest: ## In .venv-latest: the newest versions the ranges allow (no constraints); print what moved from constraints.txt, then mypy and pytest
	test -x $(VENV_LATEST)/bin/python || $(PYTHON) -m venv $(VENV_LATEST)
	$(REQUIREMENTS) test ray fast | $(VENV_LATEST)/bin/python -m pip install --upgrade --upgrade-strategy eager -r /dev/stdin
	$(VENV_LATEST)/bin/python -m pip install --upgrade --no-deps '$(PYSPACER)'
	$(VENV_LATEST)/bin/python -m pip install --no-build-isolation --no-deps -e .
	$(VENV_LATEST)/bin/python scripts/lock.py moved
	$(MAKE) lint test-py PYTHON=$(VENV_LATEST)/bin/python

test-rust: ## Rust unit and property tests of crop_rs
	cargo test --no-default-features -p crop_rs

test-py: ## pytest (GPU tests skip without CUDA)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-fast: ## pytest without the tests marked slow (a few minutes; `make test` runs them all)
	$(PYTHON) -m pytest -m "not slow" $(PYTEST_ARGS)

fuzz: ## Bounded fuzz run of the image decoder
	bash scripts/fuzz.sh

lint: ## ruff (lint and format), mypy, cargo fmt and clippy with warnings as errors
	$(PYTHON) -m ruff check $(PY_DIRS)
	$(PYTHON) -m ruff format --check $(PY_DIRS)
	$(PYTHON) -m mypy $(PY_PACKAGES)
	cargo fmt --check -p crop_rs
	cargo clippy -p crop_rs --all-targets -- -D warnings
	cargo clippy -p crop_rs --all-targets --no-default-features -- -D warnings

format: ## Rewrite Python and Rust sources in the project's format
	$(PYTHON) -m ruff check --fix $(PY_DIRS)
	$(PYTHON) -m ruff format $(PY_DIRS)
	cargo fmt -p crop_rs

bench: ## Side-by-side benchmarks against pyspacer (slow; see docs/benchmarks.md)
	$(PYTHON) benchmarks/bench_crop.py
	$(PYTHON) benchmarks/bench_training.py
	$(PYTHON) benchmarks/bench_extract.py
	$(PYTHON) benchmarks/bench_network.py --fast --images 8 --sizes 2000x1500,3000x2000
	$(PYTHON) benchmarks/bench_network.py --fast
	$(PYTHON) benchmarks/eval_precision.py
	$(PYTHON) benchmarks/bench_server.py --size 3000x2000
	$(PYTHON) benchmarks/bench_server.py
	$(PYTHON) benchmarks/bench_memory.py

SOAK_SECONDS ?= 600
soak: ## 8 concurrent ClassifyImages streams against `spacer serve` for SOAK_SECONDS (default 600): nothing lost, RSS flat, p50/p99
	$(PYTHON) benchmarks/soak.py --seconds $(SOAK_SECONDS)

gpu-check: ## On a CUDA machine: GPU tests and a ClassifyImages benchmark (exact and fast)
	bash scripts/gpu-check.sh

serve: ## Install (system build tools too, when missing) at the versions in constraints.txt and start the server on 127.0.0.1:50051
	@echo "==> 1/4 system build tools: cmake, nasm, a C compiler. apt-get, with sudo when not root, only if missing"
	bash scripts/install-system-deps.sh
	@echo "==> 2/4 $(SAY_PACKAGES)"
	$(REQUIREMENTS) | $(PIP_PINNED) -r /dev/stdin
	@echo "==> 3/4 $(SAY_RUST)"
	$(PIP) install -v --no-build-isolation --no-deps .
	@echo "==> 4/4 starting the server (Ctrl-C stops it)"
	spacer serve
