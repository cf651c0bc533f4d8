"""Benchmark: all-reduce bus bandwidth of Cohort's CPU gang communicator
(worker/examples/bench_allreduce.rs; all ranks on one host, so shared memory) and of its TCP ring
forced (the example's --tcp mode) against torch.distributed with gloo
(tools/reference/allreduce_gloo.py), against the ring's traffic alone over plain TCP (the
example's --link mode: what any TCP ring can reach here) and against an in-process memcpy of the
same bytes. Every rank is its own process on loopback; worlds 2 and 4, float32 sum, 1–64 MiB.
Shared-memory, ring, gloo and link rounds alternate; each figure is the median over rounds of the
per-round median iteration time. Bus bandwidth follows the nccl-tests
convention: algbw = bytes / time, busbw = algbw × 2(n−1)/n. Writes the section between the
allreduce markers of docs/performance.md.

Run: make bench-allreduce   (or .venv/bin/python tools/bench/allreduce.py [--rounds N] [--iters N]
[--print-only]; --print-only prints the table and leaves docs/performance.md alone)
"""

import argparse
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time

from perfdoc import ROOT, machine, release_binary, run_json, write_section

SIZES_MIB = [1, 2, 4, 8, 16, 32, 64]
WORLDS = [2, 4]
TARGET_RATIO = 1.5
TARGET_FROM_MIB = 4


def free_ports(count):
    """`count` distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class RankFailed(RuntimeError):
    """A rank exited with an error (e.g. its port was taken meanwhile) or the run timed out."""


def run_ranks(commands, timeout=600):
    """Starts one process per rank (rank 0 first in `commands`) and returns the JSON object printed
    last by rank 0. When any rank fails, the others are killed at once (they would otherwise wait
    for it until their own timeouts)."""
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE if rank == 0 else subprocess.DEVNULL, text=True) for rank, command in enumerate(commands)]
    deadline = time.monotonic() + timeout
    try:
        while any(process.poll() is None for process in processes):
            failed = [process for process in processes if process.returncode not in (None, 0)]
            if failed:
                raise RankFailed(f"ranks failed: {[process.args for process in failed]}")
            if time.monotonic() > deadline:
                raise RankFailed(f"timed out after {timeout} s: {commands[0]}")
            time.sleep(0.05)
        failed = [process for process in processes if process.returncode != 0]
        if failed:
            raise RankFailed(f"ranks failed: {[process.args for process in failed]}")
        return json.loads(processes[0].stdout.read().strip().splitlines()[-1])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
            process.wait()
            if process.stdout:
                process.stdout.close()


def with_retries(run, attempts=3):
    """Runs `run()` (which picks fresh ports each time) again when a rank failed."""
    for attempt in range(attempts):
        try:
            return run()
        except RankFailed as error:
            if attempt == attempts - 1:
                raise
            print(f"retrying: {error}", file=sys.stderr, flush=True)


def ring_round(binary, world, common, mode):
    """One run of `world` ranks of the example: `mode` "shm" (the gang communicator, which must
    pick shared memory), "tcp" (the TCP ring forced) or "link" (the traffic alone); returns
    {bytes: median seconds}."""
    peers = ",".join(f"127.0.0.1:{port}" for port in free_ports(world))
    secret = secrets.token_hex(8)
    extra = {"shm": [], "tcp": ["--tcp"], "link": ["--link"]}[mode]
    commands = [[binary, "--rank", str(rank), "--peers", peers, "--secret", secret, *extra, *common] for rank in range(world)]
    result = run_ranks(commands)
    if result.get("path") != mode:
        raise RuntimeError(f"asked for the {mode} path, measured {result.get('path')}")
    return medians(result)


def gloo_round(world, common):
    """One torch.distributed gloo run of `world` ranks; returns {bytes: median seconds}."""
    port = free_ports(1)[0]
    script = os.path.join(ROOT, "tools", "reference", "allreduce_gloo.py")
    commands = [[sys.executable, script, "--rank", str(rank), "--world", str(world), "--port", str(port), *common] for rank in range(world)]
    return medians(run_ranks(commands))


def memcpy_round(binary, common):
    """One in-process memcpy run; returns {bytes: median seconds}."""
    return medians(run_json([binary, "--memcpy", *common]))


def medians(result):
    """{bytes: median seconds} from one run's JSON object."""
    return {entry["bytes"]: statistics.median(entry["seconds"]) for entry in result["results"]}


def bus_bandwidth(size_bytes, seconds, world):
    """nccl-tests' bus bandwidth in GB/s (1e9 bytes per second)."""
    return size_bytes / seconds * 2 * (world - 1) / world / 1e9


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--budget-mib", type=int, default=64, help="small sizes get more iterations, to move at least this much")
    parser.add_argument("--print-only", action="store_true", help="print the table instead of writing docs/performance.md")
    args = parser.parse_args()
    binary = release_binary("examples", "bench_allreduce")
    sizes = ",".join(str(mib) for mib in SIZES_MIB)
    common = ["--sizes-mib", sizes, "--warmup", str(args.warmup), "--iters", str(args.iters), "--budget-mib", str(args.budget_mib)]
    shm = {world: [] for world in WORLDS}
    ring = {world: [] for world in WORLDS}
    gloo = {world: [] for world in WORLDS}
    link = {world: [] for world in WORLDS}
    memcpy = []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        memcpy.append(memcpy_round(binary, common))
        for world in WORLDS:
            shm[world].append(with_retries(lambda: ring_round(binary, world, common, "shm")))
            ring[world].append(with_retries(lambda: ring_round(binary, world, common, "tcp")))
            gloo[world].append(with_retries(lambda: gloo_round(world, common)))
            link[world].append(with_retries(lambda: ring_round(binary, world, common, "link")))

    def median_over_rounds(rounds, size_bytes):
        return statistics.median(r[size_bytes] for r in rounds)

    lines = [
        f"Measured by `make bench-allreduce` (`tools/bench/allreduce.py`) on {machine()}: every rank a "
        f"separate process on loopback, float32 sum, the median of {args.rounds} alternating rounds of "
        f"each, a round being the median of max({args.iters}, {args.budget_mib} MiB / size) timed all-reduces "
        f"after {args.warmup} warm-up. "
        "Bus bandwidth in GB/s (10^9 B/s), nccl-tests convention: busbw = size / time × 2(n−1)/n. "
        "shm: the gang communicator as a gang gets it (ranks on one host: shared memory); "
        "TCP ring: the same example with the TCP ring forced (`--tcp`), the path before shared memory. "
        "TCP link: every rank streams the ring's bytes (size × 2(n−1)/n) to its successor while "
        "receiving as much, nothing reduced, no steps — the most a TCP ring reaches here. "
        "memcpy: `copy_from_slice` of the same bytes in one process (bytes / time).",
        "",
        "| ranks | size | shm busbw | TCP ring busbw | gloo busbw | shm / gloo | TCP ring / gloo | TCP link busbw | memcpy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    misses = []
    for world in WORLDS:
        for mib in SIZES_MIB:
            size_bytes = mib << 20
            ours = bus_bandwidth(size_bytes, median_over_rounds(shm[world], size_bytes), world)
            tcp = bus_bandwidth(size_bytes, median_over_rounds(ring[world], size_bytes), world)
            theirs = bus_bandwidth(size_bytes, median_over_rounds(gloo[world], size_bytes), world)
            limit = bus_bandwidth(size_bytes, median_over_rounds(link[world], size_bytes), world)
            copy = size_bytes / median_over_rounds(memcpy, size_bytes) / 1e9
            ratio = ours / theirs
            if mib >= TARGET_FROM_MIB and ratio < TARGET_RATIO:
                misses.append(f"{world} ranks, {mib} MiB ({ratio:.2f}x)")
            lines.append(
                f"| {world} | {mib} MiB | {ours:.2f} | {tcp:.2f} | {theirs:.2f} | {ratio:.2f}x | {tcp / theirs:.2f}x | {limit:.2f} | {copy:.1f} |"
            )
    lines.append("")
    if misses:
        lines.append(f"Target (shm ≥ {TARGET_RATIO}× gloo from {TARGET_FROM_MIB} MiB up) missed at: {'; '.join(misses)}.")
    else:
        lines.append(f"Target (shm ≥ {TARGET_RATIO}× gloo from {TARGET_FROM_MIB} MiB up) met at every size and world.")
    if args.print_only:
        print("\n".join(lines))
        return
    write_section("allreduce", lines)


if __name__ == "__main__":
    main()
