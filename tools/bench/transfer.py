"""Benchmark: checkpoint and dataset transfer through the coordinator (coordinator/examples/
bench_transfer.rs) against copying the same file on the same disk. The example starts the real
`coordinator serve` (bearer tokens on, plain HTTP on loopback) on a temporary data dir, then for a
checkpoint-sized and a dataset-sized file of random bytes alternates: a read+write copy loop and
`std::fs::copy`, each fsynced; an upload in three forms (the CRC-32 last and the coordinator naming
the blob, as the worker and `coordinator submit` send now; and the two "befores", hashed while sent
with the hash last, and a hash pass then UploadBlob), which the coordinator hashes, checks and
fsyncs; a download (FetchBlob/DownloadBlob into a verified, fsynced file). Before each timed step that writes a file, an untimed scratch file of its size is written
and deleted, so every step writes into pages just freed. Each figure is the median over the
repetitions, after one untimed round. Writes the section between the transfer markers of
docs/performance.md.

Run: make bench-transfer   (or .venv/bin/python tools/bench/transfer.py [--repetitions N]
[--sizes-mib 64,256] [--print-only]; --print-only prints the table and leaves docs/performance.md alone)
"""

import argparse

from perfdoc import machine, release_binary, run_json, write_section

TARGET_RATIO = 0.5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--sizes-mib", default="64,256", help="comma-separated; the first is the checkpoint-like file")
    parser.add_argument("--print-only", action="store_true")
    parser.add_argument("--no-page-recycling", action="store_true", help="no scratch file before each timed step")
    args = parser.parse_args()
    command = [
        release_binary("examples", "bench_transfer"),
        "--coordinator-binary",
        release_binary("coordinator"),
        "--repetitions",
        str(args.repetitions),
        "--sizes-mib",
        args.sizes_mib,
    ] + (["--no-page-recycling"] if args.no_page_recycling else [])
    result = run_json(command, timeout=900)
    lines = [
        f"Measured by `make bench-transfer` (`tools/bench/transfer.py`) on {machine()}: `coordinator serve` "
        "as its own process with bearer tokens on, plain HTTP on loopback, data dir on the same file system "
        f"as the files; the median of {result['repetitions']} alternating repetitions of each, after one untimed round. MB/s = 10^6 B/s. "
        "Upload = as both clients send now: one pass, the CRC-32 in the stream's last chunk (a checkpoint from the worker; "
        "a dataset file from `coordinator submit` when its hash cache does not know the file; one it knows and the coordinator "
        "holds is not sent at all); the coordinator checks the checksum, names the blob by the SHA-256 it computes and fsyncs "
        "before it answers. "
        "Both processes keep their transfer buffers as the coordinator, its commands and the worker do "
        "(`transfer::allocator`: glibc keeps 32 MiB of free heap top and serves blocks under 4 MiB from its heaps). "
        "download = FetchBlob into a verified, fsynced file; the copies are fsynced too, and every read "
        "comes from the page cache. "
        + ("Before each timed step that writes a file, an untimed scratch file of its size is written and deleted, so every "
           "step writes into pages just freed (see the prose below)." if result.get("page_recycling") else
           "No scratch file before the timed steps (`--no-page-recycling`)."),
        "",
        "| file | size | upload | download | read+write copy | upload / copy | download / copy | `std::fs::copy` |",
        "|---|---|---|---|---|---|---|---|",
    ]
    missed = []
    for file in result["files"]:
        copy = file["copy_loop_mb_s"]
        upload_ratio = file["upload_mb_s"] / copy
        download_ratio = file["download_mb_s"] / copy
        label = f"{file['kind']} ({'worker up, `coordinator download` down' if file['kind'] == 'checkpoint' else '`coordinator submit` up, worker down'})"
        lines.append(
            f"| {label} | {file['mib']} MiB | {file['upload_mb_s']:,.0f} | {file['download_mb_s']:,.0f} | {copy:,.0f} "
            f"| {upload_ratio:.0%} | {download_ratio:.0%} | {file['fs_copy_mb_s']:,.0f} |"
        )
        missed += [f"{direction} of the {file['mib']} MiB {file['kind']}" for direction, ratio in (("upload", upload_ratio), ("download", download_ratio)) if ratio < TARGET_RATIO]
    lines += [
        "",
        "Where the upload's time goes, and CPU seconds per GB moved (client and coordinator together; the copy loop's own):",
        "",
        "| file | hash pass alone | upload, hash first / copy | upload, hash at end / copy | upload, checksum at end / copy "
        "| CPU s/GB upload, hash at end | CPU s/GB upload, checksum at end | CPU s/GB download | CPU s/GB copy loop |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for file in result["files"]:
        copy = file["copy_loop_mb_s"]
        lines.append(
            f"| {file['kind']}, {file['mib']} MiB | {file['hash_mb_s']:,.0f} MB/s "
            f"| {file['upload_hash_first_mb_s']:,.0f} MB/s ({file['upload_hash_first_mb_s'] / copy:.0%}) "
            f"| {file['upload_hash_at_end_mb_s']:,.0f} MB/s ({file['upload_hash_at_end_mb_s'] / copy:.0%}) "
            f"| {file['upload_mb_s']:,.0f} MB/s ({file['upload_mb_s'] / copy:.0%}) "
            f"| {file['upload_hash_at_end_cpu_s_per_gb']:.2f} | {file['upload_cpu_s_per_gb']:.2f} "
            f"| {file['download_cpu_s_per_gb']:.2f} | {file['copy_loop_cpu_s_per_gb']:.2f} |"
        )
    lines += ["", "The three upload forms are timed in every repetition, back to back, through the route's service: hash first "
              "(a hash pass, then the stream) and hash at end (the sender's SHA-256 in the last chunk) are how both clients "
              "sent before, kept as the \"befores\"; checksum at end is how they send now."]
    lines.append("")
    if missed:
        lines.append(f"Target (≥ {TARGET_RATIO:.0%} of the read+write copy) missed at: {'; '.join(missed)}.")
    else:
        lines.append(f"Target (≥ {TARGET_RATIO:.0%} of the read+write copy) met by every upload and download.")
    if args.print_only:
        print("\n".join(lines))
        return
    write_section("transfer", lines)


if __name__ == "__main__":
    main()
