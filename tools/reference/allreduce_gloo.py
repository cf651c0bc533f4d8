"""torch.distributed (gloo) counterpart of worker/examples/bench_allreduce.rs: one rank per
process, initialised through a TCP store on loopback, timing `dist.all_reduce` (float32 sum) of
each size the same way — warm-up, then timed iterations (--iters, or more for small sizes so that
each size moves at least --budget-mib MiB), each preceded by a one-element all-reduce so that the
ranks start together — and checking every result against the exact sum.
Rank 0 prints one JSON object: {"world": N, "results": [{"bytes": B, "seconds": [t, ...]}, ...]}.

Run every rank with the same --world and --port:
  python tools/reference/allreduce_gloo.py --rank R --world N --port P [--sizes-mib 1,4,64]
"""

import argparse
import json
import os
import sys
import time

# Keep gloo on the loopback interface, like the ring it is compared with.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402


PERIOD = 101


def rank_input(rank, length):
    """The same integer-valued data as the Rust example, ((i*7 + rank*13) % 101) - 50, built by
    tiling its period of 101 elements (cheaper than element-wise arithmetic on 64 MiB)."""
    index = torch.arange(PERIOD, dtype=torch.int64)
    period = ((index * 7 + rank * 13) % PERIOD - 50).to(torch.float32)
    return period.repeat(-(-length // PERIOD))[:length].clone()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--sizes-mib", default="1,2,4,8,16,32,64")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (input set-up only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=args.world)
    barrier_tensor = torch.zeros(1)
    results = []
    for mib in (int(s) for s in args.sizes_mib.split(",")):
        length = mib * (1 << 20) // 4
        source = rank_input(args.rank, length)
        expected = sum(rank_input(rank, length) for rank in range(args.world))
        data = source.clone()
        seconds = []
        iterations = max(args.iters, -(-args.budget_mib // mib))
        for iteration in range(args.warmup + iterations):
            data.copy_(source)
            dist.all_reduce(barrier_tensor)
            started = time.perf_counter()
            dist.all_reduce(data)
            elapsed = time.perf_counter() - started
            if not torch.equal(data, expected):
                sys.exit(f"rank {args.rank}: the all-reduce of {mib} MiB is not the exact sum")
            if iteration >= args.warmup:
                seconds.append(elapsed)
        results.append({"bytes": mib << 20, "seconds": seconds})
    dist.destroy_process_group()
    if args.rank == 0:
        print(json.dumps({"world": args.world, "results": results}))


if __name__ == "__main__":
    main()
