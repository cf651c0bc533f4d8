"""Benchmark: two workers sharing one host. Starts `coordinator serve` and 2 `worker` processes
on this machine, once per thread setting, and measures two workloads on each cluster:

- gang: a 2-replica WGAN-GP (widths 128/64/32/16, global batch 32, 5 critic steps, gradient
  penalty 10) on the committed MRI volume, in critic samples per second (the median epoch after
  the first: ⌊slices / batch⌋ × batch samples over the epoch's seconds);
- cv: 2 independent cross-validation trials of the demo's autoencoder side by side (one per
  worker), in training samples per second per trial (median epoch after the first).

Thread settings, alternated round by round: the default (`--threads auto`: the workers find each
other through the host registry and split the cores), `--threads 1` each (the best explicit split
on 2 cores), and `--threads <cores>` each, which is what both workers did by default before
`auto` (libtorch took every core). Target: the default within 1.1x of the best explicit split.

Run: make bench-shared-host   (or .venv/bin/python tools/bench/shared_host.py [--rounds N])
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

from perfdoc import ROOT, machine, release_binary, write_section
from sweep import free_port, tail, wait_until, write_token

GANG_TOML = """name = "bench-gang"
seed = 0

[dataset]
format = "nifti"
path = "{root}/data/mri-sample"
image_size = 64
min_foreground = 0.05

[model]
kind = "wgan-gp"
widths = [128, 64, 32, 16]

[train]
epochs = {epochs}
batch_size = 32
critic_steps = 5
gp_lambda = 10
sample_every = 0
checkpoint_every = 1000

[distributed]
replicas = 2
"""

CV_TOML = """name = "bench-cv"
seed = 1

[dataset]
format = "idx"
path = "{root}/data/mnist-sample"

[noise]
std = 0.3

[model]
kind = "dae"
latent = 4

[cv]
folds = 2
epochs = {epochs}

[cv.grid]
lr = [1e-3]
weight_decay = [1e-5]
batch_size = [256]

[final]
epochs = 1
"""


FINAL_TOML = """name = "bench-final"
seed = 1

[dataset]
format = "idx"
path = "{root}/data/mnist-sample"

[noise]
std = 0.3

[model]
kind = "dae"
latent = 4

[final]
epochs = {epochs}
lr = 1e-3
weight_decay = 1e-6
batch_size = 256

[distributed]
replicas = 2
"""

# What each workload submits, how many epochs (an argument's name), and how many of its trials
# must have ended before it is measured.
WORKLOADS = {"gang": (GANG_TOML, "gang_epochs", 1), "cv": (CV_TOML, "cv_epochs", 2), "final": (FINAL_TOML, "final_epochs", 1)}


class TrialFailed(Exception):
    """A measured trial failed: the run has no figure (wait_until retries only transient errors)."""


def results(coordinator_bin, env, sweep_id):
    listing = subprocess.run([coordinator_bin, "results", sweep_id, "--format", "json"], env=env, capture_output=True, text=True, check=True)
    return json.loads(listing.stdout)


# Steps a measured worker takes before its steps' own figure starts (DDP's warm-up).
WARMUP_STEPS = 5


def scrape_steps(metrics_port, pid):
    """A worker's training-step counters from its /metrics (step count, seconds in steps) and its
    process CPU seconds (user + system, from /proc)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("cohort_worker_step_seconds_count", "cohort_worker_step_seconds_sum"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return values.get("cohort_worker_step_seconds_count", 0.0), values.get("cohort_worker_step_seconds_sum", 0.0), cpu


def run_cluster(threads, workload, args, work_dir, binaries=None, steps=None):
    """Starts a coordinator and 2 workers with `--threads threads` (None: the default), runs
    `workload` ("gang", "cv" or "final") until its measured trials have all their epochs, and returns
    the per-epoch throughput samples (after each trial's first epoch) and the load average.

    `binaries`: (coordinator, worker) paths instead of this checkout's release build. `steps`: a
    dict that, given, receives the training steps' own throughput after WARMUP_STEPS steps (what a
    step-timed anchor such as DDP measures): `samples_per_second` from worker 0's step counter and
    step seconds (samples per step from the whole run), and `cpu_seconds_per_sample`, both
    workers' process CPU over the same span (whole epochs, everything in them)."""
    coordinator_bin, worker_bin = binaries or (release_binary("coordinator"), release_binary("worker"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_dir = tempfile.mkdtemp(prefix=f"{workload}-", dir=work_dir)
    client_token, worker_token = os.path.join(run_dir, "client.token"), os.path.join(run_dir, "worker.token")
    write_token(client_token)
    write_token(worker_token)
    # Each cluster gets a registry of its own: a worker of an earlier round still shutting down
    # must not count.
    env = dict(os.environ, COHORT_COORDINATOR=url, COHORT_TOKEN_FILE=client_token, RUST_LOG=os.environ.get("RUST_LOG", "info"),
               COHORT_HOST_REGISTRY=os.path.join(run_dir, "registry"))
    processes, logs = [], {}

    def start(name, command):
        logs[name] = os.path.join(run_dir, f"{name}.log")
        processes.append(subprocess.Popen(command, stdout=open(logs[name], "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env))

    template, epochs_arg, trials_wanted = WORKLOADS[workload]
    epochs = getattr(args, epochs_arg)
    sweep_file = os.path.join(run_dir, "sweep.toml")
    with open(sweep_file, "w") as out:
        out.write(template.format(root=ROOT, epochs=epochs))
    try:
        start("coordinator", [coordinator_bin, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(run_dir, "coordinator"),
                              "--worker-token-file", worker_token])
        thread_flag = [] if threads is None else ["--threads", str(threads)]
        metrics_ports = [free_port() for _ in range(2)]
        for index in range(2):
            metrics_flag = [] if steps is None else ["--metrics-listen", f"127.0.0.1:{metrics_ports[index]}"]
            start(f"worker-{index}", [worker_bin, "--coordinator", url, "--token-file", worker_token, "--name", f"bench-{index}",
                                      "--cache-dir", os.path.join(run_dir, f"worker-{index}"), "--advertise-host", "127.0.0.1", *thread_flag,
                                      *metrics_flag])
        worker_pids = [process.pid for process in processes[1:]]

        def registered():
            listing = subprocess.run([coordinator_bin, "workers", "--format", "json"], env=env, capture_output=True, text=True, check=True)
            return len(json.loads(listing.stdout)) >= 2

        wait_until("the workers to register", registered)
        load = os.getloadavg()[0]
        submitted = subprocess.run([coordinator_bin, "submit", sweep_file], env=env, capture_output=True, text=True, check=True)
        sweep_id = submitted.stdout.split()[0]
        finished, marks = {}, []

        def stage_done():
            # cv: the cross-validation trials, not the final one that follows them.
            trials = [t for t in results(coordinator_bin, env, sweep_id)["trials"] if (t["stage"] == "final") == (workload == "final")]
            failed = [t["task_id"] for t in trials if t["state"] == "failed"]
            if failed:
                raise TrialFailed(f"trials {failed} failed")
            done = [t for t in trials if len(t["epochs"]) >= epochs]
            finished["trials"] = done
            if len(done) >= trials_wanted and steps is not None:
                marks.append([scrape_steps(p, pid) for p, pid in zip(metrics_ports, worker_pids)])
            return len(done) >= trials_wanted

        if steps is not None:
            # The steps' own figure starts after WARMUP_STEPS steps, as DDP's does; the workers'
            # /metrics are cheap to read, so this poll is fine-grained.
            def warmed_up():
                marks[:] = [[scrape_steps(p, pid) for p, pid in zip(metrics_ports, worker_pids)]]
                return marks[0][0][0] >= WARMUP_STEPS

            wait_until("the warm-up steps", warmed_up, timeout=args.timeout, interval=0.05)
        # Each poll runs the `coordinator results` CLI, about 0.3 s of CPU (most of it loading
        # libtorch): polled every 0.2 s it would take a large share of the 2 cores the measured
        # workers train on. Their figures come from the reported epoch seconds and the step timer,
        # not from when the poll notices, so polling every few seconds loses nothing.
        wait_until(f"the {workload} trials", stage_done, timeout=args.timeout, interval=3)
        if steps is not None:
            epochs_run = finished["trials"][0]["epochs"]
            # Samples per step, from the whole run (the gang counts full global batches only).
            samples_run = sum(e["samples"] // 32 * 32 if workload == "gang" else e["samples"] for e in epochs_run)
            (count0, sum0, _), (count1, sum1, _) = marks[0][0], marks[1][0]
            taken = count1 - count0
            samples = taken * samples_run / count1
            cpu = sum(after[2] - before[2] for before, after in zip(marks[0], marks[1]))
            steps.update(samples_per_second=samples / (sum1 - sum0), cpu_seconds_per_sample=cpu / samples, steps=taken)
    except Exception:
        for name, path in logs.items():
            print(f"--- {name} ({path}) ---\n{tail(path)}", file=sys.stderr)
        raise
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    rates = []
    for trial in finished["trials"]:
        for epoch in trial["epochs"][1:]:
            samples = epoch["samples"]
            if workload == "gang":
                samples = samples // 32 * 32  # full global batches only: one critic step each
            rates.append(samples / epoch["seconds"])
    threads_line = ""
    for path in (logs["worker-0"], logs["worker-1"]):
        with open(path, errors="replace") as log:
            lines = [line for line in log if "libtorch threads" in line]
        threads_line += (lines[0].strip() if lines else "(no thread line)") + "\n"
    return rates, load, threads_line


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gang-epochs", type=int, default=8)
    parser.add_argument("--cv-epochs", type=int, default=4)
    parser.add_argument("--final-epochs", type=int, default=4)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--no-write", action="store_true", help="print the section instead of rewriting docs/performance.md")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    settings = [("default (`auto`)", None), ("`--threads 1` each", 1), (f"`--threads {cores}` each (the old default)", cores)]
    figures = {(workload, label): [] for workload in ("gang", "cv") for label, _ in settings}
    loads = {key: [] for key in figures}
    with tempfile.TemporaryDirectory(prefix="cohort-bench-shared-") as work_dir:
        for round_index in range(args.rounds):
            order = settings if round_index % 2 == 0 else list(reversed(settings))
            for workload in ("gang", "cv"):
                for label, threads in order:
                    rates, load, thread_lines = run_cluster(threads, workload, args, work_dir)
                    median = statistics.median(rates)
                    figures[(workload, label)].append(median)
                    loads[(workload, label)].append(load)
                    print(f"round {round_index} {workload} {label}: {median:.1f} samples/s (load {load:.2f})\n{thread_lines}", file=sys.stderr, flush=True)
    lines = [
        f"Measured by `make bench-shared-host` (`tools/bench/shared_host.py`) on {machine()}: `coordinator serve` and 2 `worker` "
        f"processes on this one host, a fresh cluster per run, the settings alternated over {args.rounds} rounds (median of the "
        f"rounds' medians; each run's figure is the median epoch after the first). gang: one 2-replica WGAN-GP, widths 128/64/32/16, "
        f"global batch 32, 5 critic steps, {args.gang_epochs} epochs on the committed MRI volume, critic samples/s. cv: 2 "
        f"cross-validation trials of the demo's autoencoder (batch 256, {args.cv_epochs} epochs) side by side, training samples/s "
        f"per trial. Load average (1 min) at each run's start in brackets.",
        "",
        "| workload | worker threads | samples/s | of the best explicit split | runs (load) |",
        "|---|---|---|---|---|",
    ]
    verdicts = []
    for workload in ("gang", "cv"):
        best = max(statistics.median(figures[(workload, label)]) for label, threads in settings if threads is not None)
        for label, _ in settings:
            values = figures[(workload, label)]
            median = statistics.median(values)
            runs = ", ".join(f"{v:.1f} ({l:.1f})" for v, l in zip(values, loads[(workload, label)]))
            lines.append(f"| {workload} | {label} | {median:,.1f} | {median / best:.2f}x | {runs} |")
        default = statistics.median(figures[(workload, settings[0][0])])
        verdicts.append(f"{workload}: default at {best / default:.2f}x the best explicit split's time ({'met' if best / default <= 1.1 else 'missed'})")
    lines += ["", "Target (default within 1.1x of the best explicit split): " + "; ".join(verdicts) + "."]
    if args.no_write:
        print("\n".join(lines))
    else:
        write_section("shared-host", lines)
    print(json.dumps({f"{w}/{l}": v for (w, l), v in figures.items()}))


if __name__ == "__main__":
    main()
