"""Where the cone interior point method's batched products stand against the memory: each large
product (``torch.bmm``, ``torch.baddbmm``) of a ``solve_cone(solver="ipm")`` forward timed in the
solve, against the same product on the same shapes and strides repeated in a loop, where its
operands stay in the cache, and repeated after each call flushes the cache (a pass over 64 MB); then
the forward solved whole against the same batch in chunks of fewer programs, one call after another.

    PYTHONPATH=src python -m benchmarks.cone_memory [--batch 128] [--chunks 64,32,16] [--top 3]
        [--repeats 3] [--json FILE]

The programs are ``bench_cone.py``'s (all five cones, m = 96, n = 48). Run it with one torch
thread (``OMP_NUM_THREADS=1``): the cache a product finds then is its own core's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the benchmarks package
from benchmarks import machine  # noqa: E402
from benchmarks.bench_cone import N, SPEC  # noqa: E402
from benchmarks.qp_benchmark import _git_commit  # noqa: E402
from optlayers.cone import solve_cone  # noqa: E402
from optlayers.cone.testing import random_program  # noqa: E402

_PRODUCTS = (torch.bmm, torch.baddbmm)
FLUSH_BYTES = 64 * 2**20


class _ProductClock(TorchFunctionMode):
    """Seconds and calls of each batched product, by its arguments' shapes and strides."""

    def __init__(self) -> None:
        super().__init__()
        self.spent: dict[tuple, list] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if func not in _PRODUCTS:
            return func(*args, **kwargs)
        start = time.perf_counter()
        out = func(*args, **kwargs)
        elapsed = time.perf_counter() - start
        key = (func.__name__, *((tuple(t.shape), t.stride()) for t in args if isinstance(t, torch.Tensor)))
        entry = self.spent.setdefault(key, [0.0, 0, [t for t in args if isinstance(t, torch.Tensor)]])
        entry[0] += elapsed
        entry[1] += 1
        return out


def _like(t: torch.Tensor) -> torch.Tensor:
    """A tensor of ``t``'s shape, strides and dtype, of fresh random values."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype).copy_(torch.randn(t.shape, dtype=t.dtype))


def repeated_us(name: str, operands: list[torch.Tensor], calls: int, flush: bool) -> float:
    """Microseconds per call of the product ``name`` on fresh operands of the given layouts, called
    ``calls`` times in a row (after one untimed call); with ``flush``, a pass over ``FLUSH_BYTES``
    before each call, which leaves the operands out of the cache."""
    func = getattr(torch, name)
    fresh = [_like(t) for t in operands]
    junk = torch.zeros(FLUSH_BYTES // 8, dtype=torch.float64)
    func(*fresh)
    total = 0.0
    for _ in range(calls):
        if flush:
            junk.add_(1.0)
        start = time.perf_counter()
        func(*fresh)
        total += time.perf_counter() - start
    return total / calls * 1e6


def products(batch: int, top: int, calls: int) -> list[dict]:
    """The ``top`` products by their time in one solve (after an untimed one), each in the solve,
    repeated and repeated after a flush, microseconds per call."""
    A, b, c, *_ = random_program(SPEC, N, batch=batch, seed=0)
    solve_cone(A, b, c, SPEC, solver="ipm")
    clock = _ProductClock()
    with clock:
        solve_cone(A, b, c, SPEC, solver="ipm")
    ranked = sorted(clock.spent.items(), key=lambda item: -item[1][0])[:top]
    rows = []
    for key, (seconds, count, operands) in ranked:
        rows.append({"product": key[0], "shapes": [list(shape) for shape, _ in key[1:]], "strides": [list(st) for _, st in key[1:]],
                     "calls_in_solve": count, "in_solve_us": seconds / count * 1e6,
                     "repeated_us": repeated_us(key[0], operands, calls, flush=False),
                     "repeated_after_flush_us": repeated_us(key[0], operands, calls, flush=True)})
    return rows


def chunked(batch: int, chunks: list[int], repeats: int) -> list[dict]:
    """Forward seconds of the batch solved whole and in chunks of each size, one call after another
    (the fastest of ``repeats``, after one untimed call of each; the sizes taken in turn, round by
    round)."""
    A, b, c, *_ = random_program(SPEC, N, batch=batch, seed=0)

    def forward(size: int) -> None:
        for start in range(0, batch, size):
            part = slice(start, start + size)
            solve_cone(A[part], b[part], c[part], SPEC, solver="ipm")

    sizes = [batch, *chunks]
    for size in sizes:
        forward(size)
    best = dict.fromkeys(sizes, float("inf"))
    for _ in range(repeats):
        for size in sizes:
            start = time.perf_counter()
            forward(size)
            best[size] = min(best[size], time.perf_counter() - start)
    return [{"programs_per_call": size, "forward_s": seconds} for size, seconds in best.items()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunks", type=lambda s: [int(v) for v in s.split(",") if v], default=[64, 32, 16],
                        help="programs per call of the chunked forwards (comma-separated)")
    parser.add_argument("--top", type=int, default=3, help="how many of the solve's products, the longest first")
    parser.add_argument("--calls", type=int, default=30, help="calls per repeated product")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    for name in ("batch", "top", "calls", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(size < 1 or size > args.batch for size in args.chunks):
        parser.error(f"--chunks must be between 1 and --batch ({args.batch}), got {args.chunks}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = {"products": products(args.batch, args.top, args.calls), "chunks": chunked(args.batch, args.chunks, args.repeats)}
    result["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=src python -m benchmarks.cone_memory " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": _git_commit(), "cpu": machine.cpu_model(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "batch": args.batch,
    }
    print(f"{result['meta']['cpu']}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); batch {args.batch}, "
          f"m = {SPEC.size}, n = {N}; microseconds per call")
    print("| product | shapes | in the solve | repeated | repeated after a flush |")
    print("|---|---|---|---|---|")
    for row in result["products"]:
        print(f"| {row['product']} | {' @ '.join('x'.join(map(str, s)) for s in row['shapes'])} | {row['in_solve_us']:.0f} "
              f"| {row['repeated_us']:.0f} | {row['repeated_after_flush_us']:.0f} |")
    print("forward, seconds: " + ", ".join(f"{row['programs_per_call']} per call {row['forward_s']:.3f}" for row in result["chunks"]))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
