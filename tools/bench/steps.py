"""Benchmark: training-step throughput of Cohort's worker code path (worker/examples/bench_step.rs)
against the same models and steps in PyTorch eager (tools/reference/bench_step.py), on the CPU
with the same thread count, alternating the two for several rounds in one invocation and
reporting the median of each and their ratio. Writes the section between the markers in
docs/performance.md.

Run: make bench   (or .venv/bin/python tools/bench/steps.py [--rounds N] [--threads N])
"""

import argparse
import os
import statistics
import sys

from perfdoc import ROOT, machine, release_binary, run_json, write_section

LABELS = {
    "dae_b256": "DAE, batch 256",
    "classifier_b256": "classifier, batch 256",
    "wgan_reduced_b64": "WGAN-GP step, widths 128/64/32/16, batch 64",
    "wgan_full_b16": "WGAN-GP step, seed widths 1024/512/256/128, batch 16",
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cohort_cmd = [release_binary("examples", "bench_step"), "--threads", str(args.threads)]
    torch_cmd = [sys.executable, os.path.join(ROOT, "tools", "reference", "bench_step.py"), "--threads", str(args.threads)]
    cohort, torch = [], []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        cohort.append(run_json(cohort_cmd))
        torch.append(run_json(torch_cmd))
    lines = [
        f"Measured by `make bench` (`tools/bench/steps.py`) on {machine()}, {args.threads} libtorch threads: "
        f"the median of {args.rounds} alternating rounds of each.",
        "",
        "| step | Cohort (samples/s) | PyTorch eager (samples/s) | ratio |",
        "|---|---|---|---|",
    ]
    for key, label in LABELS.items():
        ours = statistics.median(r[key] for r in cohort)
        theirs = statistics.median(r[key] for r in torch)
        lines.append(f"| {label} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.2f}x |")
    write_section("steps", lines)


if __name__ == "__main__":
    main()
