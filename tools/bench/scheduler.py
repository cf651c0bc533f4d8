"""Benchmark: the scheduler's dispatch rate and acquire latency (coordinator/examples/bench_scheduler.rs)
with 256 simulated workers over real gRPC on loopback against the real `coordinator serve`
process, next to its anchors (the same loop against the coordinator's core in-process, without
gRPC, and the scheduling state machine alone), and the coordinator's memory. Writes the section
between the scheduler markers in docs/performance.md.

Run: make bench-scheduler   (or .venv/bin/python tools/bench/scheduler.py [--tasks N] [--workers N]
                             [--paced-tasks N] [--rate R])
"""

import argparse
import os
import sys

from perfdoc import machine, release_binary, run_json, write_section

TARGET_RATE = 10_000
TARGET_P99_MS = 5.0


def fmt(value, digits=0):
    return f"{value:,.{digits}f}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=256)
    parser.add_argument("--paced-tasks", type=int, default=50_000)
    parser.add_argument("--rate", type=float, default=TARGET_RATE)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    load = os.getloadavg()[0]
    command = [
        release_binary("examples", "bench_scheduler"),
        "--coordinator", release_binary("coordinator"),
        "--tasks", str(args.tasks),
        "--workers", str(args.workers),
        "--paced-tasks", str(args.paced_tasks),
        "--rate", str(args.rate),
        "--threads", str(args.threads),
    ]
    print(" ".join(command), file=sys.stderr, flush=True)
    result = run_json(command)
    grpc, core, scheduler = result["grpc"], result["core"], result["scheduler"]
    saturated, paced = grpc["saturated"], grpc.get("paced")
    cpus = result["cpus"]

    def row(label, run, cpu_columns):
        return (
            f"| {label} | {fmt(run['tasks'])} | {fmt(run['tasks_per_s'])} | {run['acquire_p50_ms']:.2f} | "
            f"{run['acquire_p99_ms']:.2f} | {run['complete_p99_ms']:.2f} | {cpu_columns} |"
        )

    def grpc_cpu(run):
        return f"{run['coordinator_cpu_us_per_task']:.0f} + {run['client_cpu_us_per_task']:.0f}"

    lines = [
        f"Measured by `make bench-scheduler` (`tools/bench/scheduler.py`) on {machine()}, load average "
        f"{load:.1f} at the start (other work on the machine slows the wall-clock figures; the CPU "
        f"figures are per task and less affected). The real `coordinator serve` process on loopback "
        f"(default flags but `--insecure-no-auth` and `--max-trials`), "
        f"{result['workers']} simulated workers with one gRPC connection each, on a "
        f"{result['client_threads']}-thread client runtime that shares the {cpus} cores with the "
        f"coordinator. Each worker loops AcquireTask → CompleteTask (a no-op trial); the tasks are "
        f"a cross-validation stage of 4 folds × a random search, submitted through the client service.",
        "",
        "| run | tasks | tasks/s | acquire p50 (ms) | acquire p99 (ms) | complete p99 (ms) | CPU µs per task (coordinator + client) |",
        "|---|---|---|---|---|---|---|",
        row("gRPC, saturated: every worker asks again at once", saturated, grpc_cpu(saturated)),
    ]
    if paced:
        lines.append(row(f"gRPC, paced: the workers ask for {fmt(paced['offered_per_s'])} tasks/s together", paced, grpc_cpu(paced)))
    lines += [
        row("anchor: the coordinator's `Core` in-process, saturated, no gRPC", core, f"{core['cpu_us_per_task']:.0f} (both)"),
        f"| anchor: the scheduling state machine alone | {fmt(scheduler['tasks'])} | {fmt(scheduler['tasks_per_s'])} | | | | |",
        "",
    ]
    ceiling = cpus * 1e6 / (saturated["coordinator_cpu_us_per_task"] + saturated["client_cpu_us_per_task"])
    best = max(saturated["tasks_per_s"], paced["tasks_per_s"] if paced else 0)
    latency = paced or saturated
    rate_met = "met" if best >= TARGET_RATE else "missed"
    latency_met = "met" if latency["acquire_p99_ms"] < TARGET_P99_MS else "missed"
    lines += [
        f"Targets: ≥ {fmt(TARGET_RATE)} tasks/s: {rate_met} ({fmt(best)}); acquire p99 < {TARGET_P99_MS:.0f} ms "
        f"{'at the paced rate' if paced else 'saturated'}: {latency_met} ({latency['acquire_p99_ms']:.2f} ms). "
        f"The saturated CPU per task bounds the rate {cpus} otherwise idle cores could sustain at "
        f"{fmt(ceiling)} tasks/s.",
        "",
        "| coordinator memory | RSS (MiB) | peak, VmHWM (MiB) |",
        "|---|---|---|",
        f"| idle, after start | {grpc['coordinator_idle_rss_mib']:.0f} | |",
        f"| after submitting {fmt(saturated['tasks'])} tasks | {grpc['coordinator_submitted_rss_mib']:.0f} | {grpc['coordinator_submitted_hwm_mib']:.0f} |",
        f"| after those {fmt(saturated['tasks'])} tasks ran | {saturated['coordinator_rss_mib']:.0f} | {saturated['coordinator_hwm_mib']:.0f} |",
    ]
    if paced:
        lines.append(f"| after {fmt(paced['tasks'])} more (paced) | {paced['coordinator_rss_mib']:.0f} | {paced['coordinator_hwm_mib']:.0f} |")
    write_section("scheduler", lines)


if __name__ == "__main__":
    main()
