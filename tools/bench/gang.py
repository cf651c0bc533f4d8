"""Benchmark: Cohort's data-parallel gangs against PyTorch DDP with gloo, on this one host.

- WGAN-GP: a 2-replica Cohort gang (`coordinator serve` and 2 workers with their default
  `--threads auto`; widths 128/64/32/16, global batch 32, 5 critic steps, gradient penalty 10)
  against 2 DDP processes (tools/reference/ddp_gang.py: the same widths, global batch, critic
  steps, the penalty through autograd.grad(create_graph=True)), in critic samples/s.
- DAE `final`: the autoencoder's final training as a 2-replica gang (global batch 256) against
  DDP on the same model and batch, in training samples/s.

Each DDP process takes cores / 2 threads, as each Cohort worker does by default on a host it
shares with one other. DDP's figure is its timed steps after a warm-up; Cohort's is given two
ways: its training steps alone (the workers' step timer, scraped from their /metrics: like for
like with DDP), and its median epoch after the first (from the trial's reported epoch seconds,
so it includes what an epoch adds to its steps: the epoch's metric all-reduce, and for `final`
its test pass). Both processes' CPU per sample is reported too. The runs alternate, round by
round. `--before DIR` runs another build's binaries alongside (before/after). Target: ≥ 1.2x DDP.

Run: make bench-gang   (or .venv/bin/python tools/bench/gang.py [--rounds N] [--before DIR] [--only wgan|dae])
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


def run_ddp(model, args, figures=None):
    """2 DDP ranks on loopback; returns rank 0's global samples/s and the load average. `figures`,
    given, receives `cpu_seconds_per_sample`: both ranks' CPU over the timed steps."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // 2)
    batch, steps = (32, args.ddp_wgan_steps) if model == "wgan" else (256, args.ddp_dae_steps)
    load = os.getloadavg()[0]
    common = ["--world", "2", "--port", str(port), "--model", model, "--batch", str(batch), "--threads", str(threads), "--steps", str(steps)]
    other = subprocess.Popen([sys.executable, DDP, "--rank", "1", *common], stdout=subprocess.PIPE, text=True)
    try:
        leader = subprocess.run([sys.executable, DDP, "--rank", "0", *common], capture_output=True, text=True, check=True, timeout=args.timeout)
    finally:
        other_out, _ = other.communicate(timeout=60)
    ranks = [json.loads(out.strip().splitlines()[-1]) for out in (leader.stdout, other_out)]
    if figures is not None:
        figures["cpu_seconds_per_sample"] = sum(rank["cpu_seconds"] for rank in ranks) / ranks[0]["samples"]
    return ranks[0]["samples_per_second"], load


def main(work_dir):
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gang-epochs", type=int, default=40)
    parser.add_argument("--final-epochs", type=int, default=6)
    parser.add_argument("--ddp-wgan-steps", type=int, default=100)
    parser.add_argument("--ddp-dae-steps", type=int, default=60)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--before", help="a folder holding another build's `coordinator` and `worker`, run alongside as 'before'")
    parser.add_argument("--only", choices=["wgan", "dae"], help="one gang only")
    parser.add_argument("--no-write", action="store_true", help="print the section instead of rewriting docs/performance.md")
    args = parser.parse_args()
    # shared_host.run_cluster reads these too.
    args.cv_epochs = 1
    builds = [("cohort", None)]
    if args.before:
        builds.append(("before", (os.path.join(args.before, "coordinator"), os.path.join(args.before, "worker"))))
    models = [m for m in ("wgan", "dae") if args.only in (None, m)]
    figures, loads, steps, cpus = {}, {}, {}, {}

    def record(key, value, load, step=None, cpu=None):
        figures.setdefault(key, []).append(value)
        loads.setdefault(key, []).append(load)
        if step is not None:
            steps.setdefault(key, []).append(step)
        if cpu is not None:
            cpus.setdefault(key, []).append(cpu)
        extra = "" if step is None else f", steps alone {step:.1f} samples/s"
        extra += "" if cpu is None else f", {cpu * 1000:.2f} CPU ms/sample"
        print(f"{key}: {value:.1f} samples/s{extra} (load {load:.2f})", file=sys.stderr, flush=True)

    def cohort(build, binaries, model):
        def run():
            measured = {}
            rates, load = run_cluster(None, "gang" if model == "wgan" else "final", args, work_dir, binaries=binaries, steps=measured)[:2]
            record(f"{build}-{model}", statistics.median(rates), load, measured["samples_per_second"], measured["cpu_seconds_per_sample"])
        return run

    def ddp(model):
        def run():
            measured = {}
            value, load = run_ddp(model, args, measured)
            record(f"ddp-{model}", value, load, value, measured["cpu_seconds_per_sample"])
        return run

    for round_index in range(args.rounds):
        for model in models:
            runs = [cohort(build, binaries, model) for build, binaries in builds] + [ddp(model)]
            for run in runs if round_index % 2 == 0 else list(reversed(runs)):
                run()
    med = {key: statistics.median(values) for key, values in figures.items()}
    step_med = {key: statistics.median(values) for key, values in steps.items()}
    cpu_med = {key: statistics.median(values) for key, values in cpus.items()}

    def runs(key):
        return ", ".join(f"{v:,.1f} ({l:.1f})" for v, l in zip(figures[key], loads[key]))

    names = {"wgan": "WGAN-GP, widths 128/64/32/16, global batch 32, 5 critic steps (critic samples/s)",
             "dae": "DAE `final`, global batch 256 (training samples/s)"}
    lines = [
        f"Measured by `make bench-gang` (`tools/bench/gang.py`) on {machine()}: 2 ranks on this one host, Cohort as `coordinator "
        f"serve` and 2 `worker` processes with default threads (`auto`: 1 each here), DDP as 2 processes of "
        f"`tools/reference/ddp_gang.py` (gloo on loopback, {max(1, (os.cpu_count() or 1) // 2)} thread(s) each); alternated over "
        f"{args.rounds} rounds, medians. Cohort, whole epochs: the median epoch after the first ({args.gang_epochs} WGAN-GP epochs, "
        f"{args.final_epochs} `final` epochs, each a fresh cluster), everything an epoch does included; Cohort, steps: the worker's "
        f"own step timer (`cohort_worker_step_seconds`) over the epochs after the first, which is what DDP's figure times "
        f"({args.ddp_wgan_steps} WGAN-GP / {args.ddp_dae_steps} DAE steps after 5 warm-up steps). CPU: both processes' CPU "
        f"milliseconds per sample (Cohort over its whole epochs after the first, DDP over its timed steps), which moves far less "
        f"with other work on the machine than wall time. Load average (1 min) at each run's start in brackets.",
        "",
        "| gang | build | Cohort steps (samples/s) | DDP gloo (samples/s) | ratio, steps | Cohort whole epochs (samples/s) | ratio, epochs | "
        "CPU ms/sample, Cohort / DDP | Cohort runs, epochs (load) | DDP runs |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for model in models:
        ddp_key = f"ddp-{model}"
        for build, _ in builds:
            key = f"{build}-{model}"
            step_ratio, epoch_ratio = step_med[key] / med[ddp_key], med[key] / med[ddp_key]
            label = "this checkout" if build == "cohort" else "before"
            lines.append(
                f"| {names[model]} | {label} | {step_med[key]:,.1f} | {med[ddp_key]:,.1f} | {step_ratio:.2f}x | {med[key]:,.1f} | "
                f"{epoch_ratio:.2f}x | {cpu_med[key] * 1000:.2f} / {cpu_med[ddp_key] * 1000:.2f} | {runs(key)} | {runs(ddp_key)} |")
            if build == "cohort":
                verdicts.append(f"{'WGAN-GP' if model == 'wgan' else 'DAE `final`'} {'met' if step_ratio >= 1.2 else 'missed'} "
                                f"({step_ratio:.2f}x by steps, {epoch_ratio:.2f}x by whole epochs)")
    lines += ["", f"Target (≥ 1.2x DDP, like for like: steps against steps): {'; '.join(verdicts)}."]
    if args.no_write:
        print("\n".join(lines))
    else:
        write_section("gang", lines)
    print(json.dumps({"epochs": figures, "steps": steps, "cpu": cpus}))


if __name__ == "__main__":
    with tempfile.TemporaryDirectory(prefix="cohort-bench-gang-") as scratch:
        main(scratch)
