"""Solver-independent accuracy of a batch of solutions: KKT residuals and distance to a tight reference."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import lsq_linear

from benchmarks.problems import QPBatch

REFERENCE_TOLS = (1e-11, 1e-9)
"""Clarabel's gap and feasibility tolerances for the float64 reference, tightest first: 1e-12 sometimes
stalls (InsufficientProgress); the looser one is the fallback for elements the tight one does not solve."""
REFERENCE_MAX_ITER = 500


@dataclass(frozen=True)
class Accuracy:
    """Worst case over the checked batch elements that returned a finite z (float64, absolute);
    ``failed`` counts those that did not (a solver's NaN for "not solved")."""

    primal: float
    dual: float
    complementarity: float
    distance: float
    checked: int
    failed: int

    @property
    def kkt(self) -> float:
        return max(self.primal, self.dual, self.complementarity)

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "kkt": self.kkt}


def _numpy(qp: QPBatch) -> list[np.ndarray | None]:
    return [None if t is None else t.detach().double().cpu().numpy() for t in qp.tensors()]


def _clarabel_settings(tol: float):
    import clarabel

    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.max_iter = REFERENCE_MAX_ITER
    for name in ("tol_gap_abs", "tol_gap_rel", "tol_feas", "tol_ktratio"):
        setattr(settings, name, tol)
    return settings


def reference_solutions(qp: QPBatch) -> np.ndarray:
    """z for every element from Clarabel (interior point, float64) at the tightest of ``REFERENCE_TOLS`` that solves it."""
    import clarabel

    Q, p, G, h, A, b = _numpy(qp)
    ladder = [_clarabel_settings(tol) for tol in REFERENCE_TOLS]
    cones = ([] if A is None else [clarabel.ZeroConeT(qp.n_eq)]) + [clarabel.NonnegativeConeT(qp.n_ineq)]
    solutions = []
    for i in range(qp.batch):
        constraints = sp.csc_matrix(G[i] if A is None else np.vstack([A[i], G[i]]))
        rhs = h[i] if A is None else np.concatenate([b[i], h[i]])
        for settings in ladder:
            solution = clarabel.DefaultSolver(sp.csc_matrix(np.triu(Q[i])), p[i], constraints, rhs, cones, settings).solve()
            if solution.status == clarabel.SolverStatus.Solved:
                break
        solutions.append(np.asarray(solution.x))
    return np.stack(solutions)


def _fit_multipliers(Q, p, G, h, A, z) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers (λ ≥ 0, ν) minimising ‖Qz + p + Gᵀλ + Aᵀν‖² + ‖λ ∘ slack‖²; returns (stationarity, λ ∘ slack)."""
    slack = np.maximum(h - G @ z, 0.0)
    n_ineq = G.shape[0]
    n_eq = 0 if A is None else A.shape[0]
    top = G.T if A is None else np.hstack([G.T, A.T])
    bottom = np.hstack([np.diag(slack), np.zeros((n_ineq, n_eq))])
    lower = np.concatenate([np.zeros(n_ineq), np.full(n_eq, -np.inf)])
    grad = Q @ z + p
    duals = lsq_linear(np.vstack([top, bottom]), np.concatenate([-grad, np.zeros(n_ineq)]), bounds=(lower, np.inf), method="bvls").x
    return grad + top @ duals, duals[:n_ineq] * slack


def kkt_accuracy(qp: QPBatch, z: np.ndarray, reference: np.ndarray) -> Accuracy:
    """KKT residuals of ``z`` with the best multipliers any solver could report, and ‖z − z_ref‖∞.

    Fitting the multipliers makes the measure a function of z alone, so solvers that return no duals
    (or use other sign conventions) are judged the same way. Elements with a non-finite z are counted
    as failed and left out of the maxima (NaN when every element failed).
    """
    Q, p, G, h, A, b = _numpy(qp)
    finite = np.isfinite(z).all(axis=1)
    primal, dual, comp, distance = [], [], [], []
    for i in np.flatnonzero(finite):
        violation = np.maximum(G[i] @ z[i] - h[i], 0.0).max(initial=0.0)
        if A is not None:
            violation = max(violation, np.abs(A[i] @ z[i] - b[i]).max())
        stationarity, products = _fit_multipliers(Q[i], p[i], G[i], h[i], None if A is None else A[i], z[i])
        primal.append(violation)
        dual.append(np.abs(stationarity).max())
        comp.append(np.abs(products).max(initial=0.0))
        distance.append(np.abs(z[i] - reference[i]).max())
    worst = [float(max(values, default=np.nan)) for values in (primal, dual, comp, distance)]
    return Accuracy(*worst, checked=int(z.shape[0]), failed=int((~finite).sum()))
