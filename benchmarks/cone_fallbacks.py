"""How often the batched cone interior point method leaves an element to its Clarabel fallback.

For each cone kind, ``--count`` random feasible programs (``cone.testing.random_program``, the
test suite's generator, each with zero-cone rows as well) are solved by
``solve_cone(solver="ipm")``. Counted: the elements the interior point method itself does not
return SOLVED (most are INACCURATE stalls near a cone's boundary, which the Newton refinement
then finishes), and those still unsolved after the refinement, which go to Clarabel; those SOLVED
whose refinement stalled, which are solved again at a tighter tolerance (``autograd._tightened``); the
interior point iterations of each batch of ``BATCH`` (the loop runs until its slowest element
stops); and the largest distance max|x - x_clarabel| / (1 + max|x_clarabel|) to Clarabel's
solution (clarabel alone, refined) over the elements the interior point method itself returned
SOLVED (before the refinement) and over all elements after the whole ``solve_cone``.

    PYTHONPATH=src python benchmarks/cone_fallbacks.py [--count 1000] [--kinds exp exp_dual] [--tol 1e-8] [--json FILE]
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

import torch

from optlayers.cone import autograd, solve_cone
from optlayers.cone.interior import solver as interior_solver
from optlayers.cone.spec import ConeSpec
from optlayers.cone.testing import random_program
from optlayers.cone.status import ConeStatus

KINDS = {
    "nonneg": ConeSpec(zero=2, nonneg=8),
    "soc": ConeSpec(zero=2, soc=[4, 3, 3]),
    "psd": ConeSpec(zero=2, psd=[3, 1, 2, 2]),
    "exp": ConeSpec(zero=2, exp=3),
    "exp_dual": ConeSpec(zero=2, exp_dual=3),
}
N = 6
BATCH = 250
INACCURATE_TOL = interior_solver.ConeIPMSettings().inaccurate_tol


def fallbacks(spec: ConeSpec, count: int, tol: float | None = None) -> dict:
    """Outcomes of ``count`` programs of ``spec`` solved in batches of ``BATCH`` (seeds 0, 1, ...);
    ``tol``: the interior point method's (``ConeIPMSettings.tol``; None: its default)."""
    statuses, to_clarabel, final, retried = collections.Counter(), [0], collections.Counter(), [0]
    raw, steps = [], [0]
    original = autograd._fall_back

    def spy(*args):  # the statuses after the interior point method and the refinement
        to_clarabel[0] += int((args[-1] != ConeStatus.SOLVED).sum())
        return original(*args)

    original_solve = autograd._solve

    def solve_spy(A, b, c, P, settings):  # the interior point method's own statuses
        out = original_solve(A, b, c, P, settings)
        if settings.solver == "ipm":
            statuses.update(ConeStatus(int(code)).name for code in out[-1])
            raw.append((out[0], out[-1]))
        return out

    original_tightened = autograd._tightened

    def tightened_spy(*args):  # the stalled refinements of the interior point method's answers
        if args[4].solver == "ipm":
            retried[0] += int(args[-1].sum())
        return original_tightened(*args)

    original_step = interior_solver._step

    def step_spy(*args):  # counts the loop's iterations
        steps[0] += 1
        return original_step(*args)

    iterations, raw_error, final_error = [], 0.0, 0.0
    start = time.perf_counter()
    autograd._fall_back, autograd._solve, interior_solver._step = spy, solve_spy, step_spy
    autograd._tightened = tightened_spy
    try:
        for seed in range(0, -(-count // BATCH)):
            size = min(BATCH, count - seed * BATCH)
            A, b, c, *_ = random_program(spec, N, batch=size, seed=seed)
            steps[0] = 0
            options = {} if tol is None else {"tol": tol, "inaccurate_tol": max(tol, INACCURATE_TOL)}
            solution = solve_cone(A, b, c, spec, solver="ipm", solver_options=options)
            iterations.append(steps[0])
            final.update(ConeStatus(int(code)).name for code in solution.status)
            reference = solve_cone(A, b, c, spec, solver="clarabel").x
            x_raw, status_raw = raw[-1]
            solved = status_raw == ConeStatus.SOLVED
            raw_error = max(raw_error, float(torch.cat([_distance(x_raw[solved], reference[solved]), x_raw.new_zeros(1)]).amax()))
            final_error = max(final_error, float(_distance(solution.x, reference).amax()))
    finally:
        autograd._fall_back, autograd._solve, interior_solver._step = original, original_solve, original_step
        autograd._tightened = original_tightened
    return {"programs": count, "ipm_unsolved": count - statuses["SOLVED"], "ipm_statuses": dict(statuses),
            "to_clarabel": to_clarabel[0], "per_1000": 1000 * to_clarabel[0] / count, "solved_again": retried[0],
            "final": dict(final),
            "batch_iterations": iterations, "ipm_solved_distance_to_clarabel": raw_error,
            "final_distance_to_clarabel": final_error, "seconds": time.perf_counter() - start}


def _distance(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """max|x - reference| / (1 + max|reference|) per row."""
    return (x - reference).abs().amax(-1) / (1 + reference.abs().amax(-1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=list(KINDS),
                        help="cone kinds to run (default: all)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--tol", type=float, default=None,
                        help="the interior point method's tolerance (ConeIPMSettings.tol; default: its default)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count must be >= 1, got {args.count}")
    if args.tol is not None and not 0 < args.tol < 1:
        parser.error(f"--tol must be in (0, 1), got {args.tol}")
    rows = {kind: fallbacks(KINDS[kind], args.count, args.tol) for kind in args.kinds}
    print("| cone | programs | not SOLVED by the IPM | to Clarabel after refinement | per 1,000 | solved again "
          "| final statuses | iterations per batch | distance to Clarabel: IPM SOLVED, final |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, row in rows.items():
        print(f"| {kind} | {row['programs']} | {row['ipm_unsolved']} | {row['to_clarabel']} | {row['per_1000']:.1f} | "
              f"{row['solved_again']} | {row['final']} | {row['batch_iterations']} | {row['ipm_solved_distance_to_clarabel']:.1e}, "
              f"{row['final_distance_to_clarabel']:.1e} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
