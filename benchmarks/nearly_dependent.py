"""Equality rows nearly dependent: LPs whose rows include copies of others 2^-k apart, solved by
``solve_qp`` and by Clarabel on the data as given, both judged against the exact problem.

Each LP (n from 3 to 13, a box around an integer point z, a dyadic objective) has m0 random dyadic
equality rows that z satisfies and copies of some of them with integer noise of 2^-k (k drawn from
the range), so that A z = b holds exactly. The copies' differences are constraints of their own at
any k: the same feasible set is written with well-conditioned rows (the original rows and the
differences scaled to unit size, exact in floating point), and Clarabel at tolerances of 1e-12 on
those rows gives the reference objective. Printed per range of k: ``solve_qp``'s statuses and the
objective's relative error of its SOLVED answers (|f − f*| / max(1, |f*|)), and Clarabel's (default
settings) on the given rows.

    PYTHONPATH=src python -m benchmarks.nearly_dependent [--problems 100] [--json FILE]
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import warnings

import numpy as np
import torch

from benchmarks.machine import cpu_model

RANGES = ((8, 11), (12, 15), (16, 19), (20, 23), (24, 27), (28, 33), (34, 40))


def problem(seed: int, low: int, high: int) -> dict[str, np.ndarray]:
    """One LP of the family (module docstring), with ``rows`` and ``sides``: the same feasible set's
    well-conditioned rows."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 14))
    z = rng.integers(-4, 5, n).astype(float)
    m0 = int(rng.integers(1, n // 2 + 1))
    A0 = np.round(rng.standard_normal((m0, n)) * 2**10) / 2**10
    copies = rng.integers(0, m0, int(rng.integers(1, m0 + 1)))
    noise = rng.integers(-3, 4, (len(copies), n)).astype(float)
    A = np.vstack([A0, A0[copies] + noise * 2.0 ** -int(rng.integers(low, high + 1))])
    G = np.vstack([np.eye(n), -np.eye(n)])
    h = np.concatenate([z + rng.integers(1, 4, n) / 2, -z + rng.integers(1, 4, n) / 2])
    p = np.round(rng.standard_normal(n) * 2**8) / 2**8
    differences = noise[np.abs(noise).max(1) > 0]
    rows = np.vstack([A0, differences / np.abs(differences).max(1, keepdims=True)])
    return {"Q": np.zeros((n, n)), "p": p, "G": G, "h": h, "A": A, "b": A @ z, "rows": rows, "sides": rows @ z}


def clarabel_objective(lp: dict, rows: np.ndarray, sides: np.ndarray, tight: bool) -> tuple[str, float]:
    import clarabel
    import scipy.sparse as sp

    settings = clarabel.DefaultSettings()
    settings.verbose = False
    if tight:
        settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = 1e-12
    M = sp.csc_matrix(np.vstack([rows, lp["G"]]))
    cones = [clarabel.ZeroConeT(len(sides)), clarabel.NonnegativeConeT(len(lp["h"]))]
    result = clarabel.DefaultSolver(sp.csc_matrix(lp["Q"]), lp["p"], M, np.concatenate([sides, lp["h"]]), cones,
                                    settings).solve()
    return str(result.status), float(lp["p"] @ np.array(result.x))


def run(problems: int) -> list[dict]:
    from optlayers import Status, solve_qp

    torch.set_num_threads(1)
    out = []
    for low, high in RANGES:
        statuses, ours, theirs, references = collections.Counter(), [], [], collections.Counter()
        for seed in range(problems):
            lp = problem(seed, low, high)
            status, exact = clarabel_objective(lp, lp["rows"], lp["sides"], tight=True)
            references[status] += 1
            scale = max(1.0, abs(exact))
            sol = solve_qp(*(torch.tensor(lp[name]) for name in ("Q", "p", "G", "h", "A", "b")), on_failure="ignore")
            statuses[Status(int(sol.status)).name] += 1
            if int(sol.status) == Status.SOLVED:
                ours.append(abs(float(lp["p"] @ sol.z.numpy()) - exact) / scale)
            status, given = clarabel_objective(lp, lp["A"], lp["b"], tight=False)
            if status in ("Solved", "AlmostSolved"):
                theirs.append(abs(given - exact) / scale)
        out.append({"noise": f"2^-{low}..2^-{high}", "problems": problems, "references": dict(references),
                    "optlayers": dict(statuses), "optlayers_errors": _errors(ours), "clarabel_errors": _errors(theirs)})
    return out


def _errors(errors: list[float]) -> dict:
    if not errors:
        return {"answers": 0}
    return {"answers": len(errors), "max": max(errors), "median": float(np.median(errors)),
            "above_1e-6": sum(e > 1e-6 for e in errors)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=100, help="LPs per range of the noise (default 100)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    if args.problems < 1:
        parser.error(f"--problems must be positive, got {args.problems}")
    warnings.filterwarnings("ignore")
    rows = run(args.problems)
    print(f"{cpu_model()}, torch {torch.__version__}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print("| copies apart | solve_qp statuses | its SOLVED answers' error: max, median, > 1e-6 "
          "| Clarabel (default) on the given rows: max, median, > 1e-6 |")
    print("|---|---|---|---|")
    for row in rows:
        ours, theirs = row["optlayers_errors"], row["clarabel_errors"]
        cell = lambda e: f"{e['max']:.1e}, {e['median']:.1e}, {e['above_1e-6']} of {e['answers']}" if e["answers"] else "-"  # noqa: E731
        print(f"| {row['noise']} | {row['optlayers']} | {cell(ours)} | {cell(theirs)} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
