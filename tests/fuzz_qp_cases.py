"""Random QP batches whose right outcome is known by construction, and a solver-independent check.

A case is a small dict of integers and floats (``draw_case`` builds it from a hypothesis draw), so
a failing case can be written down and rebuilt exactly with ``build_case``. Each batch element is
one of:

- ``solvable``: a point z0 with multipliers (λ0 ≥ 0 on an active set, ν0) satisfies the KKT
  conditions by construction, so an optimum exists (Q may be singular or zero);
- ``infeasible_ineq``: two inequality rows gᵀz ≤ gᵀz0 − 1 and −gᵀz ≤ −gᵀz0 − 1 contradict;
- ``infeasible_eq``: an equality row repeated with a different right-hand side;
- ``unbounded``: a direction d with Qd = 0, Ad = 0, Gd ≤ 0 and pᵀd < 0 from a feasible z0.

Any element may have a rank-deficient (or zero) Q, duplicated inequality rows and redundant
(linearly dependent, consistent) equality rows. The batch is then rescaled without changing any
element's outcome: the objective by σ, each constraint row by its own factor and each variable
by its own factor (z = D y), with factors 10^u for u drawn up to ±6 decades.

``kkt_residuals`` measures the KKT residuals of the returned (z, λ, ν, s) in float64 from the
data, each relative to the size of the terms it sums: normwise (the measure the solver's
tolerance is stated in, which decides) and row by row (recorded: stricter under scaling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from optlayers import QPStatus, solve_qp

KINDS = ("solvable", "infeasible_ineq", "infeasible_eq", "unbounded")
EXPECTED = {"solvable": "SOLVED", "infeasible_ineq": "PRIMAL_INFEASIBLE", "infeasible_eq": "PRIMAL_INFEASIBLE",
            "unbounded": "DUAL_INFEASIBLE"}
# A SOLVED element must have every relative KKT residual below this (the solver's own criterion is
# 1e-12 relative; rounding in float64 of sums over terms up to 1e6 apart costs a few digits).
KKT_TOL = 1e-7
# Sizes below this count as this: a residual of 1e-11 counts as zero whatever its terms (ten
# times the solver's own absolute tolerance, 1e-12: e.g. a slack of 1e-12 on a zero row 0 <= 0).
ABS_FLOOR = 1e-11 / KKT_TOL


def draw_case(draw) -> dict:
    """A case description from a hypothesis ``draw`` (see ``cases`` in the tests)."""
    from hypothesis import strategies as st

    n = draw(st.integers(1, 8))
    k = draw(st.integers(0, 10))
    m = draw(st.integers(0, 4))
    kinds = ["solvable"] + (["infeasible_ineq"] if k >= 2 else []) + (["infeasible_eq"] if m >= 2 else []) + ["unbounded"]
    batch = draw(st.integers(1, 4))
    elements = []
    for _ in range(batch):
        elements.append({
            "kind": draw(st.sampled_from(kinds)),
            "rank": draw(st.integers(0, n)),
            "duplicate_rows": draw(st.booleans()),
            "redundant_eq": draw(st.booleans()),
        })
    return {
        "seed": draw(st.integers(0, 2**32 - 1)), "n": n, "k": k, "m": m, "elements": elements,
        "objective_decades": draw(st.floats(-6, 6)),
        "row_decades": draw(st.floats(0, 6)),
        "column_decades": draw(st.floats(0, 6)),
    }


@dataclass
class Batch:
    Q: np.ndarray
    p: np.ndarray
    G: np.ndarray
    h: np.ndarray
    A: np.ndarray
    b: np.ndarray
    expected: list[str]


def _dyadic(rng: np.random.Generator, *shape: int, low: int = -8, high: int = 8) -> np.ndarray:
    """Random multiples of 1/4 in [low/4, high/4]: sums of their products are exact in float64."""
    return rng.integers(low, high + 1, shape).astype(np.float64) / 4


def _element(rng: np.random.Generator, n: int, k: int, m: int, spec: dict) -> tuple[np.ndarray, ...]:
    """One element, every relation that decides its outcome exact in float64 (dyadic data)."""
    kind = spec["kind"]
    # the unbounded direction d = e_j - e_l (d = e_0 when n = 1): Qd = 0, Ad = 0, Gd <= 0, p·d = -1
    j, l = (rng.choice(n, 2, replace=False) if n > 1 else (0, None))
    L = _dyadic(rng, n, spec["rank"])
    A = _dyadic(rng, m, n)
    if spec["redundant_eq"] and m >= 2:
        A[-1] = A[0] * 2.0 - A[1 % (m - 1)]  # a consistent dependent row (b follows from z0)
    G = _dyadic(rng, k, n)
    if spec["duplicate_rows"] and k >= 2:
        G[-1] = G[0]
    if kind == "unbounded":
        if l is None:
            L[:] = 0.0
            A[:, 0] = 0.0
            G[:, 0] = -_dyadic(rng, k, low=0, high=4)
        else:
            L[j] = L[l]
            A[:, j] = A[:, l]
            G[:, j] = G[:, l] - _dyadic(rng, k, low=0, high=4)
    Q = L @ L.T / 4
    z0 = _dyadic(rng, n)
    active = rng.random(k) < 0.5
    s0 = np.where(active, 0.0, _dyadic(rng, k, low=1, high=4))
    if spec["duplicate_rows"] and k >= 2:
        s0[-1] = s0[0]
        active[-1] = active[0]
    lam0 = np.where(active, _dyadic(rng, k, low=1, high=6), 0.0)
    nu0 = _dyadic(rng, m)
    h = G @ z0 + s0
    b = A @ z0
    if kind == "infeasible_ineq":
        g = _dyadic(rng, n)
        g[0] = 1.0 if not g.any() else g[0]
        G[-2], G[-1] = g, -g
        h[-2], h[-1] = g @ z0 - 1.0, -(g @ z0) - 1.0
    if kind == "infeasible_eq":
        if not A[0].any():
            A[0, 0] = 1.0
            b[0] = z0[0]
        A[-1], b[-1] = A[0], b[0] + 1.0
    # (z0, lam0, nu0) satisfies stationarity exactly: the dual is feasible, so an infeasible element
    # is primal infeasible only, and a feasible one has an optimum (z0 itself when feasible)
    p = -(Q @ z0 + G.T @ lam0 + A.T @ nu0)
    if kind == "unbounded":
        p = _dyadic(rng, n)
        if l is None:
            p[0] = -1.0
        else:
            p[j] = p[l] - 1.0
    return Q, p, G, h, A, b


def _powers_of_two(rng: np.random.Generator, decades: float, shape) -> np.ndarray:
    """Factors 2^e with 2^|e| up to 10^decades: scaling by them is exact."""
    bits = decades * math.log2(10)
    return np.exp2(np.round(rng.uniform(-bits, bits, shape)))


def build_case(case: dict) -> Batch:
    """The batch a case describes (numpy float64), with each element's expected status name."""
    rng = np.random.default_rng(case["seed"])
    n, k, m = case["n"], case["k"], case["m"]
    parts = [_element(rng, n, k, m, spec) for spec in case["elements"]]
    Q, p, G, h, A, b = (np.stack(x) for x in zip(*parts))
    batch = len(parts)
    sigma = float(np.exp2(np.round(case["objective_decades"] * math.log2(10))))
    rows_g = _powers_of_two(rng, case["row_decades"], (batch, k))
    rows_a = _powers_of_two(rng, case["row_decades"], (batch, m)) * rng.choice([-1.0, 1.0], (batch, m))
    cols = _powers_of_two(rng, case["column_decades"], (batch, n))
    Q = sigma * cols[:, :, None] * Q * cols[:, None, :]
    p = sigma * cols * p
    G = rows_g[:, :, None] * G * cols[:, None, :]
    h = rows_g * h
    A = rows_a[:, :, None] * A * cols[:, None, :]
    b = rows_a * b
    return Batch(Q, p, G, h, A, b, [EXPECTED[spec["kind"]] for spec in case["elements"]])


def solve(batch: Batch, index: int | slice = slice(None)):
    """solve_qp on the batch (or one element), failures reported through the status only."""
    def t(x):
        return torch.from_numpy(np.ascontiguousarray(x[index]))
    G, h = (t(batch.G), t(batch.h)) if batch.G.shape[1] else (None, None)
    A, b = (t(batch.A), t(batch.b)) if batch.A.shape[1] else (None, None)
    return solve_qp(t(batch.Q), t(batch.p), G, h, A, b, on_failure="ignore")


def _relative(residual: np.ndarray, *terms: np.ndarray, rowwise: bool) -> float:
    """|residual| relative to the size of the terms it sums (given as |.|, each the size of that
    term row by row): row by row, or as whole vectors in the infinity norm (the solver's measure)."""
    if residual.size == 0:
        return 0.0
    if rowwise:
        size = np.maximum(np.max(np.stack(terms), axis=0), ABS_FLOOR)
        return float(np.max(np.abs(residual) / size))
    return float(np.max(np.abs(residual)) / max(max(float(np.max(t)) for t in terms), ABS_FLOOR))


def kkt_residuals(batch: Batch, i: int, z: np.ndarray, lam: np.ndarray, nu: np.ndarray, s: np.ndarray,
                  rowwise: bool = False) -> dict:
    """Relative KKT residuals of element i's answer, computed here in float64 from the data.

    Normwise (default): each residual vector's infinity norm relative to the largest of its terms,
    the measure the solver's tolerance is stated in (the primal residual as one vector over the
    inequality and the equality rows). ``rowwise``: each row relative to its own
    terms, a stricter measure that no scaling of the rows or variables can hide behind.
    """
    Q, p, G, h, A, b = batch.Q[i], batch.p[i], batch.G[i], batch.h[i], batch.A[i], batch.b[i]
    aQ, aG, aA = np.abs(Q), np.abs(G), np.abs(A)
    az, alam, anu = np.abs(z), np.abs(lam), np.abs(nu)
    stationarity = _relative(Q @ z + p + G.T @ lam + A.T @ nu, aQ @ az, np.abs(p), aG.T @ alam, aA.T @ anu,
                             rowwise=rowwise)
    inequality_terms, equality_terms = (aG @ az, np.abs(s), np.abs(h)), (aA @ az, np.abs(b))
    if not rowwise:
        # the solver measures its primal residual as one vector, [Az − b; Gz + s − h], against the
        # largest term of either block: each block here against that size (a slack of 1e-8 on a
        # row 0·z ≤ 0 beside an equality whose right-hand side is 1e4 is within tolerance)
        size = max((float(np.max(t)) for t in inequality_terms + equality_terms if t.size), default=0.0)
        inequality_terms, equality_terms = inequality_terms + (np.array([size]),), equality_terms + (np.array([size]),)
    inequality = _relative(G @ z + s - h, *inequality_terms, rowwise=rowwise)
    equality = _relative(A @ z - b, *equality_terms, rowwise=rowwise)
    # sign conditions: s, λ ≥ 0 up to the size of their terms; complementarity per pair and the
    # gap relative to the products that make up the objective, each measured before it cancels
    # (pᵀz as |p|ᵀ|z|: an LP whose optimal value is 0 sums terms of 1e5 to 1e-11)
    if G.shape[0]:
        row_size = np.maximum(np.maximum(aG @ az, np.abs(h)), ABS_FLOOR)
        row_size = row_size if rowwise else np.full_like(row_size, row_size.max())
    else:
        row_size = np.zeros(0)
    lam_size = max(float(alam.max(initial=0.0)), ABS_FLOOR)
    sign = max(float(np.max(-s / row_size, initial=0.0)), float(np.max(-lam / lam_size, initial=0.0)))
    objective_size = max(az @ aQ @ az, np.abs(p) @ az, np.abs(b) @ anu, np.abs(h) @ alam, ABS_FLOOR)
    complementarity = float(np.max(np.abs(s * lam), initial=0.0)) / objective_size
    gap = abs(z @ Q @ z + p @ z + b @ nu + h @ lam) / objective_size
    return {"stationarity": stationarity, "inequality": inequality, "equality": equality, "sign": sign,
            "complementarity": float(complementarity), "gap": float(gap)}


def _same_optimum(batch, i: int, z: np.ndarray, z_alone: np.ndarray) -> bool:
    """Whether two solutions of element ``i`` (in its batch and alone) have the same objective
    ½zᵀQz + pᵀz to KKT_TOL relative to the size of its terms: where Q is singular the optimum
    need not be unique, and the batch's rounding may pick another point of the optimal face
    (the solution in the batch has passed the KKT test already)."""
    Q, p = batch.Q[i], batch.p[i]
    objective = [0.5 * u @ Q @ u + p @ u for u in (z, z_alone)]
    size = max(max(np.abs(u) @ np.abs(Q) @ np.abs(u), np.abs(p) @ np.abs(u)) for u in (z, z_alone))
    return abs(objective[0] - objective[1]) <= KKT_TOL * max(size, ABS_FLOOR)


def outcomes(case: dict, compare_alone: bool = True) -> list[dict]:
    """Solve a case's batch and judge each element. Each outcome has ``verdict``:

    - ``ok``: SOLVED as expected, residuals within KKT_TOL; or the expected failure status;
    - ``bad_residual``: reported SOLVED but some residual exceeds KKT_TOL (or not finite);
    - ``wrong_status``: a definite status (SOLVED or an infeasibility) other than the expected one;
    - ``gave_up``: MAX_ITER, NUMERICAL_ERROR or INACCURATE where another outcome was expected;
    - ``leak``: the element's status in the batch differs from its own solved alone, or its
      solution does, unless both are optima of the same value (``_same_optimum``).
    """
    batch = build_case(case)
    sol = solve(batch)
    results = []
    mixed = len(set(batch.expected)) > 1
    for i, expected in enumerate(batch.expected):
        got = QPStatus(int(sol.status[i])).name
        outcome = {"index": i, "expected": expected, "got": got}
        if got == "SOLVED":
            arrays = [getattr(sol, name)[i].numpy() for name in ("z", "lam", "nu", "s")]
            if not all(np.isfinite(a).all() for a in arrays):
                outcome.update(verdict="bad_residual", residuals={"finite": False})
                results.append(outcome)
                continue
            res = kkt_residuals(batch, i, *arrays)
            outcome["residuals"] = res
            outcome["rowwise_worst"] = max(kkt_residuals(batch, i, *arrays, rowwise=True).values())
            worst = max(res.values())
            if expected != "SOLVED":
                outcome["verdict"] = "wrong_status"
            elif not worst <= KKT_TOL:
                outcome["verdict"] = "bad_residual"
            else:
                outcome["verdict"] = "ok"
        elif got == expected:
            outcome["verdict"] = "ok"
        elif got in ("MAX_ITER", "NUMERICAL_ERROR", "INACCURATE"):
            outcome["verdict"] = "gave_up"
        else:
            outcome["verdict"] = "wrong_status"
        if compare_alone and mixed and len(batch.expected) > 1:
            single = solve(batch, slice(i, i + 1))
            alone = QPStatus(int(single.status[0])).name
            if alone != got:
                outcome.update(verdict="leak", alone=alone)
            elif (got == "SOLVED" and not torch.allclose(sol.z[i], single.z[0], rtol=1e-9, atol=1e-9 * float(single.z.abs().max()))
                  and not _same_optimum(batch, i, sol.z[i].numpy(), single.z[0].numpy())):
                outcome.update(verdict="leak", alone=alone, z_difference=float((sol.z[i] - single.z[0]).abs().max()))
        results.append(outcome)
    return results


def describe(case: dict) -> str:
    """The case as Python literal text, to paste into a regression test."""
    return repr(case)


def worst_residual(outcome: dict) -> float:
    res = outcome.get("residuals") or {}
    values = [v for v in res.values() if isinstance(v, float)]
    return max(values) if values else math.nan
