"""Benchmark: command trials (docs/commands.md) against the same script run without Cohort.

- Overhead per trial: one worker (`--allow-commands --threads CORES`) runs a `[final]` command
  trial; the same script runs by hand with the same environment (hyperparameters, epochs, data,
  a checkpoint folder, OMP_NUM_THREADS). Two scripts: a no-op that prints one metrics line (the
  overhead alone, interpreter start-up included on both sides) and examples/command/train.py.
  Cohort's figure is the trial's duration as the coordinator records it (its attempt's start to
  its end: fetching the files, the working folder, the process, the checkpoint uploads, the
  completion); the hand's is the process's wall time.
- Gang: examples/command/train.py as a 2-replica `[final]` on 2 workers (`--threads CORES/2`
  each) against `torchrun --standalone --nproc-per-node 2` on the same script
  (OMP_NUM_THREADS=CORES/2): wall time, and the sum of the epochs' own `seconds` (training and
  validation alone, start-up excluded). Ratio = torchrun's time / Cohort's (≥ 1: Cohort is as
  fast or faster).

Runs alternate, round by round. Run: .venv/bin/python tools/bench/command.py [--rounds N]
"""

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from perfdoc import ROOT, machine, release_binary, write_section
from sweep import free_port

SCRIPT_DIR = os.path.join(ROOT, "examples", "command")
DATA = os.path.join(ROOT, "data", "mnist-sample")
NOOP = 'import json\nprint("cohort-metrics " + json.dumps({"epoch": 1, "val_loss": 1.0}))\n'


def wait_until(what, done, timeout=600, interval=0.1):
    started = time.time()
    while not done():
        if time.time() - started > timeout:
            raise TimeoutError(what)
        time.sleep(interval)


class Cluster:
    """A coordinator and `workers` workers that allow commands, in a temporary folder."""

    def __init__(self, work_dir, workers, threads):
        self.dir = tempfile.mkdtemp(prefix="command-", dir=work_dir)
        port = free_port()
        token, client_token = os.path.join(self.dir, "worker.token"), os.path.join(self.dir, "client.token")
        for path, text in ((token, "bench-worker-token\n"), (client_token, "bench-client-token\n")):
            with open(path, "w") as out:
                out.write(text)
        self.env = dict(os.environ, COHORT_COORDINATOR=f"http://127.0.0.1:{port}", COHORT_TOKEN_FILE=client_token, RUST_LOG="info",
                        COHORT_HOST_REGISTRY=os.path.join(self.dir, "registry"))
        self.processes = []
        self.start([release_binary("coordinator"), "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(self.dir, "data"),
                    "--worker-token-file", token], "coordinator")
        for index in range(workers):
            self.start([release_binary("worker"), "--token-file", token, "--name", f"w{index}", "--allow-commands", "--threads", str(threads),
                        "--cache-dir", os.path.join(self.dir, f"cache-{index}"), "--advertise-host", "127.0.0.1"], f"w{index}")
        wait_until("the workers", lambda: len(self.client("workers", "--format", "json")) >= workers)

    def start(self, command, name):
        log = open(os.path.join(self.dir, f"{name}.log"), "w")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env))

    def client(self, *args):
        for _ in range(100):
            done = subprocess.run([release_binary("coordinator"), *args], env=self.env, capture_output=True, text=True)
            if done.returncode == 0:
                return json.loads(done.stdout) if "json" in args else done.stdout
            time.sleep(0.1)
        raise RuntimeError(done.stderr)

    def run_final(self, files, hparams, epochs, replicas):
        """Submits a `[final]` command sweep; returns (its final trial, submit-to-end seconds)."""
        sweep = os.path.join(self.dir, f"sweep-{time.time_ns()}.toml")
        with open(sweep, "w") as out:
            out.write(f'name = "bench"\n[dataset]\nformat = "idx"\npath = "{DATA}"\n[model]\nkind = "command"\n[command]\n'
                      f'run = ["{sys.executable}", "train.py"]\nfiles = "{files}"\nmetric = "val_loss"\n[final]\nepochs = {epochs}\n'
                      f'[distributed]\nreplicas = {replicas}\n')
        # The hyperparameters of a final without [cv] are the program's defaults: the bench sets
        # them through the script's defaults file instead (see `prepare`).
        started = time.time()
        sweep_id = self.client("submit", sweep).split()[0]
        holder = {}

        def finished():
            holder["r"] = self.client("results", sweep_id, "--format", "json")
            return holder["r"]["state"] != "running"

        # Polled once a second: each poll starts a CLI process, which would take CPU from the trial.
        wait_until("the sweep", finished, interval=1.0)
        wall = time.time() - started
        final = [t for t in holder["r"]["trials"] if t["trial"] == "final"][0]
        if final["state"] != "succeeded":
            raise RuntimeError(json.dumps(final))
        return final, wall

    def close(self):
        for process in reversed(self.processes):
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def prepare(work_dir, name, hparams, script=None):
    """A copy of the example (or `script` as train.py) whose defaults are `hparams`."""
    folder = os.path.join(work_dir, name)
    os.makedirs(folder, exist_ok=True)
    if script is not None:
        with open(os.path.join(folder, "train.py"), "w") as out:
            out.write(script)
        return folder
    source = open(os.path.join(SCRIPT_DIR, "train.py")).read()
    # A [final] without [cv] gets COHORT_HPARAMS = {}: bake the benchmark's values in as the defaults.
    baked = json.dumps(json.dumps(hparams))
    source = source.replace('os.environ.get("COHORT_HPARAMS") or "{}"', f'(os.environ.get("COHORT_HPARAMS") or "{{}}").replace("{{}}", {baked})')
    assert baked in source, "the example's COHORT_HPARAMS line changed"
    with open(os.path.join(folder, "train.py"), "w") as out:
        out.write(source)
    return folder


def by_hand(folder, epochs, threads):
    """The script's wall time run directly, with the environment a trial gets."""
    checkpoint = tempfile.mkdtemp()
    env = dict(os.environ, COHORT_EPOCHS=str(epochs), COHORT_DATA=DATA, COHORT_CHECKPOINT_DIR=checkpoint, OMP_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1", COHORT_HPARAMS="{}")
    started = time.time()
    subprocess.run([sys.executable, "train.py"], cwd=folder, env=env, check=True, capture_output=True)
    shutil.rmtree(checkpoint, ignore_errors=True)
    return time.time() - started


def torchrun(folder, epochs, threads):
    """torchrun's wall time and the sum of rank 0's epoch seconds."""
    checkpoint = tempfile.mkdtemp()
    env = dict(os.environ, COHORT_EPOCHS=str(epochs), COHORT_DATA=DATA, COHORT_CHECKPOINT_DIR=checkpoint, OMP_NUM_THREADS=str(threads),
               PYTHONUNBUFFERED="1", COHORT_HPARAMS="{}")
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    started = time.time()
    done = subprocess.run([launcher, "--standalone", "--nproc-per-node", "2", "train.py"], cwd=folder, env=env, check=True, capture_output=True, text=True)
    wall = time.time() - started
    shutil.rmtree(checkpoint, ignore_errors=True)
    # Both ranks print to one pipe, so their lines may interleave: find each metrics object.
    per_epoch = {}
    for match in re.finditer(r"cohort-metrics (\{[^{}]*\})", done.stdout):
        metrics = json.loads(match.group(1))
        per_epoch[metrics["epoch"]] = max(per_epoch.get(metrics["epoch"], 0.0), metrics["seconds"])
    return wall, sum(per_epoch.values())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--limit", type=int, default=8000)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)
    work_dir = tempfile.mkdtemp(prefix="bench-command-")
    hparams = {"limit": args.limit, "hidden": 128, "lr": 0.05, "batch_size": 64}
    example = prepare(work_dir, "example", hparams)
    noop = prepare(work_dir, "noop", {}, NOOP)
    figures = {key: [] for key in ("noop-cohort", "noop-hand", "example-cohort", "example-hand", "gang-cohort", "gang-cohort-epochs", "gang-torchrun",
                                   "gang-torchrun-epochs", "noop-wall")}
    loads = []
    try:
        single = Cluster(work_dir, 1, cores)
        try:
            for round_index in range(args.rounds):
                loads.append(os.getloadavg()[0])
                for key, run in ([("cohort", None), ("hand", None)] if round_index % 2 == 0 else [("hand", None), ("cohort", None)]):
                    if key == "cohort":
                        trial, wall = single.run_final(noop, {}, 1, 1)
                        figures["noop-cohort"].append(trial["duration_secs"])
                        figures["noop-wall"].append(wall)
                        trial, _ = single.run_final(example, hparams, args.epochs, 1)
                        figures["example-cohort"].append(trial["duration_secs"])
                    else:
                        figures["noop-hand"].append(by_hand(noop, 1, cores))
                        figures["example-hand"].append(by_hand(example, args.epochs, cores))
                print(f"round {round_index}: " + ", ".join(f"{k}={v[-1]:.2f}" for k, v in figures.items() if v), file=sys.stderr, flush=True)
        finally:
            single.close()
        pair = Cluster(work_dir, 2, half)
        try:
            for round_index in range(args.rounds):
                loads.append(os.getloadavg()[0])
                order = ["cohort", "torchrun"] if round_index % 2 == 0 else ["torchrun", "cohort"]
                for key in order:
                    if key == "cohort":
                        trial, _ = pair.run_final(example, hparams, args.epochs, 2)
                        figures["gang-cohort"].append(trial["duration_secs"])
                        figures["gang-cohort-epochs"].append(sum(e["values"]["seconds"] for e in trial["epochs"]))
                    else:
                        wall, epochs_seconds = torchrun(example, args.epochs, half)
                        figures["gang-torchrun"].append(wall)
                        figures["gang-torchrun-epochs"].append(epochs_seconds)
                print(f"gang round {round_index}: cohort {figures['gang-cohort'][-1]:.2f} s, torchrun {figures['gang-torchrun'][-1]:.2f} s", file=sys.stderr, flush=True)
        finally:
            pair.close()
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)

    med = {key: statistics.median(values) for key, values in figures.items() if values}

    def runs(key):
        return ", ".join(f"{v:.2f}" for v in figures[key])

    lines = [
        f"Machine: {machine()}. `.venv/bin/python tools/bench/command.py --rounds {args.rounds} --epochs {args.epochs} --limit {args.limit}`",
        f"(runs alternate; medians, each run listed). 1-minute load average at the start of each round: {', '.join(f'{l:.1f}' for l in loads)}.",
        "",
        "Overhead per trial: a `[final]` command trial on one worker (`--threads " + str(cores) + "`), its duration as the coordinator records it,",
        "against the same script run by hand with the same environment:",
        "",
        "| script | Cohort trial (s) | by hand (s) | overhead (s) | runs: Cohort; by hand |",
        "|---|---:|---:|---:|---|",
        f"| no-op (one metrics line) | {med['noop-cohort']:.2f} | {med['noop-hand']:.2f} | {med['noop-cohort'] - med['noop-hand']:.2f} | {runs('noop-cohort')}; {runs('noop-hand')} |",
        f"| examples/command/train.py, {args.epochs} epochs, {args.limit} samples | {med['example-cohort']:.2f} | {med['example-hand']:.2f} | "
        f"{med['example-cohort'] - med['example-hand']:.2f} | {runs('example-cohort')}; {runs('example-hand')} |",
        "",
        f"From `submit` to the sweep's end (scheduling and the CLI's polling included), the no-op took {med['noop-wall']:.2f} s (median of {runs('noop-wall')}).",
        "",
        f"Gang: examples/command/train.py as a 2-replica `[final]` on 2 workers (`--threads {half}` each) against",
        f"`torchrun --standalone --nproc-per-node 2` (OMP_NUM_THREADS={half}); ratio = torchrun's time / Cohort's:",
        "",
        "| figure | Cohort gang (s) | torchrun (s) | ratio | runs: Cohort; torchrun |",
        "|---|---:|---:|---:|---|",
        f"| whole run | {med['gang-cohort']:.2f} | {med['gang-torchrun']:.2f} | {med['gang-torchrun'] / med['gang-cohort']:.3f} | {runs('gang-cohort')}; {runs('gang-torchrun')} |",
        f"| epochs alone (sum of the script's own `seconds`) | {med['gang-cohort-epochs']:.2f} | {med['gang-torchrun-epochs']:.2f} | "
        f"{med['gang-torchrun-epochs'] / med['gang-cohort-epochs']:.3f} | {runs('gang-cohort-epochs')}; {runs('gang-torchrun-epochs')} |",
    ]
    if args.no_write:
        print("\n".join(lines))
    else:
        write_section("command", lines)


if __name__ == "__main__":
    main()
