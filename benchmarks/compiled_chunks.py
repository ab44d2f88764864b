"""Time the compiled QP layer with its CPU batch cut into chunks of several sizes, alternating them.

A compiled solve on the CPU runs each thread's slice of the batch in chunks of at most
``qp.parallel._CHUNK_ENTRIES`` matrix entries (problems × n²), one compiled call after another
(``qp.parallel.compiled_slices``). This script sets that bound to each value given, compiles each
chunk size in an untimed warm-up, then times rounds of ``solve_qp(..., compile=True)`` forward +
backward w.r.t. p on the paper's random QPs (``benchmarks/problems.py``, n inequalities, float64),
the chunk sizes in turn, and prints each one's median and best, and its median against the first's.

    python benchmarks/compiled_chunks.py --batch 128 --n 100 --threads 2 --entries 10000000 80000 40000

(10,000,000 entries: each slice whole at these sizes.)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.machine import cpu_model
from benchmarks.problems import random_qp
from optlayers import solve_qp
from optlayers.qp import parallel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--entries", type=int, nargs="+", default=[10_000_000, 80_000, 40_000],
                        help="values of the chunks' bound in matrix entries (the first is the reference)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    Q, p, G, h, _, _ = random_qp(args.batch, args.n, args.n).tensors()

    def run() -> None:
        leaf = p.clone().requires_grad_(True)
        solve_qp(Q, leaf, G, h, tol=1e-8, compile=True).z.sum().backward()

    cuts = {}
    for entries in args.entries:
        parallel._CHUNK_ENTRIES = entries
        cuts[entries] = parallel.compiled_slices(args.batch, args.n, p.device)
        run(), run()  # compiles this chunk size
    times: dict[int, list[float]] = {entries: [] for entries in args.entries}
    for _ in range(args.rounds):
        for entries in args.entries:
            parallel._CHUNK_ENTRIES = entries
            start = time.perf_counter()
            run()
            times[entries].append(time.perf_counter() - start)
    print(f"{cpu_model()}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"batch {args.batch}, n {args.n}, {args.threads} threads, {args.rounds} rounds; forward + backward, ms")
    reference = statistics.median(times[args.entries[0]])
    for entries in args.entries:
        count, chunk = cuts[entries]
        median = statistics.median(times[entries])
        print(f"bound {entries:>10,} entries: {count} slices in chunks of {chunk:>4}: median {median * 1e3:7.1f}, "
              f"best {min(times[entries]) * 1e3:7.1f}, median / first's {median / reference:.2f}")


if __name__ == "__main__":
    main()
