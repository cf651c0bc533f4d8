"""Benchmark: sweep efficiency. Runs the demo pipeline (examples/demo.toml: cross-validation,
final training, classifier fine-tune) on a coordinator and 2 worker processes the way a user
would (`coordinator serve`, `worker --metrics-listen`, `coordinator submit --watch`), and reads
each worker's `cohort_worker_seconds_total{phase}` (docs/observability.md) before the submission
and after the sweep ends. Reports the wall time, each worker's share of the time spent training
and where the rest went, and writes the section between the markers in docs/performance.md.

The headline is the share of all worker time spent training over the sweep's wall time. The
workers idle when the coordinator has no task for them, which the demo's single-task stages
(final, fine-tune) force on one of the two; the table also gives the share over the time a
worker held work (all but idle) and the best share the stages allow, from the trials' epoch
times.

Run: make bench-sweep   (or .venv/bin/python tools/bench/sweep.py [--workers N] [--sweep FILE]);
`--worker-arg=--dataset-cache-mib=0` (repeatable) runs the workers with extra flags for a
comparison, which is printed but not written.
"""

import argparse
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from perfdoc import ROOT, machine, release_binary, write_section

PHASES = ["train", "data", "checkpoint", "coordinator", "idle"]
SAMPLE = re.compile(r'^cohort_worker_seconds_total\{phase="(\w+)"\} (\S+)$', re.MULTILINE)


def free_port():
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_token(path):
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as out:
        out.write(secrets.token_hex(32) + "\n")


def phase_seconds(metrics_port):
    """A worker's seconds by phase, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    seconds = {phase: float(value) for phase, value in SAMPLE.findall(text)}
    missing = [phase for phase in PHASES if phase not in seconds]
    if missing:
        raise RuntimeError(f"worker metrics lack phases {missing}")
    return seconds


def wait_until(what, ready, timeout=120, interval=0.2):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if ready():
                return
        except (OSError, RuntimeError, subprocess.CalledProcessError, json.JSONDecodeError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(interval)


def tail(path, lines=20):
    try:
        with open(path, errors="replace") as log:
            return "".join(log.readlines()[-lines:])
    except OSError:
        return ""


def stage_bound(results, workers):
    """The best training share the sweep's stages allow `workers` workers, and each stage's
    training seconds: every stage's tasks packed perfectly, no overhead at all. A stage with
    fewer tasks than workers leaves the rest idle; a task is its members' work (one worker's, or
    every replica's of a data-parallel gang, for the epoch seconds its leader reports)."""
    by_stage = {}
    for trial in results["trials"]:
        seconds = sum(epoch["seconds"] for epoch in trial["epochs"])
        members = len((trial.get("worker") or "-").split(","))
        by_stage.setdefault(trial["stage"], []).append((seconds, members))
    busy = sum(seconds * members for tasks in by_stage.values() for seconds, members in tasks)
    span = sum(max(sum(seconds * members for seconds, members in tasks) / workers, max(seconds for seconds, _ in tasks)) for tasks in by_stage.values())
    totals = {stage: sum(seconds * members for seconds, members in tasks) for stage, tasks in by_stage.items()}
    return busy / (workers * span), totals


def run_sweep(args, work_dir):
    coordinator_bin, worker_bin = release_binary("coordinator"), release_binary("worker")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client_token, worker_token = os.path.join(work_dir, "client.token"), os.path.join(work_dir, "worker.token")
    write_token(client_token)
    write_token(worker_token)
    env = dict(os.environ, COHORT_COORDINATOR=url, COHORT_TOKEN_FILE=client_token, RUST_LOG=os.environ.get("RUST_LOG", "info"))
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    processes = []
    logs = {}

    def start(name, command):
        logs[name] = os.path.join(work_dir, f"{name}.log")
        log = open(logs[name], "w")
        processes.append((name, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)))

    try:
        start("coordinator", [coordinator_bin, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(work_dir, "coordinator"),
                              "--worker-token-file", worker_token])
        metrics_ports = []
        for index in range(args.workers):
            metrics_ports.append(free_port())
            start(f"worker-{index}", [worker_bin, "--coordinator", url, "--token-file", worker_token, "--name", f"bench-{index}",
                                      "--cache-dir", os.path.join(work_dir, f"worker-{index}"), "--threads", str(threads),
                                      "--metrics-listen", f"127.0.0.1:{metrics_ports[-1]}", "--advertise-host", "127.0.0.1",
                                      *args.worker_arg])

        def registered():
            listing = subprocess.run([coordinator_bin, "workers", "--format", "json"], env=env, capture_output=True, text=True, check=True)
            return len(json.loads(listing.stdout)) >= args.workers

        wait_until("the workers to register", registered)
        for metrics_port in metrics_ports:
            wait_until("the worker metrics", lambda: phase_seconds(metrics_port) is not None)

        before = [phase_seconds(metrics_port) for metrics_port in metrics_ports]
        started = time.monotonic()
        submitted = subprocess.run([coordinator_bin, "submit", args.sweep, "--watch"], env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        after = [phase_seconds(metrics_port) for metrics_port in metrics_ports]
        if submitted.returncode != 0:
            raise RuntimeError(f"the sweep failed:\n{submitted.stdout[-3000:]}\n{submitted.stderr[-3000:]}")
        sweep_id = submitted.stdout.split()[0]
        results = json.loads(subprocess.run([coordinator_bin, "results", sweep_id, "--format", "json"], env=env,
                                            capture_output=True, text=True, check=True).stdout)
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
    spent = [{phase: b[phase] - a[phase] for phase in PHASES} for a, b in zip(before, after)]
    return wall, threads, spent, results


def percent(part, whole):
    return f"{100 * part / whole:.1f} %" if whole > 0 else "n/a"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sweep", default=os.path.join(ROOT, "examples", "demo.toml"))
    parser.add_argument("--worker-arg", action="append", default=[], help="an extra worker flag (comparisons: not written)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cohort-bench-sweep-") as work_dir:
        wall, threads, spent, results = run_sweep(args, work_dir)
    bound, stage_seconds = stage_bound(results, args.workers)
    rows = [(f"worker {index}", phases) for index, phases in enumerate(spent)]
    rows.append(("all", {phase: sum(phases[phase] for phases in spent) for phase in PHASES}))
    tasks = len(results["trials"])
    sweep_name = os.path.relpath(args.sweep, ROOT)
    stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in stage_seconds.items())
    lines = [
        f"Measured by `make bench-sweep` (`tools/bench/sweep.py`) on {machine()}: `{sweep_name}` ({tasks} tasks) on "
        f"`coordinator serve` and {args.workers} `worker` processes of {threads} libtorch thread(s) each, submitted with "
        f"`coordinator submit --watch`; phases from each worker's `cohort_worker_seconds_total` over the sweep.",
        "",
        f"Wall time (submit to results): **{wall:.1f} s**.",
        "",
        "| worker | time (s) | train | data | checkpoint | coordinator | idle | train share of time with work (all but idle) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, phases in rows:
        total = sum(phases.values())
        shares = " | ".join(percent(phases[phase], total) for phase in PHASES)
        busy = total - phases["idle"]
        label = f"**{name}**" if name == "all" else name
        lines.append(f"| {label} | {total:.1f} | {shares} | {percent(phases['train'], busy)} |")
    everything = rows[-1][1]
    lines += [
        "",
        f"Sweep efficiency (train share of all worker time): **{percent(everything['train'], sum(everything.values()))}** "
        f"(target ≥ 95 %). Training worker-seconds per stage from the trials' epoch times (a gang's times its replicas): {stages}; with those stages packed "
        f"perfectly on {args.workers} workers and no overhead at all, the share could reach at most {100 * bound:.1f} %.",
    ]
    if args.worker_arg:
        print("\n".join([f"(workers run with {' '.join(args.worker_arg)}: not written)", *lines]))
    else:
        write_section("sweep", lines)
    print(json.dumps({"wall_seconds": wall, "workers": spent, "stage_bound": bound}))


if __name__ == "__main__":
    main()
