# Targets document themselves: `make help`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help deps build-dev proto test test-rust test-py fuzz bench soak serve lint gpu-check

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

deps: ## Install the package (builds the Rust extension) with test tools and the pyspacer oracle
	bash scripts/install-system-deps.sh --test
	$(PIP) install -q -e '.[test,ray]'
	# pyspacer pins old torch/scikit-learn; its runtime needs are ours, so skip its pins.
	$(PIP) install -q --no-deps 'pyspacer==0.14.0'

build-dev: ## Rebuild the Rust extension in place after editing crop_rs/
	$(PIP) install -q --no-build-isolation --no-deps -e .

proto: ## Regenerate the committed gRPC stubs from proto/
	$(PYTHON) scripts/gen_proto.py

test: deps lint test-rust fuzz test-py ## Install everything, then type-check, run the Rust tests, a 60 s decoder fuzz and pytest

test-rust: ## Rust unit and property tests of crop_rs
	cargo test --no-default-features -p crop_rs

test-py: ## pytest (GPU tests skip without CUDA)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

fuzz: ## Bounded fuzz run of the image decoder
	bash scripts/fuzz.sh

lint: ## Type-check spacer_core and server (mypy)
	$(PYTHON) -m mypy spacer_core server

bench: ## Side-by-side benchmarks against pyspacer (slow; see docs/benchmarks.md)
	$(PYTHON) benchmarks/bench_crop.py
	$(PYTHON) benchmarks/bench_training.py
	$(PYTHON) benchmarks/bench_extract.py
	$(PYTHON) benchmarks/bench_network.py --fast
	$(PYTHON) benchmarks/eval_precision.py
	$(PYTHON) benchmarks/bench_server.py

SOAK_SECONDS ?= 600
soak: ## 8 concurrent ClassifyImages streams against `spacer serve` for SOAK_SECONDS (default 600): nothing lost, RSS flat, p50/p99
	$(PYTHON) benchmarks/soak.py --seconds $(SOAK_SECONDS)

gpu-check: ## On a CUDA machine: GPU tests and a ClassifyImages benchmark (exact and fast)
	bash scripts/gpu-check.sh

serve: ## Install (system build tools too, when missing) and start the server on 127.0.0.1:50051
	bash scripts/install-system-deps.sh
	$(PIP) install -q .
	spacer serve
