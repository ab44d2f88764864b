"""The same solve called over and over, for a profiler to sample its steady state.

Solves the sweep's random QPs (``--layer qp``: ``benchmarks.problems.random_qp(batch, n, n)``) or the
cone benchmark's programs (``--layer cone``: ``bench_cone.SPEC``, n = 48) ``--calls`` times after
``--warm`` untimed calls (a compilation, the caches), forward and, with ``--backward``, the
backward of the sum of the solution, and prints the mean time of a call. Start the profiler with a
delay past the warm-up, e.g.

    PYTHONPATH=src perf record -F 499 -g -D 20000 python benchmarks/steady_loop.py --layer qp \\
        --batch 128 --n 100 --threads 1 --compile --backward --calls 80
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the benchmarks package
from benchmarks.problems import random_qp  # noqa: E402
from optlayers import solve_cone, solve_qp  # noqa: E402
from optlayers.cone.testing import random_program  # noqa: E402


def call(args: argparse.Namespace):
    """A function that makes one call: the forward (and the backward with ``--backward``)."""
    if args.layer == "qp":
        qp = random_qp(args.batch, args.n, args.n, 0, seed=0)

        def once():
            Q, p, G, h = (t.detach().requires_grad_(args.backward) for t in (qp.Q, qp.p, qp.G, qp.h))
            z = solve_qp(Q, p, G, h, compile=args.compile).z
            if args.backward:
                z.sum().backward()
        return once
    from benchmarks.bench_cone import N, SPEC

    A, b, c, *_ = random_program(SPEC, N, batch=args.batch, seed=0)
    options = {} if args.refine_steps is None else {"refine_steps": args.refine_steps}

    def once():
        A_, c_ = (t.detach().requires_grad_(args.backward) for t in (A, c))
        x = solve_cone(A_, b, c_, SPEC, solver="ipm", compile=args.compile, **options).x
        if args.backward:
            x.sum().backward()
    return once


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=("qp", "cone"), default="qp")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=100, help="the QP's variables (and inequalities); the cone's n is 48")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="compile=True")
    parser.add_argument("--backward", action="store_true", help="also the backward of the solution's sum")
    parser.add_argument("--refine-steps", type=int, help="the cone layer's refine_steps (its default if not given)")
    parser.add_argument("--warm", type=int, default=2, help="untimed calls first")
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args(argv)
    if min(args.batch, args.n, args.threads, args.calls) < 1 or args.warm < 0:
        parser.error(f"--batch, --n, --threads and --calls must be positive and --warm not negative, got {args.batch}, "
                     f"{args.n}, {args.threads}, {args.calls} and {args.warm}")
    if args.threads != torch.get_num_threads():  # as bench_cone.py: torch.set_num_threads only when asked
        torch.set_num_threads(args.threads)  # (it breaks MKL's batched LU with more than one thread, pytorch/pytorch#142815)
    once = call(args)
    for _ in range(args.warm):
        once()
    start = time.perf_counter()
    for _ in range(args.calls):
        once()
    mean = (time.perf_counter() - start) / args.calls
    print(f"{args.layer} batch {args.batch}{'' if args.layer == 'cone' else f', n {args.n}'}, {args.threads} thread(s), "
          f"{'compiled' if args.compile else 'eager'}{' forward + backward' if args.backward else ' forward'}: "
          f"{mean * 1e3:.2f} ms a call (mean of {args.calls})")
    return mean


if __name__ == "__main__":
    main()
