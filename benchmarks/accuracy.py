"""Solver-independent accuracy of a batch of solutions: KKT residuals, distance to a tight reference,
and the error of a solver's gradients against the reference's own derivative."""
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
STRICT_COMPLEMENTARITY = 1e-6
"""An element's reference derivative is used only where every inequality has a slack or a multiplier
above this (strict complementarity): there the active set is unambiguous and z*(p, h) is differentiable."""
MAX_CONDITION = 1e10
"""Nor where the reduced KKT matrix of the active constraints is this ill-conditioned (or singular)."""


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
    gradient: float | None = None
    """max |∇ − ∇*|∞ of ⟨w, z⟩'s gradients w.r.t. p and h over ``gradient_checked`` elements (None: not measured)."""
    gradient_checked: int = 0

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


@dataclass(frozen=True)
class Reference:
    """Clarabel's solution of each element: z (batch, n), inequality multipliers lam (batch, k) and
    equality multipliers nu (batch, m), with Qz + p + Gᵀλ + Aᵀν = 0."""

    z: np.ndarray
    lam: np.ndarray
    nu: np.ndarray


def reference_solutions(qp: QPBatch) -> Reference:
    """Every element solved by Clarabel (interior point, float64) at the tightest of ``REFERENCE_TOLS`` that solves it."""
    import clarabel

    Q, p, G, h, A, b = _numpy(qp)
    ladder = [_clarabel_settings(tol) for tol in REFERENCE_TOLS]
    cones = ([] if A is None else [clarabel.ZeroConeT(qp.n_eq)]) + [clarabel.NonnegativeConeT(qp.n_ineq)]
    solutions, duals = [], []
    for i in range(qp.batch):
        constraints = sp.csc_matrix(G[i] if A is None else np.vstack([A[i], G[i]]))
        rhs = h[i] if A is None else np.concatenate([b[i], h[i]])
        for settings in ladder:
            solution = clarabel.DefaultSolver(sp.csc_matrix(np.triu(Q[i])), p[i], constraints, rhs, cones, settings).solve()
            if solution.status == clarabel.SolverStatus.Solved:
                break
        solutions.append(np.asarray(solution.x))
        duals.append(np.asarray(solution.z))
    duals = np.stack(duals)
    return Reference(np.stack(solutions), duals[:, qp.n_eq:], duals[:, :qp.n_eq])


def reference_gradients(qp: QPBatch, reference: Reference, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The gradients of ⟨weights, z*⟩ w.r.t. p and h at the reference solution, and which elements have them.

    Where the active set is unambiguous (``STRICT_COMPLEMENTARITY``), z* is locally the solution of the
    equality-constrained QP of the active rows C = [A; G_act]: with M = [[Q, Cᵀ], [C, 0]] and
    M [x; y] = [weights; 0], ∇p = −x, ∇h = y on the active rows and 0 elsewhere. This derivative
    comes from the reference solver's active set alone, independently of any layer's backward.
    Returns (grad_p (batch, n), grad_h (batch, k), usable (batch,) bool)."""
    Q, p, G, h, A, b = _numpy(qp)
    grad_p, grad_h = np.full(p.shape, np.nan), np.full(h.shape, np.nan)
    usable = np.zeros(qp.batch, dtype=bool)
    for i in range(qp.batch):
        slack = h[i] - G[i] @ reference.z[i]
        if np.maximum(slack, reference.lam[i]).min(initial=np.inf) < STRICT_COMPLEMENTARITY:
            continue
        active = reference.lam[i] > slack
        C = G[i][active] if A is None else np.vstack([A[i], G[i][active]])
        M = np.block([[Q[i], C.T], [C, np.zeros((C.shape[0], C.shape[0]))]])
        if np.linalg.cond(M) > MAX_CONDITION:
            continue
        solution = np.linalg.solve(M, np.concatenate([weights[i], np.zeros(C.shape[0])]))
        grad_p[i] = -solution[:qp.n]
        grad_h[i] = 0.0
        grad_h[i][active] = solution[qp.n + qp.n_eq:]
        usable[i] = True
    return grad_p, grad_h, usable


def gradient_error(grads: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[float, int]:
    """max |∇ − ∇*|∞ over p's and h's gradients of the usable elements with finite gradients, and how many those are."""
    (grad_p, grad_h), (ref_p, ref_h, usable) = grads, reference
    finite = np.isfinite(grad_p).all(axis=1) & np.isfinite(grad_h).all(axis=1)
    rows = usable & finite
    if not rows.any():
        return float("nan"), 0
    error = max(np.abs(grad_p[rows] - ref_p[rows]).max(), np.abs(grad_h[rows] - ref_h[rows]).max())
    return float(error), int(rows.sum())


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


def kkt_accuracy(qp: QPBatch, z: np.ndarray, reference: Reference) -> Accuracy:
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
        distance.append(np.abs(z[i] - reference.z[i]).max())
    worst = [float(max(values, default=np.nan)) for values in (primal, dual, comp, distance)]
    return Accuracy(*worst, checked=int(z.shape[0]), failed=int((~finite).sum()))
