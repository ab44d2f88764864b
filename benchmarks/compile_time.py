"""The compiled path's cost in a fresh process: the first call of a new shape (compilation included)
and then a call, for QPFunction(compile=True), forward + backward w.r.t. Q, p, G, h, on the
benchmarks' random QPs (n inequalities), one thread.

    TORCHINDUCTOR_CACHE_DIR=/tmp/empty PYTHONPATH=src python -m benchmarks.compile_time --batch 1 --n 10

Run it twice with the same ``TORCHINDUCTOR_CACHE_DIR``: the first run compiles with a cold cache,
the second shows what a new process pays with the cache filled.
"""
from __future__ import annotations

import argparse
import time

import torch

from benchmarks.problems import random_qp
from optlayers import QPFunction


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--calls", type=int, default=30, help="calls timed after the first (best and median)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.n < 1 or args.calls < 1:
        parser.error(f"--batch, --n and --calls must be positive, got {args.batch}, {args.n}, {args.calls}")
    torch.set_num_threads(1)
    data = [t.clone().requires_grad_(True) for t in random_qp(args.batch, args.n, args.n, seed=0).tensors()[:4]]
    layer = QPFunction(verbose=-1, compile=True)

    def call() -> None:
        layer(*data).sum().backward()

    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    for _ in range(3):
        call()
    times = []
    for _ in range(args.calls):
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    times.sort()
    print(f"batch {args.batch}, n = {args.n}: first call {first:.1f} s; then CPU ms per call: "
          f"best {1e3 * times[0]:.3f}, median {1e3 * times[len(times) // 2]:.3f}")


if __name__ == "__main__":
    main()
