"""What one QP solve costs per interior point iteration, and what it costs besides its iterations.

A solve's time is split by the difference of two solves capped at ``--low`` and ``--high``
iterations (``max_iter``; both below the iterations the uncapped solve takes, so that each runs
every iteration it is given): the time per iteration is their difference over ``high - low``,
the rest of a solve (entry, checks, equilibration, start, end, outputs) is the capped solve's time
less its iterations. Without gradients, like the two capped solves, the uncapped forward is timed
too, and with gradients the forward, and the forward with the backward (``(z · w).sum()``), so
that the derivatives' share shows. The calls are taken in turn in one process, in an order that
changes from round to round (``interleaved.round_orders``), and the fastest round of each is kept (a
shared machine's load only slows a round down).

    PYTHONPATH=src python -m benchmarks.iteration_cost [--batch 1] [--n 100] [--compiled]
        [--threads 1] [--tol TOL] [--rounds 7] [--calls 30] [--json FILE]

Each capped solve is a specialisation of its own under ``--compiled`` (compiled at the untimed
first call). The problem is ``problems.random_qp(batch, n, n)``, float64, seed 0: the sweep's.

Under ``--compiled`` the forward + backward is also split into the time spent inside inductor's
generated code (every call of a compiled graph, the solve's and the backward's) and the time
around it: the package's Python, dynamo's entry to each compiled call (its guards), the
``autograd.Function``, the autograd engine (``compiled_graph_split``; the fastest round, calls
timed one by one, the solve and its backward apart).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch._inductor.output_code import CompiledFxGraph

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the benchmarks package
from benchmarks import machine  # noqa: E402
from benchmarks.interleaved import round_orders  # noqa: E402
from benchmarks.problems import random_qp  # noqa: E402
from benchmarks.qp_benchmark import _git_commit  # noqa: E402
from optlayers import solve_qp  # noqa: E402


def fastest_round_us(calls: dict[str, Callable[[], object]], rounds: int, per_round: int) -> dict[str, float]:
    """Microseconds per call of each of ``calls``: the fastest of ``rounds`` rounds of ``per_round``
    calls, the functions taken in turn in an order that changes from round to round
    (``interleaved.round_orders``; each called once, untimed, first)."""
    for fn in calls.values():
        fn()
    best = dict.fromkeys(calls, float("inf"))
    for _, order in round_orders(list(calls), rounds):
        for name in order:
            fn = calls[name]
            start = time.perf_counter()
            for _ in range(per_round):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / per_round * 1e6)
    return best


@contextlib.contextmanager
def _graph_clock(spent: list[float]) -> Iterator[None]:
    """Adds to ``spent[0]`` the seconds each call of a compiled graph (inductor's generated code,
    ``CompiledFxGraph.__call__``: torch's own class, not a public API) takes, while in effect."""
    call = CompiledFxGraph.__call__

    def timed(self: CompiledFxGraph, inputs: list) -> object:
        start = time.perf_counter()
        try:
            return call(self, inputs)
        finally:
            spent[0] += time.perf_counter() - start

    CompiledFxGraph.__call__ = timed
    try:
        yield
    finally:
        CompiledFxGraph.__call__ = call


def compiled_graph_split(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None],
                         rounds: int, per_round: int) -> dict[str, float]:
    """Microseconds per call of ``forward`` (which returns a loss) and of ``backward`` (of that
    loss), each whole and within it inside compiled graphs (``_graph_clock``): the round of
    ``per_round`` calls whose forward + backward was fastest, of ``rounds`` (one untimed call first)."""
    backward(forward())
    best: dict[str, float] | None = None
    spent = [0.0]
    with _graph_clock(spent):
        for _ in range(rounds):
            totals = dict.fromkeys(("forward", "forward_graphs", "backward", "backward_graphs"), 0.0)
            for _ in range(per_round):
                spent[0], start = 0.0, time.perf_counter()
                loss = forward()
                middle, graphs = time.perf_counter(), spent[0]
                backward(loss)
                end = time.perf_counter()
                totals["forward"] += middle - start
                totals["forward_graphs"] += graphs
                totals["backward"] += end - middle
                totals["backward_graphs"] += spent[0] - graphs
            if best is None or totals["forward"] + totals["backward"] < best["forward"] + best["backward"]:
                best = totals
    us = {name: value / per_round * 1e6 for name, value in best.items()}
    us["outside_graphs"] = us["forward"] + us["backward"] - us["forward_graphs"] - us["backward_graphs"]
    return us


def measure(batch: int, n: int, compiled: bool, low: int, high: int, rounds: int, per_round: int,
            tol: float | None = None) -> dict:
    """The split of one solve of ``random_qp(batch, n, n)`` (see the module docstring), at ``solve_qp``'s
    ``tol`` (None: its default; ``rel_tol`` follows it)."""
    qp = random_qp(batch, n, n)
    data = list(qp.tensors()[:4])  # Q, p, G, h
    leaves = [t.detach().clone().requires_grad_() for t in data]
    weights = torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def solve(tensors: list[torch.Tensor], max_iter: int | None = None):
        return solve_qp(*tensors, on_failure="ignore", compile=compiled, max_iter=max_iter, tol=tol)

    iterations = int(solve(data).iterations.max())
    if not 0 < low < high < iterations:
        raise ValueError(f"low and high must satisfy 0 < low < high < {iterations} (the uncapped solve's iterations), "
                         f"got low={low}, high={high}")

    def forward_backward() -> None:
        (solve(leaves).z * weights).sum().backward()

    calls = {
        "capped_low": lambda: solve(data, low),
        "capped_high": lambda: solve(data, high),
        "forward": lambda: solve(data),
        "forward_with_grad": lambda: solve(leaves),
        "forward_backward": forward_backward,
    }
    us = fastest_round_us(calls, rounds, per_round)
    per_iteration = (us["capped_high"] - us["capped_low"]) / (high - low)
    split = None
    if compiled:
        split = compiled_graph_split(lambda: (solve(leaves).z * weights).sum(), torch.Tensor.backward, rounds, per_round)
    return {
        "iterations": iterations,
        "per_iteration_us": per_iteration,
        "besides_iterations_us": us["capped_low"] - low * per_iteration,
        "forward_us": us["forward"],
        "forward_with_grad_us": us["forward_with_grad"],
        "forward_backward_us": us["forward_backward"],
        "backward_us": us["forward_backward"] - us["forward_with_grad"],
        "capped_us": {str(low): us["capped_low"], str(high): us["capped_high"]},
        "graph_split_us": split,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--compiled", action="store_true", help="solve_qp(compile=True)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tol", type=float, help="solve_qp's tol (and rel_tol); its default if not given")
    parser.add_argument("--low", type=int, default=3, help="iterations of the first capped solve")
    parser.add_argument("--high", type=int, default=8, help="iterations of the second capped solve")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=30, help="calls per round")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args(argv)
    for name in ("batch", "n", "threads", "low", "high", "rounds", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.high <= args.low:
        parser.error(f"--high must be above --low, got --low {args.low} --high {args.high}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.batch, args.n, args.compiled, args.low, args.high, args.rounds, args.calls, args.tol)
    result["meta"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "PYTHONPATH=src python -m benchmarks.iteration_cost " + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": _git_commit(),
        "cpu": machine.cpu_model(),
        "preload": machine.preloaded(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "batch": args.batch, "n": args.n, "compiled": args.compiled, "tol": args.tol,
    }
    print(f"{result['meta']['cpu']}, torch {torch.__version__}, {args.threads} thread(s); batch {args.batch}, "
          f"n = {args.n}, {'compiled' if args.compiled else 'eager'}, tol {args.tol or 'default'}; microseconds, fastest of {args.rounds} rounds")
    print(f"iterations {result['iterations']}; per iteration {result['per_iteration_us']:.1f}; "
          f"besides the iterations {result['besides_iterations_us']:.1f}")
    print(f"forward {result['forward_us']:.1f}; with grad {result['forward_with_grad_us']:.1f}; "
          f"forward + backward {result['forward_backward_us']:.1f} (backward {result['backward_us']:.1f})")
    split = result["graph_split_us"]
    if split is not None:
        print(f"forward + backward timed call by call: forward {split['forward']:.1f} ({split['forward_graphs']:.1f} inside "
              f"compiled graphs), backward {split['backward']:.1f} ({split['backward_graphs']:.1f} inside); outside the "
              f"graphs {split['outside_graphs']:.1f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
