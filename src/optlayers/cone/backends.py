"""Forward solve of a batch of cone programs with Clarabel or SCS, in parallel threads.

Both solvers release the GIL while they work, so a thread pool runs the batch in parallel.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from optlayers.cone import nonneg, psd, soc, zero
from optlayers.cone.exp import DUAL_TO_PRIMAL, PRIMAL_TO_DUAL
from optlayers.cone.spec import ConeSpec
from optlayers.cone.status import ConeStatus
from optlayers.engine.cones import svec

SOLVERS = ("clarabel", "scs")
SCS_DEFAULT_EPS = 1e-4  # SCS's own default; Newton refinement (refine.py) then takes the solution to ~1e-13

_CLARABEL_STATUS = {
    "Solved": ConeStatus.SOLVED,
    "AlmostSolved": ConeStatus.INACCURATE,
    "PrimalInfeasible": ConeStatus.PRIMAL_INFEASIBLE,
    "AlmostPrimalInfeasible": ConeStatus.PRIMAL_INFEASIBLE,
    "DualInfeasible": ConeStatus.DUAL_INFEASIBLE,
    "AlmostDualInfeasible": ConeStatus.DUAL_INFEASIBLE,
    "MaxIterations": ConeStatus.MAX_ITER,
    "MaxTime": ConeStatus.MAX_ITER,
}
_SCS_STATUS = {  # SCS's info["status_val"]
    1: ConeStatus.SOLVED,
    2: ConeStatus.INACCURATE,
    -1: ConeStatus.DUAL_INFEASIBLE,
    -6: ConeStatus.DUAL_INFEASIBLE,
    -2: ConeStatus.PRIMAL_INFEASIBLE,
    -7: ConeStatus.PRIMAL_INFEASIBLE,
}


RETURNS_ITERATE = (ConeStatus.SOLVED, ConeStatus.INACCURATE)  # the iterate is returned (to be refined); NaN otherwise


@dataclasses.dataclass(frozen=True)
class Problem:
    """One cone program in numpy: A (m, n) CSC, b (m,), c (n,), P upper triangle CSC or None."""

    A: sp.csc_matrix
    b: np.ndarray
    c: np.ndarray
    P: sp.csc_matrix | None


@dataclasses.dataclass(frozen=True)
class Result:
    """x (n,), y (m,), s (m,) and the outcome of one solve."""

    x: np.ndarray
    y: np.ndarray
    s: np.ndarray
    status: ConeStatus


WarmStart = tuple[np.ndarray, np.ndarray, np.ndarray]


def solve_batch(problems: Sequence[Problem], spec: ConeSpec, solver: str, options: dict,
                warm_starts: Sequence[WarmStart | None] | None = None, max_workers: int | None = None) -> list[Result]:
    """Solve every problem; ``warm_starts`` (x, y, s) per element are used by SCS only."""
    warm_starts = warm_starts or [None] * len(problems)
    single = _clarabel_solve if solver == "clarabel" else _scs_solve
    prepared = _clarabel_prepare(spec) if solver == "clarabel" else spec.scs_cone()
    workers = min(len(problems), max_workers or os.cpu_count() or 1)
    run: Callable[[Problem, WarmStart | None], Result] = functools.partial(single, prepared, options)
    if workers <= 1:
        return [run(p, w) for p, w in zip(problems, warm_starts)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, problems, warm_starts))


def refusal(solver: str, name: str, value: object) -> str | None:
    """Why ``solver`` ("scs" or "clarabel") refuses the setting ``name`` = ``value`` (its own
    message), or None where it accepts it: the setting is tried alone on a program of one variable
    and one nonnegative row, so that a value the solver rejects is reported as the user's setting,
    not as a failed solve (SCS raises on a bad value when the solver is built, which a solve reads
    as a failed factorisation; Clarabel raises on a bad choice of method when it is built, and on an
    integer out of range when it is set). Settings that write files are not tried."""
    if name in ("write_data_filename", "log_csv_filename"):
        return None
    if name == "verbose" and isinstance(value, bool):
        value = False  # a valid value, tried quietly: True would print the solver's banner for this program
    one = sp.csc_matrix(np.ones((1, 1)))
    try:
        if solver == "scs":
            import scs

            scs.SCS({"A": one, "b": np.ones(1), "c": np.zeros(1)}, {"l": 1}, **{"verbose": False, name: value})
        else:
            import clarabel

            settings = clarabel.DefaultSettings()
            settings.verbose = False
            setattr(settings, name, value)
            clarabel.DefaultSolver(sp.csc_matrix((1, 1)), np.zeros(1), one, np.ones(1), [clarabel.NonnegativeConeT(1)],
                                   settings)
    except Exception as error:  # noqa: BLE001 - Clarabel raises a bare Exception("Bad settings: ...")
        return f"{type(error).__name__}: {error}"
    return None


def _failed(problem: Problem, status: ConeStatus) -> Result:
    m, n = problem.A.shape
    return Result(np.full(n, np.nan), np.full(m, np.nan), np.full(m, np.nan), status)


def _scs_solve(cone: dict, options: dict, problem: Problem, warm: WarmStart | None) -> Result:
    import scs

    settings = {"verbose": False, "eps_abs": SCS_DEFAULT_EPS, "eps_rel": SCS_DEFAULT_EPS, **options}
    data = {"A": problem.A, "b": problem.b, "c": problem.c}
    if problem.P is not None:
        data["P"] = problem.P
    try:
        solver = scs.SCS(data, cone, **settings)
    except ValueError:  # SCS could not set up the problem (its KKT factorisation failed: P not PSD, say)
        return _failed(problem, ConeStatus.NUMERICAL_ERROR)
    if warm is None:
        out = solver.solve(warm_start=False)
    else:
        out = solver.solve(warm_start=True, x=warm[0], y=warm[1], s=warm[2])
    status = _SCS_STATUS.get(out["info"]["status_val"], ConeStatus.NUMERICAL_ERROR)
    if status not in RETURNS_ITERATE:
        return _failed(problem, status)
    return Result(out["x"], out["y"], out["s"], status)


@dataclasses.dataclass(frozen=True)
class _ClarabelCones:
    """Clarabel's cone list and the row map T (m, m) from SCS's conventions to Clarabel's (None: identity)."""

    cones: list
    T: sp.csr_matrix | None
    T_inv: sp.csr_matrix | None


_DUAL_EXP_TO_EXP = np.array(DUAL_TO_PRIMAL)


def _clarabel_prepare(spec: ConeSpec) -> _ClarabelCones:
    """Clarabel stores a PSD cone's upper triangle by columns, and has no dual exponential cone:
    rows are permuted for the first, and s in K_exp^* iff (s1 - s2, -s1, s3) in K_exp for the second."""
    import clarabel

    cones, maps, inverses = [], [], []
    for block in spec.blocks():
        rows = block.count * block.size
        forward, inverse = sp.identity(rows, format="csr"), sp.identity(rows, format="csr")
        if block.module is zero:
            cones.append(clarabel.ZeroConeT(rows))
        elif block.module is nonneg:
            cones.append(clarabel.NonnegativeConeT(rows))
        elif block.module is soc:
            cones += [clarabel.SecondOrderConeT(block.size)] * block.count
        elif block.module is psd:
            cones += [clarabel.PSDTriangleConeT(svec.order(block.size))] * block.count
            perm = _psd_permutation(block.size)
            forward = sp.block_diag([perm] * block.count, format="csr")
            inverse = forward.T.tocsr()
        else:
            cones += [clarabel.ExponentialConeT()] * block.count
            if block.dual:
                forward = sp.block_diag([_DUAL_EXP_TO_EXP] * block.count, format="csr")
                inverse = sp.block_diag([np.array(PRIMAL_TO_DUAL)] * block.count, format="csr")
        maps.append(forward)
        inverses.append(inverse)
    if not spec.psd and not spec.exp_dual:
        return _ClarabelCones(cones, None, None)
    return _ClarabelCones(cones, sp.block_diag(maps, format="csr"), sp.block_diag(inverses, format="csr"))


def _psd_permutation(size: int) -> sp.csr_matrix:
    """Rows taking SCS's lower-triangle-by-columns order to Clarabel's upper-triangle-by-columns."""
    d = svec.order(size)
    scs_index = {pair: k for k, pair in enumerate((i, j) for j in range(d) for i in range(j, d))}
    order = [scs_index[(j, i)] for j in range(d) for i in range(j + 1)]
    return sp.identity(size, format="csr")[order]


def _clarabel_solve(prepared: _ClarabelCones, options: dict, problem: Problem, warm: WarmStart | None) -> Result:
    import clarabel

    settings = clarabel.DefaultSettings()
    settings.verbose = False
    for key, value in options.items():
        setattr(settings, key, value)
    n = problem.A.shape[1]
    P = problem.P if problem.P is not None else sp.csc_matrix((n, n))
    A, b = problem.A, problem.b
    if prepared.T is not None:
        A, b = sp.csc_matrix(prepared.T @ A), prepared.T @ b
    out = clarabel.DefaultSolver(P, problem.c, A, b, prepared.cones, settings).solve()
    status = _CLARABEL_STATUS.get(str(out.status), ConeStatus.NUMERICAL_ERROR)
    if status not in RETURNS_ITERATE:
        return _failed(problem, status)
    x, y, s = np.asarray(out.x), np.asarray(out.z), np.asarray(out.s)
    if prepared.T is not None:
        y, s = prepared.T.T @ y, prepared.T_inv @ s
    return Result(x, y, s, status)
