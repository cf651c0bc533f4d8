"""Benchmark: fold-aware early stopping (`[cv.prune]`, docs/sweep.md). Runs the seed's
cross-validation grid (lr 1e-3, 1e-4 x weight decay 1e-5, 1e-6 x batch size 128, 256 = 8 configs
x 4 folds, 20 epochs each) on a coordinator and 2 worker processes four times: the full grid, and
pruned by `racing`, `asha` and `both` (the defaults: min_folds 2, confidence 0.95, grace_epochs 2,
reduction 3). For each run it reports the trial-epochs trained, the wall time, the trials pruned,
the config chosen, and that config's mean over the full grid's run (with the gap to the best
full-grid mean), and writes the section between the markers in docs/performance.md.

Targets: `both` trains at most 40 % of the full grid's trial-epochs and chooses a config whose
full-grid mean is within 1 % of the best.

Data: ../shared/datasets/mnist-10k when present, else the committed data/mnist-sample (the same
8,000 training digits). The sweep is the seed's `[cv]` without augmentation, `final` or
`finetune` (they run as without pruning).

Run: make bench-prune   (or .venv/bin/python tools/bench/prune.py [--epochs N] [--runs full,both]);
a run with other settings than the defaults is printed but not written.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from perfdoc import ROOT, machine, release_binary, write_section
from sweep import free_port, tail, wait_until, write_token

RUNS = ["full", "racing", "asha", "both"]


def dataset_dir():
    shared = os.path.normpath(os.path.join(ROOT, "..", "shared", "datasets", "mnist-10k"))
    return shared if os.path.isdir(shared) else os.path.join(ROOT, "data", "mnist-sample")


def sweep_text(name, dataset, epochs, rule):
    prune = "" if rule == "full" else f'\n[cv.prune]\nrule = "{rule}"\n'
    return f"""name = "{name}"
seed = 0

[dataset]
format = "idx"
path = "{dataset}"

[noise]
std = 0.3

[model]
kind = "dae"
latent = 4

[cv]
folds = 4
epochs = {epochs}

[cv.grid]
lr = [1e-3, 1e-4]
weight_decay = [1e-5, 1e-6]
batch_size = [128, 256]
{prune}"""


def run_all(args, work_dir):
    coordinator_bin, worker_bin = release_binary("coordinator"), release_binary("worker")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client_token, worker_token = os.path.join(work_dir, "client.token"), os.path.join(work_dir, "worker.token")
    write_token(client_token)
    write_token(worker_token)
    env = dict(os.environ, COHORT_COORDINATOR=url, COHORT_TOKEN_FILE=client_token, RUST_LOG=os.environ.get("RUST_LOG", "info"))
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    processes, logs = [], {}

    def start(name, command):
        logs[name] = os.path.join(work_dir, f"{name}.log")
        log = open(logs[name], "w")
        processes.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)))

    def client(*command):
        return subprocess.run([coordinator_bin, *command], env=env, capture_output=True, text=True, check=True).stdout

    outcomes = {}
    try:
        start("coordinator", [coordinator_bin, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(work_dir, "coordinator"),
                              "--worker-token-file", worker_token])
        for index in range(args.workers):
            start(f"worker-{index}", [worker_bin, "--coordinator", url, "--token-file", worker_token, "--name", f"bench-{index}",
                                      "--cache-dir", os.path.join(work_dir, f"worker-{index}"), "--threads", str(threads),
                                      "--advertise-host", "127.0.0.1"])
        wait_until("the workers to register", lambda: len(json.loads(client("workers", "--format", "json"))) >= args.workers)
        dataset = os.path.relpath(args.dataset, work_dir)
        for run in args.runs:
            path = os.path.join(work_dir, f"{run}.toml")
            with open(path, "w") as out:
                out.write(sweep_text(f"prune-{run}", dataset, args.epochs, run))
            started = time.monotonic()
            sweep_id = client("submit", path).split()[0]
            waited = subprocess.run([coordinator_bin, "wait", sweep_id], env=env, capture_output=True, text=True)
            wall = time.monotonic() - started
            state = waited.stdout.strip()
            if waited.returncode != 0 or state != "succeeded":
                raise RuntimeError(f"run {run}: the sweep ended {state}")
            results = json.loads(client("results", sweep_id, "--format", "json"))
            outcomes[run] = (wall, results)
            print(f"{run}: {wall:.1f} s, {trial_epochs(results)} trial-epochs, winner {winner(results)}", file=sys.stderr)
    except Exception:
        for name, path in logs.items():
            print(f"--- {name} ({path}) ---\n{tail(path)}", file=sys.stderr)
        raise
    finally:
        for _, process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    return threads, outcomes


def cv_trials(results):
    return [t for t in results["trials"] if t["stage"] == "cv"]


def trial_epochs(results):
    return sum(len(t["epochs"]) for t in cv_trials(results))


def winner(results):
    return next((c["config"] for c in results["configs"] if c["winner"]), None)


def pruned_reasons(results):
    """The reason each pruned config was dropped with (its first pruned trial's)."""
    reasons = {}
    for trial in cv_trials(results):
        if trial["state"] == "pruned":
            reasons.setdefault(trial["config"], trial["error"])
    return reasons


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--dataset", default=dataset_dir())
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated, from full, racing, asha, both (full is needed for the comparison)")
    args = parser.parse_args()
    args.runs = [run for run in args.runs.split(",") if run]
    if "full" not in args.runs or any(run not in RUNS for run in args.runs):
        parser.error(f"--runs takes {', '.join(RUNS)} and needs full")
    with tempfile.TemporaryDirectory(prefix="cohort-bench-prune-") as work_dir:
        threads, outcomes = run_all(args, work_dir)
    full_wall, full = outcomes["full"]
    full_epochs = trial_epochs(full)
    means = {c["config"]: c["mean"] for c in full["configs"] if c["mean"] is not None}
    best = min(means.values())
    dataset = os.path.relpath(args.dataset, ROOT)
    lines = [
        f"Measured by `make bench-prune` (`tools/bench/prune.py`) on {machine()}: the seed's cross-validation grid "
        f"(lr 1e-3, 1e-4 x weight decay 1e-5, 1e-6 x batch size 128, 256 = 8 configs x 4 folds, {args.epochs} epochs, no augmentation) "
        f"on `{dataset}`, `coordinator serve` and {args.workers} `worker` processes of {threads} libtorch thread(s) each, the runs one "
        f"after another on the same cluster; `[cv.prune]` with its defaults (min_folds 2, confidence 0.95, grace_epochs 2, reduction 3). "
        f"A config's full-grid mean is its mean over folds of the minimum validation MSE in the full grid's run.",
        "",
        "| run | trial-epochs | of the full grid | wall (s) | trials pruned | chosen config | its full-grid mean | above the best |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for run in args.runs:
        wall, results = outcomes[run]
        epochs = trial_epochs(results)
        chosen = winner(results)
        chosen_mean = means.get(chosen)
        gap = (chosen_mean - best) / best if chosen_mean is not None else None
        pruned = sum(1 for t in cv_trials(results) if t["state"] == "pruned")
        summary[run] = {"trial_epochs": epochs, "share": epochs / full_epochs, "wall_seconds": wall, "pruned": pruned, "chosen": chosen, "chosen_full_mean": chosen_mean, "gap": gap}
        mean_text = f"{chosen_mean:.5f}" if chosen_mean is not None else "n/a"
        gap_text = f"{100 * gap:.2f} %" if gap is not None else "n/a"
        lines.append(f"| {run} | {epochs} | {100 * epochs / full_epochs:.1f} % | {wall:.1f} | {pruned} | `{chosen}` | {mean_text} | {gap_text} |")
    lines += ["", f"Best full-grid mean: {best:.5f} (`{winner(full)}`)."]
    if "both" in summary:
        both = summary["both"]
        share_ok = both["share"] <= 0.40
        gap_ok = both["gap"] is not None and both["gap"] <= 0.01
        gap_text = "n/a" if both["gap"] is None else f"{100 * both['gap']:.2f} %"
        lines += [
            "",
            f"Targets for `both`: at most 40 % of the full grid's trial-epochs: **{100 * both['share']:.1f} %** ({'met' if share_ok else 'missed'}); "
            f"the chosen config's full-grid mean within 1 % of the best: **{gap_text}** ({'met' if gap_ok else 'missed'}).",
        ]
    for run in args.runs:
        reasons = pruned_reasons(outcomes[run][1])
        if reasons:
            lines += ["", f"Why `{run}` dropped each config (its first pruned trial's reason):", ""]
            lines += [f"- `{config}`: {reason}" for config, reason in reasons.items()]
    default = args.workers == 2 and args.epochs == 20 and args.runs == RUNS
    if default:
        write_section("prune", lines)
    else:
        print("\n".join(["(not the default runs: not written)", *lines]))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
