"""How often the batched cone interior point method leaves an element to its Clarabel fallback.

For each cone kind, ``--count`` random feasible programs (``cone.testing.random_program``, the
test suite's generator, each with zero-cone rows as well) are solved by
``solve_cone(solver="ipm")``. Counted: the elements the interior point method itself does not
return SOLVED (most are INACCURATE stalls near a cone's boundary, which the Newton refinement
then finishes), and those still unsolved after the refinement, which go to Clarabel.

    PYTHONPATH=src python benchmarks/cone_fallbacks.py [--count 1000] [--json FILE]
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


def fallbacks(spec: ConeSpec, count: int) -> dict:
    """Outcomes of ``count`` programs of ``spec`` solved in batches of ``BATCH`` (seeds 0, 1, ...)."""
    statuses, to_clarabel, final = collections.Counter(), [0], collections.Counter()
    original = autograd._fall_back

    def spy(*args):  # the statuses after the interior point method and the refinement
        to_clarabel[0] += int((args[-1] != ConeStatus.SOLVED).sum())
        return original(*args)

    original_solve = autograd._solve

    def solve_spy(A, b, c, P, settings):  # the interior point method's own statuses
        out = original_solve(A, b, c, P, settings)
        if settings.solver == "ipm":
            statuses.update(ConeStatus(int(code)).name for code in out[-1])
        return out

    start = time.perf_counter()
    autograd._fall_back, autograd._solve = spy, solve_spy
    try:
        for seed in range(0, -(-count // BATCH)):
            size = min(BATCH, count - seed * BATCH)
            A, b, c, *_ = random_program(spec, N, batch=size, seed=seed)
            final.update(ConeStatus(int(code)).name for code in solve_cone(A, b, c, spec, solver="ipm").status)
    finally:
        autograd._fall_back, autograd._solve = original, original_solve
    return {"programs": count, "ipm_unsolved": count - statuses["SOLVED"], "ipm_statuses": dict(statuses),
            "to_clarabel": to_clarabel[0], "per_1000": 1000 * to_clarabel[0] / count, "final": dict(final),
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = {kind: fallbacks(spec, args.count) for kind, spec in KINDS.items()}
    print("| cone | programs | not SOLVED by the IPM | to Clarabel after refinement | per 1,000 | final statuses |")
    print("|---|---|---|---|---|---|")
    for kind, row in rows.items():
        print(f"| {kind} | {row['programs']} | {row['ipm_unsolved']} | {row['to_clarabel']} | {row['per_1000']:.1f} | "
              f"{row['final']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
