# Cohort's entry points. `make demo` and `make test` do all set-up on a fresh machine:
# a .venv with PyPI's torch wheel (libtorch for tch), then a release build.

PYTHON ?= python3
TORCH_VERSION := 2.13.0
VENV := $(CURDIR)/.venv
# Written once torch is installed, so repeated runs install nothing.
TORCH_STAMP := $(VENV)/.torch-$(TORCH_VERSION)

# tch's build script finds libtorch inside the venv's torch package through `python`.
export LIBTORCH_USE_PYTORCH := 1
export PATH := $(VENV)/bin:$(PATH)

CARGO ?= cargo
BIN := target/release

.PHONY: all build test demo bench-seed clean-runs

all: build

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet torch==$(TORCH_VERSION)
	touch $@

build: $(TORCH_STAMP)
	$(CARGO) build --release --locked --workspace --bins

test: build
	$(CARGO) test --release --locked --workspace

demo: build
	$(BIN)/coordinator local examples/demo.toml --workers 2

# The seed's recipe in Cohort next to PyTorch on ../shared's MNIST and Fashion-MNIST: docs/results.md.
bench-seed: build
	$(VENV)/bin/python tools/bench/seed_recipe.py

clean-runs:
	rm -rf runs report
