"""Interior point iterations of ``solve_qp`` against Clarabel's on the sweep's random QPs.

A solve's time at n = 100 is its iterations times the arithmetic of one (forming H and factorising
it), so an interior point method that needs fewer iterations is the lever there: this prints how
many ours takes (its defaults) beside Clarabel's (its defaults: gaps and feasibility at 1e-8), per
problem of ``benchmarks.problems.random_qp`` (the sweep's problems: n inequalities, no equalities),
with their mean, largest and histogram.

    PYTHONPATH=src python benchmarks/iteration_counts.py --batch 32 --n 10 50 100 [--json F]
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the benchmarks package
from benchmarks import machine  # noqa: E402
from benchmarks.problems import random_qp  # noqa: E402
from benchmarks.qp_benchmark import _git_commit  # noqa: E402
from optlayers import solve_qp  # noqa: E402


def clarabel_iterations(Q: np.ndarray, p: np.ndarray, G: np.ndarray, h: np.ndarray) -> tuple[int, str]:
    """Clarabel's iterations and status for min ½zᵀQz + pᵀz s.t. Gz ≤ h, at its default settings."""
    import clarabel

    settings = clarabel.DefaultSettings()
    settings.verbose = False
    solver = clarabel.DefaultSolver(sp.csc_matrix(np.triu(Q)), p, sp.csc_matrix(G), h,
                                    [clarabel.NonnegativeConeT(G.shape[0])], settings)
    result = solver.solve()
    return int(result.iterations), str(result.status)


def counts(batch: int, n: int, seed: int) -> dict:
    """Both solvers' iterations on ``random_qp(batch, n, n, seed=seed)``."""
    qp = random_qp(batch, n, n, 0, seed=seed)
    ours = solve_qp(qp.Q, qp.p, qp.G, qp.h, on_failure="ignore")
    theirs = [clarabel_iterations(*(t[i].numpy() for t in (qp.Q, qp.p, qp.G, qp.h))) for i in range(batch)]
    return {"batch": batch, "n": n, "seed": seed,
            "ours": ours.iterations.tolist(), "ours_solved": int((ours.status == 0).sum()),
            "clarabel": [it for it, _ in theirs], "clarabel_solved": sum(status == "Solved" for _, status in theirs)}


def summary(iterations: list[int]) -> str:
    """Mean, largest and the histogram (iterations: problems) of a list of counts."""
    values, times = np.unique(iterations, return_counts=True)
    spread = ", ".join(f"{v}: {t}" for v, t in zip(values, times))
    return f"mean {np.mean(iterations):.2f}, most {max(iterations)} ({spread})"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--n", type=int, nargs="+", default=[10, 50, 100])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args(argv)
    if args.batch < 1 or any(n < 1 for n in args.n):
        parser.error(f"--batch and --n must be positive, got {args.batch} and {args.n}")
    rows = [counts(args.batch, n, args.seed) for n in args.n]
    print(f"| n | ours (solved of {args.batch}) | Clarabel (solved) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['n']} | {summary(row['ours'])} ({row['ours_solved']}) | "
              f"{summary(row['clarabel'])} ({row['clarabel_solved']}) |")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": _git_commit(),
            "cpu": machine.cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    result = {"meta": meta, "args": vars(args), "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
