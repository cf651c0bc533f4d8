#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU, builds Cohort (make build) and runs
# worker/examples/gpu_check.rs, which exercises the NCCL backend (1 rank, and 2 ranks on one
# GPU where NCCL allows it) and the WGAN-GP step on CUDA, printing PASS/FAIL with figures.
# Without a GPU it checks that NCCL loads from the torch wheel and says the rest was skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
make build
export PATH="$PWD/.venv/bin:$PATH" LIBTORCH_USE_PYTORCH=1
cargo run --release --locked -p cohort-worker --example gpu_check
