"""Solve the dense Maros–Meszaros QPs with ``solve_qp`` (float64) and count those solved to 1e-6.

A problem counts as solved when qpbenchmark's primal residual, dual residual and duality gap
(see the data set's README) are all ≤ the tolerance, measured on the returned solution.

QFORPLAN's gap is the sum of terms of ±1.49e10 (xᵀPx and uᵀy⁺ + lᵀy⁻), whose ulp is 1.9e-6: one
ulp more or less in the components of x or y moves the gap by 2.4e-6 (median over random 1-ulp
perturbations of a solution; 2 % of them end ≤ 1e-7). Below about 1e-5 a float64 solution of it
passes the gap test only by how its rounding falls (Clarabel's solution: gap 3.1e-5).

Two more columns show what the solver claims: its own gap (``QPSolution.gap``, |xᵀQx + pᵀx + hᵀλ +
bᵀν| of the solver's form; NaN for the cone layers, whose solutions report none) and that gap at the
returned point in exact arithmetic (``exact_gap``); a SOLVED problem's exact gap is within the
solver's tolerance (tol / 10 unless ``--solver-tol`` says otherwise).

    python benchmarks/maros_meszaros.py [--data DIR] [--tol 1e-6] [--solver-tol T] [--only NAME ...] [--json FILE]
        [--layer qp | cone-ipm | cone-clarabel | cone-auto]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.io
import torch

from optlayers import QPStatus, solve_qp
from optlayers.cone.interior.solver import ConeIPMSettings
from optlayers.cone.qp import solve_qp_cone

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "maros_meszaros_dense"
# qpbenchmark writes "no bound" as ±1e20 (or ±inf); some files store it as 9.999…e19.
INFINITE_BOUND = 1e19


@dataclass(frozen=True)
class MarosMeszarosQP:
    """minimize ½xᵀPx + qᵀx + r subject to l ≤ Ax ≤ u (dense numpy)."""

    name: str
    P: np.ndarray
    q: np.ndarray
    r: float
    A: np.ndarray
    l: np.ndarray
    u: np.ndarray


@dataclass(frozen=True)
class Outcome:
    name: str
    n: int
    rows: int
    status: str
    iterations: int
    primal: float
    dual: float
    gap: float
    seconds: float
    solved: bool
    reported_gap: float = math.nan
    exact_gap: float = math.nan


def load(path: Path) -> MarosMeszarosQP:
    mat = scipy.io.loadmat(path)
    dense = lambda key: np.asarray(mat[key].todense() if hasattr(mat[key], "todense") else mat[key], dtype=np.float64)
    return MarosMeszarosQP(path.stem, dense("P"), dense("q").ravel(), float(np.asarray(mat["r"]).ravel()[0]),
                           dense("A"), dense("l").ravel(), dense("u").ravel())


def to_optlayers(qp: MarosMeszarosQP) -> dict[str, torch.Tensor | None]:
    """Equalities from rows with l = u; each finite side of the other rows is one inequality."""
    l = np.where(qp.l <= -INFINITE_BOUND, -np.inf, qp.l)
    u = np.where(qp.u >= INFINITE_BOUND, np.inf, qp.u)
    eq = l == u
    upper = ~eq & np.isfinite(u)
    lower = ~eq & np.isfinite(l)
    G = np.vstack([qp.A[upper], -qp.A[lower]])
    h = np.concatenate([u[upper], -l[lower]])
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
    P = 0.5 * (qp.P + qp.P.T)
    return {"Q": t(P), "p": t(qp.q), "G": t(G) if len(h) else None, "h": t(h) if len(h) else None,
            "A": t(qp.A[eq]) if eq.any() else None, "b": t(u[eq]) if eq.any() else None,
            "_masks": (eq, upper, lower)}


def multipliers(qp: MarosMeszarosQP, masks: tuple[np.ndarray, ...], nu: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """The multiplier y of l ≤ Ax ≤ u: positive where the upper side is active."""
    eq, upper, lower = masks
    y = np.zeros(len(qp.l))
    y[eq] = nu
    y[upper] += lam[: upper.sum()]
    y[lower] -= lam[upper.sum():]
    return y


def residuals(qp: MarosMeszarosQP, x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """qpbenchmark's primal residual, dual residual and duality gap."""
    ax = qp.A @ x
    finite_u, finite_l = qp.u < INFINITE_BOUND, qp.l > -INFINITE_BOUND
    primal = max(0.0, np.max(np.where(finite_u, ax - qp.u, 0.0), initial=0.0), np.max(np.where(finite_l, qp.l - ax, 0.0), initial=0.0))
    dual = float(np.abs(qp.P @ x + qp.q + qp.A.T @ y).max())
    yp, ym = np.maximum(y, 0.0), np.minimum(y, 0.0)
    # The gap's terms reach 1e8 and cancel to 1e-8 (QSCAGR25), so in float64 their sum carries
    # rounding of the tolerance's size, and a solution passed or failed by chance. It is summed
    # in extended precision: the measurement of the same (float64) solution, not a new criterion.
    wide = np.longdouble
    xw = x.astype(wide)
    terms = [xw @ (qp.P.astype(wide) @ xw), qp.q.astype(wide) @ xw,
             np.sum(np.where(finite_u, qp.u, 0.0).astype(wide) * yp.astype(wide)),
             np.sum(np.where(finite_l, qp.l, 0.0).astype(wide) * ym.astype(wide))]
    gap = abs(sum(terms, wide(0)))
    return float(primal), dual, float(gap)


_SPLITTER = 134217729.0  # Veltkamp's constant for float64, 2**27 + 1


def _two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a * b = p + e exactly (Dekker), elementwise."""
    p = a * b
    t, u = a * _SPLITTER, b * _SPLITTER
    a_hi, b_hi = t - (t - a), u - (u - b)
    a_lo, b_lo = a - a_hi, b - b_hi
    return p, a_lo * b_lo - (((p - a_hi * b_hi) - a_lo * b_hi) - a_hi * b_lo)


def exact_gap(data: dict, z: np.ndarray, lam: np.ndarray, nu: np.ndarray) -> float:
    """The solver's own gap |zᵀQz + pᵀz + hᵀλ + bᵀν| (``QPSolution.gap``) at the returned point, in
    exact arithmetic (error-free products, ``math.fsum``) and rounded once: what the reported gap
    claims to measure."""
    Q, p = data["Q"].numpy(), data["p"].numpy()
    hi, lo = _two_product(z[:, None], Q)  # z_i Q_ij = hi + lo
    parts = [*_two_product(hi, z[None, :]), *_two_product(lo, z[None, :])]
    parts += list(_two_product(p, z))
    for key, y in (("h", lam), ("b", nu)):
        if data[key] is not None:
            parts += list(_two_product(data[key].numpy(), y))
    return abs(math.fsum(np.concatenate([part.ravel() for part in parts]).tolist()))


def solve_one(path: Path, tol: float, max_iter: int, layer: str = "qp", solver_tol: float | None = None,
              solver_defaults: bool = False) -> Outcome:
    """One problem through ``solve_qp`` (layer "qp") or as a cone program through ``solve_qp_cone``
    ("cone-ipm": the batched interior point method with its Clarabel fallback; "cone-clarabel"; "cone-auto":
    ``solve_cone``'s default, which runs Clarabel for one program and hands what it leaves unsolved to the method).
    ``solver_tol``: ``solve_qp``'s own tolerance (rel_tol 0); None: a tenth of ``tol``, so that a
    SOLVED problem passes this script's check (``tol``) with a margin. With "cone-ipm", the interior
    point method's relative tolerance (``ConeIPMSettings.tol``; None: its default). ``solver_defaults``:
    ``solve_qp``'s own default tolerances instead (absolute and relative, following the data)."""
    qp = load(path)
    data = to_optlayers(qp)
    masks = data.pop("_masks")
    start = time.perf_counter()
    if layer == "qp":
        tolerances = {} if solver_defaults else {"tol": tol / 10 if solver_tol is None else solver_tol, "rel_tol": 0.0}
        sol = solve_qp(**data, **tolerances, max_iter=max_iter, on_failure="ignore")
        status, iterations = QPStatus(int(sol.status)), int(sol.iterations)
    else:
        options = {} if solver_tol is None or layer != "cone-ipm" else {
            "tol": solver_tol, "inaccurate_tol": max(solver_tol, ConeIPMSettings().inaccurate_tol)}
        sol = solve_qp_cone(data["Q"], data["p"], data["G"], data["h"], data["A"], data["b"],
                            solver=layer.split("-")[1], on_failure="ignore", solver_options=options)
        status, iterations = (QPStatus.SOLVED if int(sol.status) == 0 else QPStatus.NUMERICAL_ERROR), 0
    seconds = time.perf_counter() - start
    if status == QPStatus.SOLVED:
        lam = sol.lam.numpy() if data["h"] is not None else np.zeros(0)
        nu = sol.nu.numpy() if data["b"] is not None else np.zeros(0)
        primal, dual, gap = residuals(qp, sol.z.numpy(), multipliers(qp, masks, nu, lam))
        exact = exact_gap(data, sol.z.numpy(), lam, nu)
    else:
        primal = dual = gap = exact = math.nan
    solved = status == QPStatus.SOLVED and max(primal, dual, gap) <= tol
    reported = float(sol.gap) if layer == "qp" else math.nan  # a cone solution reports no gap of its own
    return Outcome(qp.name, qp.P.shape[0], qp.A.shape[0], status.name.lower(), iterations, primal, dual, gap, seconds, solved,
                   reported, exact)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of the .mat files")
    parser.add_argument("--tol", type=float, default=1e-6, help="success threshold on each residual")
    parser.add_argument("--solver-tol", type=float, default=None,
                        help="solve_qp's tolerance, rel_tol 0 (default: a tenth of --tol), or with --layer cone-ipm "
                             "the cone interior point method's relative one (default: its own)")
    parser.add_argument("--solver-defaults", action="store_true",
                        help="solve_qp's own default tolerances (absolute and relative) in place of --solver-tol's")
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--only", nargs="*", help="problem names to run")
    parser.add_argument("--json", type=Path, help="write the outcomes here")
    parser.add_argument("--layer", choices=("qp", "cone-ipm", "cone-clarabel", "cone-auto"), default="qp",
                        help="the QP layer, or the QP as a cone program (solve_qp_cone) with that forward solver")
    args = parser.parse_args(argv)
    if args.solver_tol is not None and not (0 < args.solver_tol < 1 and args.layer in ("qp", "cone-ipm")):
        parser.error(f"--solver-tol must be in (0, 1) and goes with --layer qp or cone-ipm, got {args.solver_tol} "
                     f"with --layer {args.layer}")
    paths = sorted(args.data.glob("*.mat"))
    if args.only:
        paths = [p for p in paths if p.stem in set(args.only)]
    if not paths:
        print(f"no .mat files found in {args.data}", file=sys.stderr)
        return 2
    outcomes = []
    print(f"{'problem':<10} {'n':>5} {'rows':>5} {'status':<18} {'iter':>4} {'primal':>9} {'dual':>9} {'gap':>9} {'time s':>7}  ok  {'own gap':>9} {'exact':>9}")
    for path in paths:
        o = solve_one(path, args.tol, args.max_iter, args.layer, args.solver_tol, args.solver_defaults)
        outcomes.append(o)
        print(f"{o.name:<10} {o.n:>5} {o.rows:>5} {o.status:<18} {o.iterations:>4} {o.primal:9.1e} {o.dual:9.1e} {o.gap:9.1e} {o.seconds:7.2f}  {'yes' if o.solved else 'NO':>3} {o.reported_gap:9.1e} {o.exact_gap:9.1e}", flush=True)
    solved = sum(o.solved for o in outcomes)
    print(f"\nsolved {solved} of {len(outcomes)} to {args.tol:g}; failed: {', '.join(o.name for o in outcomes if not o.solved) or 'none'}")
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
