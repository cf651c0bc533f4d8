"""Benchmark: Cohort's data-parallel gangs against PyTorch DDP with gloo, on this one host.

- WGAN-GP: a 2-replica Cohort gang (`coordinator serve` and 2 workers with their default
  `--threads auto`; widths 128/64/32/16, global batch 32, 5 critic steps, gradient penalty 10)
  against 2 DDP processes (tools/reference/ddp_gang.py: the same widths, global batch, critic
  steps, the penalty through autograd.grad(create_graph=True)), in critic samples/s.
- DAE `final`: the autoencoder's final training as a 2-replica gang (global batch 256) against
  DDP on the same model and batch, in training samples/s.

Each DDP process takes cores / 2 threads, as each Cohort worker does by default on a host it
shares with one other. Cohort's figure is its median epoch after the first (from the trial's
reported epoch seconds, so it includes what an epoch adds to its steps: the epoch's metric
all-reduce, and for `final` its test pass); DDP's is its timed steps after a warm-up. The two
alternate, round by round. Target: ≥ 1.2x DDP.

Run: make bench-gang   (or .venv/bin/python tools/bench/gang.py [--rounds N])
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from perfdoc import ROOT, machine, write_section
from shared_host import run_cluster
from sweep import free_port

DDP = os.path.join(ROOT, "tools", "reference", "ddp_gang.py")


def run_ddp(model, args):
    """2 DDP ranks on loopback; returns rank 0's global samples/s and the load average."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // 2)
    batch, steps = (32, args.ddp_wgan_steps) if model == "wgan" else (256, args.ddp_dae_steps)
    load = os.getloadavg()[0]
    common = ["--world", "2", "--port", str(port), "--model", model, "--batch", str(batch), "--threads", str(threads), "--steps", str(steps)]
    other = subprocess.Popen([sys.executable, DDP, "--rank", "1", *common], stdout=subprocess.DEVNULL)
    try:
        leader = subprocess.run([sys.executable, DDP, "--rank", "0", *common], capture_output=True, text=True, check=True, timeout=args.timeout)
    finally:
        other.wait(timeout=60)
    return json.loads(leader.stdout.strip().splitlines()[-1])["samples_per_second"], load


def main(work_dir):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gang-epochs", type=int, default=10)
    parser.add_argument("--final-epochs", type=int, default=4)
    parser.add_argument("--ddp-wgan-steps", type=int, default=40)
    parser.add_argument("--ddp-dae-steps", type=int, default=60)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of rewriting docs/performance.md")
    args = parser.parse_args()
    # shared_host.run_cluster reads these too.
    args.cv_epochs = 1
    figures = {key: [] for key in ("cohort-wgan", "ddp-wgan", "cohort-dae", "ddp-dae")}
    loads = {key: [] for key in figures}
    for round_index in range(args.rounds):
        runs = [("cohort-wgan", lambda: run_cluster(None, "gang", args, work_dir)[:2]), ("ddp-wgan", lambda: run_ddp("wgan", args)),
                ("cohort-dae", lambda: run_cluster(None, "final", args, work_dir)[:2]), ("ddp-dae", lambda: run_ddp("dae", args))]
        if round_index % 2:
            runs = [runs[1], runs[0], runs[3], runs[2]]
        for key, run in runs:
            value, load = run()
            value = statistics.median(value) if isinstance(value, list) else value
            figures[key].append(value)
            loads[key].append(load)
            print(f"round {round_index} {key}: {value:.1f} samples/s (load {load:.2f})", file=sys.stderr, flush=True)
    med = {key: statistics.median(values) for key, values in figures.items()}

    def runs(key):
        return ", ".join(f"{v:,.1f} ({l:.1f})" for v, l in zip(figures[key], loads[key]))

    wgan_ratio, dae_ratio = med["cohort-wgan"] / med["ddp-wgan"], med["cohort-dae"] / med["ddp-dae"]
    lines = [
        f"Measured by `make bench-gang` (`tools/bench/gang.py`) on {machine()}: 2 ranks on this one host, Cohort as `coordinator "
        f"serve` and 2 `worker` processes with default threads (`auto`: 1 each here), DDP as 2 processes of "
        f"`tools/reference/ddp_gang.py` (gloo on loopback, {max(1, (os.cpu_count() or 1) // 2)} thread(s) each); alternated over "
        f"{args.rounds} rounds, medians. Cohort: the median epoch after the first ({args.gang_epochs} WGAN-GP epochs, "
        f"{args.final_epochs} `final` epochs, each a fresh cluster); DDP: {args.ddp_wgan_steps} WGAN-GP / {args.ddp_dae_steps} DAE "
        f"steps after 5 warm-up steps. Load average (1 min) at each run's start in brackets.",
        "",
        "| gang | Cohort (samples/s) | DDP gloo (samples/s) | ratio | Cohort runs | DDP runs |",
        "|---|---|---|---|---|---|",
        f"| WGAN-GP, widths 128/64/32/16, global batch 32, 5 critic steps (critic samples/s) | {med['cohort-wgan']:,.1f} | "
        f"{med['ddp-wgan']:,.1f} | {wgan_ratio:.2f}x | {runs('cohort-wgan')} | {runs('ddp-wgan')} |",
        f"| DAE `final`, global batch 256 (training samples/s) | {med['cohort-dae']:,.1f} | {med['ddp-dae']:,.1f} | {dae_ratio:.2f}x | "
        f"{runs('cohort-dae')} | {runs('ddp-dae')} |",
        "",
        f"Target (≥ 1.2x DDP): WGAN-GP {'met' if wgan_ratio >= 1.2 else 'missed'} ({wgan_ratio:.2f}x); "
        f"DAE `final` {'met' if dae_ratio >= 1.2 else 'missed'} ({dae_ratio:.2f}x).",
    ]
    if args.no_write:
        print("\n".join(lines))
    else:
        write_section("gang", lines)
    print(json.dumps(figures))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="cohort-bench-gang-") as scratch:
        main(scratch)
