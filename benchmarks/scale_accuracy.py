"""How the QP solve's answers hold up when the data are far from unit size, against the same
problems at unit size (the exact homogeneities of a QP, no reference solver needed).

A QP is homogeneous in (p, h, b): at (αp, αh, αb) its solution is αz, with the same dz/dp, dz/dh,
dz/db. It is homogeneous in (Q, p) too: at (ωQ, ωp) z is the same, the multipliers are ω times
theirs, dz/dh and dz/db are the same and dz/dQ, dz/dp 1/ω times theirs. For each scale the script
solves a batch of random QPs (n = 6, 10 inequalities, 2 equalities) and of linear programs (Q = 0, a
box and 16 random rows) with the default tolerance and prints, beside the statuses and iterations,
the largest relative error of z and of the gradients of w·z (w random) against the unit-scale
solve, the gradients brought back to unit scale. The same QPs at unit scale are solved with bounds
beside one more variable, decoupled, pushed to β (1e4 to 1e12): their own answers and gradients are
those without it. The same QPs at unit scale are solved with bounds
far above their sides added (never active, as a bound of 1e20 that stands for an absent one, or
+inf, an absent bound as such): their answers and gradients are those without the bounds, and the
bounds' own gradients zero; and, as cone programs (``solve_cone``, the interior point method and
Clarabel), with a far box (finite: the cone layer's data must be). Random cone programs of every
cone kind with a known solution are solved with their variables and rows scaled by up to 10^±6
(the cone layer equilibrates them: ``cone.scaling.equilibration``).

    PYTHONPATH=src python -m benchmarks.scale_accuracy [--json FILE] [--peers [SOLVER ...]] [--diffcp]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import warnings

import torch

from optlayers import solve_qp

QP_SCALES = [("objective", w) for w in (1e-3, 1e-6, 1e-8, 1e-10, 1e-12, 1e3, 1e6, 1e8)] + \
    [("data", a) for a in (1e-3, 1e-6, 1e-9, 1e-12, 1e3, 1e6, 1e7, 1e9, 1e12)]
FAR_BOUNDS = [(kind, beta) for kind in ("one", "box") for beta in (1e4, 1e8, 1e12, 1e20, math.inf)]
"""Bounds far above the QPs' other sides, never active: z₀ ≤ β (one) or −β ≤ z ≤ β (box)."""
LP_SCALES = [(1e-3, 1.0), (1e-6, 1.0), (1e-9, 1.0), (1.0, 1e-6), (1.0, 1e-10), (1e-6, 1e-6), (1e6, 1.0), (1e9, 1.0), (1.0, 1e6)]
"""(α, ω) for the linear programs: p scaled by αω, h and b by α."""


def _qp(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    B, n, k, m = 8, 6, 10, 2
    L = torch.randn(B, n, n, **kw)
    G, A = torch.randn(B, k, n, **kw), torch.randn(B, m, n, **kw)
    z0 = torch.randn(B, n, 1, **kw)
    h = (G @ z0).squeeze(-1) + 0.1 + torch.rand(B, k, **kw)
    return {"Q": L @ L.mT + 0.1 * torch.eye(n, dtype=torch.float64), "p": torch.randn(B, n, **kw), "G": G, "h": h,
            "A": A, "b": (A @ z0).squeeze(-1), "w": torch.randn(B, n, **kw)}


def _lp(seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    B, n, k, m = 8, 6, 16, 2
    eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
    G = torch.cat([torch.randn(B, k, n, **kw), eye, -eye], 1)
    A = torch.randn(B, m, n, **kw)
    z0 = 0.3 * torch.randn(B, n, 1, **kw)
    h = (G @ z0).squeeze(-1) + 0.1 + torch.rand(B, G.shape[1], **kw)
    return {"Q": torch.zeros(B, n, n, dtype=torch.float64), "p": torch.randn(B, n, **kw), "G": G, "h": h, "A": A,
            "b": (A @ z0).squeeze(-1)}


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def _qp_solve(d: dict[str, torch.Tensor], kind: str, scale: float) -> tuple[object, list[torch.Tensor]]:
    """The solution at the scale, and the gradients of w·z w.r.t. Q, p, h, b brought back to unit scale."""
    omega, alpha = (scale, 1.0) if kind == "objective" else (1.0, scale)
    data = [(omega * d["Q"]).requires_grad_(), (omega * alpha * d["p"]).requires_grad_(), (alpha * d["h"]).requires_grad_(),
            (alpha * d["b"]).requires_grad_()]
    sol = solve_qp(data[0], data[1], d["G"], data[2], d["A"], data[3], on_failure="ignore")
    grads = torch.autograd.grad((d["w"] * sol.z).sum(), data)
    # dz/dQ scales by α/ω (z by α, Q by ω), dz/dp by 1/ω, dz/dh and dz/db by 1: w·z's gradients by α·that
    return sol, [grads[0] * omega / alpha, grads[1] * omega, grads[2], grads[3]]


def qp_rows() -> list[dict[str, object]]:
    d = _qp()
    unit, unit_grads = _qp_solve(d, "data", 1.0)
    rows = []
    for kind, scale in QP_SCALES:
        sol, grads = _qp_solve(d, kind, scale)
        alpha = scale if kind == "data" else 1.0
        rows.append({"kind": kind, "scale": scale, "statuses": sol.status.tolist(), "iterations": sol.iterations.tolist(),
                     "z": _relative(sol.z.detach() / alpha, unit.z.detach()),
                     "gradients": max(_relative(g, u) for g, u in zip(grads, unit_grads))})
    return rows


def _with_far_bounds(d: dict[str, torch.Tensor], beta: float, kind: str = "box") -> tuple[torch.Tensor, torch.Tensor]:
    """``d``'s G and h with z₀ ≤ β (``kind`` "one") or −β ≤ z ≤ β ("box") added as their last rows."""
    B, n = d["p"].shape
    eye = torch.eye(n, dtype=d["G"].dtype).expand(B, n, n)
    extra = eye[:, :1] if kind == "one" else torch.cat([eye, -eye], 1)
    return torch.cat([d["G"], extra], 1), torch.cat([d["h"], torch.full((B, extra.shape[1]), beta, dtype=d["h"].dtype)], -1)


def far_bound_rows() -> list[dict[str, object]]:
    """The unit QPs with bounds far above their sides added (``FAR_BOUNDS``): against the unit solve
    without them, z and the gradients of w·z w.r.t. Q, p, h (its own rows) and b."""
    d = _qp()
    unit, unit_grads = _qp_solve(d, "data", 1.0)
    k = d["h"].shape[-1]
    rows = []
    for kind, beta in FAR_BOUNDS:
        G, h = _with_far_bounds(d, beta, kind)
        data = [d["Q"].clone().requires_grad_(), d["p"].clone().requires_grad_(), h.requires_grad_(),
                d["b"].clone().requires_grad_()]
        sol = solve_qp(data[0], data[1], G, data[2], d["A"], data[3], on_failure="ignore")
        grads = list(torch.autograd.grad((d["w"] * sol.z).sum(), data))
        far_gradient = float(grads[2][:, k:].abs().max())
        grads[2] = grads[2][:, :k]
        rows.append({"kind": kind, "bound": beta, "statuses": sol.status.tolist(), "iterations": sol.iterations.tolist(),
                     "unit_iterations": unit.iterations.tolist(), "z": _relative(sol.z.detach(), unit.z.detach()),
                     "gradients": max(_relative(g, u) for g, u in zip(grads, unit_grads)), "far_gradient": far_gradient})
    return rows


CONE_FAR_BOUNDS = [(kind, solver, beta) for kind in ("quadratic", "linear") for solver in ("ipm", "clarabel")
                   for beta in (1e3, 1e4, 1e8, 1e12, 1e20)]
"""The cone layer's programs (the QPs, or the linear programs), solvers and the bounds −β ≤ x ≤ β added
to them as nonnegative rows."""


def cone_far_bound_rows() -> list[dict[str, object]]:
    """The unit QPs (P = Q) or linear programs (their box and 16 rows) as cone programs (Gz ≤ h as
    nonnegative rows, c = p, no equalities) with −β ≤ x ≤ β added (``CONE_FAR_BOUNDS``): against the
    programs without it, x and the gradients of w·x w.r.t. A, b (their own rows) and c, and the
    largest violation of the rows."""
    from optlayers import ConeSpec, solve_cone
    problems = {"quadratic": _qp(), "linear": _lp()}
    w = problems["quadratic"]["w"]

    def solve(d, A, b, solver):
        data = [t.clone().requires_grad_() for t in (A, b, d["p"])]
        P = d["Q"] if d["Q"].abs().amax() > 0 else None
        sol = solve_cone(data[0], data[1], data[2], ConeSpec(nonneg=b.shape[-1]), P=P, solver=solver, on_failure="ignore")
        return sol, torch.autograd.grad((w * sol.x).sum(), data)
    rows, plain = [], {}
    for kind, solver, beta in CONE_FAR_BOUNDS:
        d = problems[kind]
        k = d["h"].shape[-1]
        if (kind, solver) not in plain:
            plain[kind, solver] = solve(d, d["G"], d["h"], solver)
        unit, unit_grads = plain[kind, solver]
        A, b = _with_far_bounds(d, beta)
        sol, grads = solve(d, A, b, solver)
        violation = (A @ sol.x.detach().unsqueeze(-1)).squeeze(-1) - b
        rows.append({"kind": kind, "solver": solver, "bound": beta, "statuses": sol.status.tolist(),
                     "x": _relative(sol.x.detach(), unit.x.detach()),
                     "gradients": max(_relative(g, u) for g, u in zip((grads[0][:, :k], grads[1][:, :k], grads[2]), unit_grads)),
                     "violation": float(violation.max())})
    return rows


CONE_SPREADS = (0.0, 2.0, 4.0, 6.0)
"""The spans σ of the cone programs' scalings: variables and rows scaled by 10^U(−σ, σ)."""
CONE_SPREAD_KINDS = {"all": dict(zero=3, nonneg=6, soc=[4, 3], psd=[3], exp=2, exp_dual=1),
                     "soc": dict(zero=2, nonneg=6, soc=[6, 5, 3]), "psd": dict(nonneg=4, psd=[4, 3]),
                     "exp": dict(zero=1, nonneg=4, exp=4, exp_dual=2)}
"""The cone programs of ``cone_spread_rows``: every cone, and each curved kind with zero and nonnegative rows."""


def cone_spread_rows(batch: int = 64) -> list[dict[str, object]]:
    """Random cone programs with a known unique solution (``cone.testing.random_program``, with and
    without P, for each kind of ``CONE_SPREAD_KINDS``) with their variables and rows scaled by
    10^U(−σ, σ) (``CONE_SPREADS``; one number per cone on the curved ones: ``cone.testing.random_scalings``),
    solved by both solvers: how many SOLVED, how many of those more than 1e-6 off (x, relative to
    its largest entry), and the largest error of x among the SOLVED."""
    from optlayers import ConeSpec, solve_cone
    from optlayers.cone.testing import n_range, random_program, random_scalings, scaled
    rows = []
    for name, cones in CONE_SPREAD_KINDS.items():
        spec = ConeSpec(**cones)
        n = sum(n_range(spec)) // 2
        for quadratic in (False, True):
            A, b, c, P, x, _, _ = random_program(spec, n, batch=batch, seed=1, quadratic=quadratic)
            for span in CONE_SPREADS:
                d, e = random_scalings(spec, n, batch, span, seed=2)
                A2, b2, c2, P2 = scaled(A, b, c, P, d, e)
                for solver in ("ipm", "clarabel"):
                    sol = solve_cone(A2, b2, c2, spec, P2, solver=solver, on_failure="ignore")
                    error = (sol.x * d - x).abs().amax(-1) / x.abs().amax(-1)
                    solved = sol.status == 0
                    rows.append({"cones": name, "quadratic": quadratic, "span": span, "solver": solver,
                                 "solved": int(solved.sum()), "of": batch, "off": int((solved & (error > 1e-6)).sum()),
                                 "x": float(error[solved].max()) if bool(solved.any()) else math.nan})
    return rows


def diffcp_spread_rows(batch: int = 64) -> list[dict[str, object]]:
    """``cone_spread_rows``' programs without P, by diffcp (``diffcp.solve_and_derivative_batch``, dense
    mode, its defaults: no refinement), with Clarabel and SCS forwards: how many answers are more
    than 1e-6 off (x, relative to its largest entry), and the largest error; a row with ``error``
    where diffcp raised (its Clarabel interface takes no dual exponential cones)."""
    import diffcp
    import numpy as np
    import scipy.sparse as sp
    from optlayers import ConeSpec
    from optlayers.cone.testing import n_range, random_program, random_scalings, scaled
    rows = []
    for name, cones in CONE_SPREAD_KINDS.items():
        spec = ConeSpec(**cones)
        n = sum(n_range(spec)) // 2
        A, b, c, _, x, _, _ = random_program(spec, n, batch=batch, seed=1)
        for span in CONE_SPREADS:
            d, e = random_scalings(spec, n, batch, span, seed=2)
            A2, b2, c2, _ = scaled(A, b, c, None, d, e)
            for method in ("Clarabel", "SCS"):
                row = {"cones": name, "span": span, "solver": f"diffcp {method}", "of": batch}
                try:
                    xs = diffcp.solve_and_derivative_batch([sp.csc_matrix(a) for a in A2.numpy()], list(b2.numpy()),
                                                           list(c2.numpy()), [spec.scs_cone()] * batch, mode="dense",
                                                           solve_method=method)[0]
                except Exception as err:  # noqa: BLE001 - a peer's refusal is a row of the table
                    rows.append({**row, "error": f"{type(err).__name__}: {str(err)[:60]}"})
                    continue
                error = (torch.as_tensor(np.stack(xs)) * d - x).abs().amax(-1) / x.abs().amax(-1)
                rows.append({**row, "off": int((error > 1e-6).sum()), "x": float(error.max())})
    return rows


CONE_QP_SIDES = [("box", bound) for bound in (1e3, 2e3, 1e4, 1e5)] + [("spread", span) for span in (2.0, 3.0, 4.0, 6.0)] + \
    [("ball", radius) for radius in (1e3, 1e4, 1e6, 1e8, 1e12)]
"""The QPs of ``cone_qp_side_rows``: a box −β ≤ z ≤ β, inequalities whose slacks spread over 10^U(0, σ),
or a ball ‖z‖ ≤ R (a second-order cone)."""


def cone_qp_side_rows() -> list[dict[str, object]]:
    """Random QPs with two equalities (``benchmarks.problems.qps_with_equalities``) as cone programs,
    with sides far above the others (``CONE_QP_SIDES``), by both solvers, against ``solve_qp`` (the
    QPs without the box or ball): a box or a ball, never active, about 32 QPs; 128 QPs whose 24
    inactive rows' slacks are 10^U(0, σ). How many SOLVED, how many of those more than 1e-8 off (z,
    relative to its largest entry), and the largest error among the SOLVED."""
    from benchmarks.problems import qps_with_equalities
    from optlayers import ConeSpec, solve_cone
    rows = []
    for kind, size in CONE_QP_SIDES:
        if kind == "spread":
            def slack(gen, shape, span=size):
                return 10.0 ** (span * torch.rand(*shape, generator=gen, dtype=torch.float64))
            Q, p, G, h, A, b = qps_with_equalities(12, slack, B=128, k=24)
        else:
            Q, p, G, h, A, b = qps_with_equalities(11 if kind == "box" else 21)
        (B, n), m, k = p.shape, A.shape[1], G.shape[1]
        rows_A, rows_b, soc = [A, G], [b, h], []
        if kind == "box":
            eye = torch.eye(n, dtype=torch.float64).expand(B, n, n)
            rows_A.append(torch.cat([eye, -eye], 1))
            rows_b.append(torch.full((B, 2 * n), size, dtype=torch.float64))
        elif kind == "ball":
            rows_A.append(torch.cat([torch.zeros(B, 1, n, dtype=torch.float64), -torch.eye(n, dtype=torch.float64).expand(B, n, n)], 1))
            rows_b.append(torch.cat([torch.full((B, 1), size, dtype=torch.float64), torch.zeros(B, n, dtype=torch.float64)], -1))
            soc = [n + 1]
        nonneg = k + (2 * n if kind == "box" else 0)
        want = solve_qp(Q, p, G, h, A, b).z
        for solver in ("ipm", "clarabel"):
            sol = solve_cone(torch.cat(rows_A, 1), torch.cat(rows_b, -1), p, ConeSpec(zero=m, nonneg=nonneg, soc=soc), Q,
                             solver=solver, on_failure="ignore")
            solved = sol.status == 0
            error = (sol.x - want).abs().amax(-1) / want.abs().amax(-1)
            rows.append({"kind": kind, "size": size, "solver": solver, "solved": int(solved.sum()), "of": B,
                         "off": int((solved & (error > 1e-8)).sum()),
                         "z": float(error[solved].max()) if bool(solved.any()) else math.nan})
    return rows


PEER_FAR_BOUNDS = (1e4, 1e8, 1e12, 1e20, math.inf)
"""The bounds −β ≤ z ≤ β added to the QPs for ``--peers`` (+inf: absent bounds as such)."""


def peer_far_bound_rows(names: list[str]) -> list[dict[str, object]]:
    """The unit QPs with −β ≤ z ≤ β added (``PEER_FAR_BOUNDS``), solved by each named solver of
    ``benchmarks.solvers`` that imports (``_peer_rows``)."""
    from benchmarks.problems import QPBatch
    d = _qp()
    return _peer_rows(names, "bound", [(beta, QPBatch(d["Q"], d["p"], *_with_far_bounds(d, beta), d["A"], d["b"]))
                                       for beta in PEER_FAR_BOUNDS])


def _peer_rows(names: list[str], key: str, cases: list[tuple[float, object]]) -> list[dict[str, object]]:
    """Each named solver of ``benchmarks.solvers`` that imports (float64, its own settings) on each
    case (its value under ``key``, and the unit QPs changed so that the solution of their own
    variables is unchanged): the largest relative error of those variables against optlayers'
    solve of the unit QPs, and how many of the 8 came back finite; a solver that raises is a row
    of its own."""
    from benchmarks.solvers import available_solvers
    d = _qp()
    reference = solve_qp(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"]).z
    solvers, missing = available_solvers(names, threads=1)
    rows = [{"solver": line.split(":")[0], "skipped": line} for line in missing]
    for solver in solvers:
        for value, qp in cases:
            try:
                with torch.no_grad():
                    z = solver.solve(qp).detach().to(torch.float64)[:, :reference.shape[-1]]
            except Exception as error:  # a peer that fails on the data is a row of the table, not the end of the run
                rows.append({"solver": solver.name, key: value, "error": f"{type(error).__name__}: {error}"[:120]})
                continue
            finite = torch.isfinite(z).all(-1)
            rows.append({"solver": solver.name, key: value, "finite": int(finite.sum()),
                         "z": _relative(z[finite], reference[finite]) if bool(finite.any()) else float("nan")})
    return rows


LARGE_VARIABLES = (1e4, 1e8, 1e12)
"""The values β to which one more variable, decoupled from the QPs' own, is pushed
(``problems.with_a_large_variable``)."""


def large_variable_rows() -> list[dict[str, object]]:
    """The unit QPs beside a decoupled variable pushed to β (``LARGE_VARIABLES``): against the unit
    solve, their own z and the gradients of w·z w.r.t. p, h and b."""
    from benchmarks.problems import with_a_large_variable
    d = _qp()
    n = d["p"].shape[-1]

    def solve(Q, p, G, h, A, b):
        data = [t.clone().requires_grad_() for t in (p, h, b)]
        sol = solve_qp(Q, data[0], G, data[1], A, data[2], on_failure="ignore")
        grads = torch.autograd.grad((d["w"] * sol.z[:, :n]).sum(), data)
        return sol, (grads[0][:, :n], *grads[1:])
    unit, unit_grads = solve(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"])
    rows = []
    for beta in LARGE_VARIABLES:
        sol, grads = solve(*with_a_large_variable(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"], beta))
        rows.append({"beta": beta, "statuses": sol.status.tolist(), "iterations": sol.iterations.tolist(),
                     "unit_iterations": unit.iterations.tolist(), "z": _relative(sol.z[:, :n].detach(), unit.z.detach()),
                     "gradients": max(_relative(g, u) for g, u in zip(grads, unit_grads))})
    return rows


def peer_large_variable_rows(names: list[str]) -> list[dict[str, object]]:
    """The unit QPs beside a decoupled variable pushed to β (``LARGE_VARIABLES``), solved by each named
    solver of ``benchmarks.solvers`` that imports (``_peer_rows``: the error of the QPs' own variables)."""
    from benchmarks.problems import QPBatch, with_a_large_variable
    d = _qp()
    return _peer_rows(names, "beta", [(beta, QPBatch(*with_a_large_variable(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"], beta)))
                                      for beta in LARGE_VARIABLES])


def lp_rows() -> list[dict[str, object]]:
    d = _lp()
    unit = solve_qp(d["Q"], d["p"], d["G"], d["h"], d["A"], d["b"])
    rows = []
    for alpha, omega in LP_SCALES:
        sol = solve_qp(d["Q"], alpha * omega * d["p"], d["G"], alpha * d["h"], d["A"], alpha * d["b"], on_failure="ignore")
        rows.append({"alpha": alpha, "omega": omega, "statuses": sol.status.tolist(), "iterations": sol.iterations.tolist(),
                     "z": _relative(sol.z / alpha, unit.z)})
    return rows


def _print_peer_rows(rows: list[dict[str, object]], key: str) -> None:
    print("| solver, β | finite of 8 | z error |\n|---|---|---|")
    for r in rows:
        if "skipped" in r:
            print(f"| {r['skipped']} | | |")
        elif "error" in r:
            print(f"| {r['solver']}, {r[key]:g} | raised {r['error']} | |")
        else:
            print(f"| {r['solver']}, {r[key]:g} | {r['finite']} | {r['z']:.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--peers", nargs="*", metavar="SOLVER",
                        help="also solve the QPs with a far box by these solvers of benchmarks/solvers.py (all where none is named)")
    parser.add_argument("--diffcp", action="store_true",
                        help="also solve the cone programs with variables and rows of every size by diffcp")
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # inexact-derivative warnings: the errors below say how inexact
        qp, far, lp, cone, large = qp_rows(), far_bound_rows(), lp_rows(), cone_far_bound_rows(), large_variable_rows()
        spread, cone_sides = cone_spread_rows(), cone_qp_side_rows()
        spread_diffcp = diffcp_spread_rows() if args.diffcp else None
        peers = None if args.peers is None else peer_far_bound_rows(args.peers or None)
        peers_large = None if args.peers is None else peer_large_variable_rows(args.peers or None)
    print("QPs (n = 6, 10 inequalities, 2 equalities, 8 problems): Q, p scaled by ω (objective) or p, h, b by α (data)")
    print("| scale | all SOLVED | iterations | z error | gradient error |\n|---|---|---|---|---|")
    for r in qp:
        name = f"{'ω' if r['kind'] == 'objective' else 'α'} = {r['scale']:g}"
        print(f"| {name} | {all(s == 0 for s in r['statuses'])} | {min(r['iterations'])}–{max(r['iterations'])} | "
              f"{r['z']:.1e} | {r['gradients']:.1e} |")
    print("\nThe same QPs at unit scale with bounds far above their sides: z₀ ≤ β (one) or −β ≤ z ≤ β (box), "
          "against the QPs without them")
    print("| bounds | all SOLVED | iterations (without) | z error | gradient error | largest gradient w.r.t. a far side |"
          "\n|---|---|---|---|---|---|")
    for r in far:
        print(f"| {r['kind']}, β = {r['bound']:g} | {all(s == 0 for s in r['statuses'])} | {min(r['iterations'])}–"
              f"{max(r['iterations'])} ({min(r['unit_iterations'])}–{max(r['unit_iterations'])}) | {r['z']:.1e} | "
              f"{r['gradients']:.1e} | {r['far_gradient']:.1e} |")
    print("\nThe same QPs at unit scale beside one more variable, decoupled, pushed to β, against the QPs alone")
    print("| β | all SOLVED | iterations (alone) | z error | gradient error |\n|---|---|---|---|---|")
    for r in large:
        print(f"| {r['beta']:g} | {all(s == 0 for s in r['statuses'])} | {min(r['iterations'])}–{max(r['iterations'])} "
              f"({min(r['unit_iterations'])}–{max(r['unit_iterations'])}) | {r['z']:.1e} | {r['gradients']:.1e} |")
    print("\nLinear programs (Q = 0, n = 6, a box and 16 rows, 2 equalities): p scaled by αω, h and b by α")
    print("| α, ω | all SOLVED | iterations | z error |\n|---|---|---|---|")
    for r in lp:
        print(f"| {r['alpha']:g}, {r['omega']:g} | {all(s == 0 for s in r['statuses'])} | {min(r['iterations'])}–"
              f"{max(r['iterations'])} | {r['z']:.1e} |")
    print("\nThe same QPs and linear programs as cone programs (solve_cone, nonnegative rows) with −β ≤ x ≤ β "
          "added, against the programs without the box")
    print("| program, solver, β | all SOLVED | x error | gradient error | largest violation of a row |\n|---|---|---|---|---|")
    for r in cone:
        print(f"| {r['kind']}, {r['solver']}, {r['bound']:g} | {all(s == 0 for s in r['statuses'])} | {r['x']:.1e} | "
              f"{r['gradients']:.1e} | {r['violation']:.1e} |")
    print("\nCone programs (64 of each kind, known unique solutions) with variables and rows scaled by 10^U(−σ, σ), "
          "against their own solutions")
    print("| cones, P, σ | solver | SOLVED | SOLVED but > 1e-6 off | largest x error (SOLVED) |\n|---|---|---|---|---|")
    for r in spread:
        print(f"| {r['cones']}, {'P' if r['quadratic'] else 'no P'}, {r['span']:g} | {r['solver']} | {r['solved']} of {r['of']} | "
              f"{r['off']} | {r['x']:.1e} |")
    print("\nRandom QPs with two equalities as cone programs with a box or ball far above their sides (never active; 32 "
          "QPs) or 24 inequalities whose slacks are 10^U(0, σ) (128 QPs), against solve_qp")
    print("| QPs, size | solver | SOLVED | SOLVED but > 1e-8 off | largest z error (SOLVED) |\n|---|---|---|---|---|")
    for r in cone_sides:
        name = {"box": "box β", "spread": "slacks σ", "ball": "ball R"}[r["kind"]]
        print(f"| {name} = {r['size']:g} | {r['solver']} | {r['solved']} of {r['of']} | {r['off']} | {r['z']:.1e} |")
    if spread_diffcp is not None:
        print("\nThe same cone programs without P by diffcp (dense, its defaults, no refinement)")
        print("| cones, σ | solver | > 1e-6 off | largest x error |\n|---|---|---|---|")
        for r in spread_diffcp:
            result = f"raised {r['error']} |" if "error" in r else f"{r['off']} of {r['of']} | {r['x']:.1e}"
            print(f"| {r['cones']}, {r['span']:g} | {r['solver']} | {result} |")
    if peers is not None:
        print("\nThe QPs with −β ≤ z ≤ β added, by the peers (their own settings), against optlayers' solve "
              "of the QPs without the box")
        _print_peer_rows(peers, "bound")
        print("\nThe QPs beside one more variable, decoupled, pushed to β, by the peers (their own settings), against "
              "optlayers' solve of the QPs alone (their own variables)")
        _print_peer_rows(peers_large, "beta")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "torch": torch.__version__, "qp": qp, "far_bounds": far, "lp": lp, "cone_far_bounds": cone,
                       "large_variable": large, "cone_spread": spread, "cone_qp_sides": cone_sides, "cone_spread_diffcp": spread_diffcp,
                       "peer_far_bounds": peers, "peer_large_variable": peers_large}, out, indent=1)


if __name__ == "__main__":
    main()
