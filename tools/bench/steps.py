"""Benchmark: training-step throughput of Cohort's worker code path (worker/examples/bench_step.rs)
against the same models and steps in PyTorch eager (tools/reference/bench_step.py), on the CPU
with the same thread count, alternating the two for several rounds in one invocation and
reporting the median of each and their ratio. Writes the section between the markers in
docs/performance.md.

Run: make bench   (or .venv/bin/python tools/bench/steps.py [--rounds N] [--threads N])
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", ".."))
BEGIN, END = "<!-- steps:begin -->", "<!-- steps:end -->"
LABELS = {
    "dae_b256": "DAE, batch 256",
    "classifier_b256": "classifier, batch 256",
    "wgan_reduced_b64": "WGAN-GP step, widths 128/64/32/16, batch 64",
    "wgan_full_b16": "WGAN-GP step, seed widths 1024/512/256/128, batch 16",
}


def run(command):
    output = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(output.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    cohort_cmd = [os.path.join(ROOT, "target", "release", "examples", "bench_step"), "--threads", str(args.threads)]
    torch_cmd = [sys.executable, os.path.join(ROOT, "tools", "reference", "bench_step.py"), "--threads", str(args.threads)]
    cohort, torch = [], []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        cohort.append(run(cohort_cmd))
        torch.append(run(torch_cmd))
    lines = [
        BEGIN,
        "",
        f"Measured by `make bench` (`tools/bench/steps.py`) on {platform.machine()}, {os.cpu_count()} cores, "
        f"{args.threads} libtorch threads, {time.strftime('%Y-%m-%d')}: the median of {args.rounds} alternating rounds of each.",
        "",
        "| step | Cohort (samples/s) | PyTorch eager (samples/s) | ratio |",
        "|---|---|---|---|",
    ]
    for key, label in LABELS.items():
        ours = statistics.median(r[key] for r in cohort)
        theirs = statistics.median(r[key] for r in torch)
        lines.append(f"| {label} | {ours:,.1f} | {theirs:,.1f} | {ours / theirs:.2f}x |")
    lines += ["", END]
    section = "\n".join(lines)
    path = os.path.join(ROOT, "docs", "performance.md")
    text = open(path).read() if os.path.exists(path) else "# Performance\n\n" + BEGIN + "\n" + END + "\n"
    before, _, rest = text.partition(BEGIN)
    _, _, after = rest.partition(END)
    with open(path, "w") as out:
        out.write(before + section + after)
    print(section)


if __name__ == "__main__":
    main()
