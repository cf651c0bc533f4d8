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

.PHONY: all build browser-deps lint test demo bench bench-examples bench-steps bench-allreduce bench-scheduler bench-transfer bench-sweep bench-shared-host bench-gang bench-seed bench-prune bench-command soak soak-hog gpu-check stand-in clean-runs

all: build

$(TORCH_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet torch==$(TORCH_VERSION)
	touch $@

# The wheel ships NCCL as libnccl.so.2; cudarc's dynamic loader looks for libnccl.so. The worker's
# rpath includes this folder, so the link makes the wheel's NCCL loadable (GPU workers only use it).
NCCL_LINK := $(VENV)/.nccl-link
$(NCCL_LINK): $(TORCH_STAMP)
	cd "$$($(VENV)/bin/python -c 'import importlib.util, os; print(os.path.join(importlib.util.find_spec("torch").submodule_search_locations[0], "..", "nvidia", "nccl", "lib"))')" && ln -sf libnccl.so.2 libnccl.so
	touch $@

# Test tools: Kubernetes OpenAPI schemas for checking deploy/, TensorBoard to read event files back.
DEV_TOOLS := $(VENV)/.dev-tools-2
$(DEV_TOOLS): $(TORCH_STAMP)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet kubernetes-validate==1.37.0 tensorboard==2.21.0
	touch $@

build: $(TORCH_STAMP) $(NCCL_LINK)
	$(CARGO) build --release --locked --workspace --bins

# The console's browser test (tests/tests/console.rs) drives Debian's chromium through chromedriver;
# installed when missing (CI runs as root).
browser-deps:
	command -v chromedriver >/dev/null || { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver; }

# The house style (docs/architecture.md): rustfmt.toml, and clippy with every warning an error.
lint: build
	$(CARGO) fmt --all --check
	$(CARGO) clippy --release --locked --workspace --all-targets -- -D warnings

# Cluster tests start several processes each: one test at a time keeps 2-core machines responsive.
test: build $(DEV_TOOLS) browser-deps lint
	RUST_TEST_THREADS=1 $(CARGO) test --release --locked --workspace
	$(VENV)/bin/python deploy/tests/check_manifests.py

demo: build
	$(BIN)/coordinator local examples/demo.toml --workers 2 --report report/demo

# The performance suite (docs/performance.md): each part measures Cohort next to its anchor in one
# run and rewrites its own section of the document. One part alone: make bench-steps (etc.).
bench: bench-steps bench-allreduce bench-scheduler bench-transfer bench-sweep bench-shared-host bench-gang bench-prune

bench-examples: build
	$(CARGO) build --release --locked -p cohort-worker --example bench_step --example bench_allreduce
	$(CARGO) build --release --locked -p cohort-coordinator --example bench_scheduler --example bench_transfer

bench-steps bench-allreduce bench-scheduler bench-transfer bench-sweep: bench-examples
	$(VENV)/bin/python tools/bench/$(@:bench-%=%).py

# Two workers on this one host, default threads (`auto`) against explicit splits: a 2-replica
# WGAN-GP gang and 2 cv trials side by side (docs/performance.md).
bench-shared-host: build
	$(VENV)/bin/python tools/bench/shared_host.py

# Cohort's 2-replica WGAN-GP gang and the autoencoder's `final` gang against PyTorch DDP (gloo) on
# this host, alternated (docs/performance.md).
bench-gang: build
	$(VENV)/bin/python tools/bench/gang.py

# Early stopping (`[cv.prune]`): the seed's grid in full and pruned by racing, asha and both, on 2
# workers, one run after another (docs/performance.md). Reads ../shared's MNIST when present.
bench-prune: build
	$(VENV)/bin/python tools/bench/prune.py

# Command trials (docs/commands.md): per-trial overhead against the same script by hand, and a
# 2-replica command gang against torchrun --nproc-per-node 2 (docs/performance.md).
bench-command: build
	$(VENV)/bin/python tools/bench/command.py

# The seed's recipe in Cohort next to PyTorch on ../shared's MNIST and Fashion-MNIST: docs/results.md.
bench-seed: build
	$(VENV)/bin/python tools/bench/seed_recipe.py

# 320 short trials on 4 workers under a chaos loop (docs/reliability.md); soak-hog runs the same
# beside a busy loop on every core (bounded by the soak's own time limit).
soak: build
	$(CARGO) test --release --locked -p cohort-cluster-tests --test soak -- --ignored --nocapture

soak-hog: build
	COHORT_SOAK_HOG=1 $(CARGO) test --release --locked -p cohort-cluster-tests --test soak -- --ignored --nocapture

# The NCCL and CUDA check, for a machine with a GPU.
gpu-check:
	bash tools/gpu-check.sh

# Stand-in class folders for examples/seed-cgan.toml: MRI slices grouped by brain level, and MNIST
# digits as PNGs (tools/data/stand_in_classes.py; numpy and Pillow come with the dev tools).
stand-in: $(DEV_TOOLS)
	$(VENV)/bin/python tools/data/stand_in_classes.py mri data/stand-in/mri-levels
	$(VENV)/bin/python tools/data/stand_in_classes.py mnist data/stand-in/digits --per-class 400

clean-runs:
	rm -rf runs report
