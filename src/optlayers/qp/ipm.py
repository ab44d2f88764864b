"""Batched primal-dual interior point method (Mehrotra predictor-corrector) on scaled QPs.

One loop drives ``initial_point`` / ``newton_iteration`` / ``assess`` over an explicit
``IPMState``. Every problem of the batch keeps its own status: a problem that converged,
was found infeasible or failed numerically is frozen while the others go on.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from optlayers.linalg import mtv, mv
from optlayers.qp.batch import put, take
from optlayers.qp.kkt import KKTFactor, factor_kkt, solve_newton, solve_reduced
from optlayers.qp.scaling import QPData, Scaling
from optlayers.qp.status import QPStatus

RUNNING = -1
# The interior point iteration runs in float64 whatever the data's dtype: its KKT systems grow
# as ill-conditioned as 1/tol, beyond float32's reach, and GPUs of the H100 class run float64
# at their float32 (non-tensor-core) rate. Results are returned in the data's dtype.
COMPUTE_DTYPE = torch.float64
# The start keeps s and λ at least this far inside the cone: the shift by 1 in ``initial_point``
# is lost to rounding when |Gx − h| is huge.
_INTERIOR_FLOOR = 1e-2


@dataclass(frozen=True)
class IPMSettings:
    """Hyperparameters of the interior point method (immutable).

    Attributes:
        tol: absolute tolerance on the primal residual, dual residual and duality gap of the
            original (unscaled) problem, in the infinity norm.
        rel_tol: relative tolerance, multiplied by the size of the terms of each residual.
        max_iter: iteration limit.
        reg: primal (ρ) and equality (δₑ) regularisation of the scaled KKT system; removed by
            iterative refinement, it only keeps singular Q and dependent equalities factorisable.
        ineq_reg: inequality regularisation δᵢ: bounds W = S/Λ + δᵢ away from zero so that
            H = Q + Gᵀ W⁻¹ G stays representable as constraints become active (1e-10 solves
            QCAPRI and QISRAEL of Maros–Meszaros, which stall with 1e-12).
        refine_steps: iterative refinement steps per Newton solve (with one, 57 of the 62
            Maros–Meszaros problems solve; with three, 61).
        derivative_refine_steps: refinement steps per derivative solve (these must be exact).
        step_fraction: fraction of the step to the boundary of s ≥ 0, λ ≥ 0 that is taken.
        infeasibility_tol: tolerance of the infeasibility certificates (scaled problem).
        stall_limit: consecutive iterations with a negligible step after which a problem is
            declared a numerical failure.
    """

    tol: float
    rel_tol: float
    max_iter: int
    reg: float
    ineq_reg: float
    refine_steps: int = 3
    derivative_refine_steps: int = 3
    step_fraction: float = 0.99
    infeasibility_tol: float = 1e-7
    stall_limit: int = 5


def default_settings(dtype: torch.dtype, tol: float | None, rel_tol: float | None, max_iter: int | None) -> IPMSettings:
    """Settings for data of ``dtype``. The iteration itself always runs in float64 (see
    ``COMPUTE_DTYPE``), so float32 data is solved nearly as tightly: a looser gap tolerance
    lets the multipliers of inactive constraints stay large enough to move z by (gap / smallest
    eigenvalue of Q), far beyond float32's resolution."""
    tight = dtype == torch.float64
    base = IPMSettings(tol=1e-12 if tight else 1e-10, rel_tol=1e-12 if tight else 1e-10, max_iter=100, reg=1e-9, ineq_reg=1e-10)
    if tol is not None:
        base = replace(base, tol=tol, rel_tol=tol if rel_tol is None else rel_tol)
    elif rel_tol is not None:
        base = replace(base, rel_tol=rel_tol)
    if max_iter is not None:
        base = replace(base, max_iter=max_iter)
    return base


@dataclass(frozen=True)
class IPMState:
    """Iterate and per-problem bookkeeping; all tensors have leading batch dimension B."""

    x: Tensor
    nu: Tensor
    lam: Tensor
    s: Tensor
    status: Tensor
    iterations: Tensor
    stalls: Tensor
    primal_infeasible_count: Tensor
    dual_infeasible_count: Tensor


@dataclass(frozen=True)
class Residuals:
    """Residuals of the scaled problem and their unscaled infinity norms, (B, ...) and (B,)."""

    r_d: Tensor
    r_e: Tensor
    r_i: Tensor
    mu: Tensor
    primal: Tensor
    dual: Tensor
    gap: Tensor
    converged: Tensor


@dataclass(frozen=True)
class IPMResult:
    """Final scaled iterate, per-problem outcome, and the derivatives' KKT factorisation at the
    solution when it was asked for (``derivative_factor``)."""

    state: IPMState
    residuals: Residuals
    factor: KKTFactor | None


def inf_norm(v: Tensor) -> Tensor:
    """Infinity norm over the last dimension, 0 for empty vectors."""
    return v.abs().amax(-1) if v.shape[-1] else v.new_zeros(v.shape[:-1])


def dot(u: Tensor, v: Tensor) -> Tensor:
    return (u * v).sum(-1)


def _max_step(v: Tensor, dv: Tensor) -> Tensor:
    """Largest α ≤ 1 with v + α dv ≥ 0, per problem."""
    ratio = torch.where(dv < 0, -v / dv, torch.ones_like(v))
    return ratio.amin(-1).clamp(max=1.0) if v.shape[-1] else v.new_ones(v.shape[0])


# Along a step the residuals shrink like (1 − α), but for a QP the mean complementarity
# μ(α) = μ + α(σ − 1)μ + α² dsᵀdλ / k has a positive quadratic term (dsᵀdλ = dxᵀQ dx on a
# feasible iterate), so a long step can raise it; predictor-corrector iterates can then cycle
# (seen on a 2-variable QP whose solution is interior). Steps are shortened until the merit
# μ(α) + (1 − α)·‖r‖ falls by at least this fraction of α, trying α, αβ, αβ², ...
_MERIT_DECREASE = 0.01
_BACKTRACK = 0.7
_BACKTRACK_STEPS = 12


def _merit_step(s: Tensor, lam: Tensor, ds: Tensor, dlam: Tensor, alpha: Tensor, res: Residuals) -> Tensor:
    """The longest candidate step ≤ ``alpha`` (B,) with sufficient merit decrease (see above);
    ``alpha`` itself where none has it (shorter steps would only crawl). ‖r‖ is the largest
    entry of the scaled residuals r_d, r_e, r_i."""
    infeasibility = torch.stack([inf_norm(res.r_d), inf_norm(res.r_e), inf_norm(res.r_i)]).amax(0)
    factors = _BACKTRACK ** torch.arange(_BACKTRACK_STEPS, dtype=s.dtype, device=s.device)
    a = alpha.unsqueeze(-1) * factors
    k = s.shape[-1]
    # μ(a) = mean((s + a ds)(λ + a dλ)) = μ + a·(sᵀdλ + λᵀds)/k + a²·dsᵀdλ/k
    linear, quadratic = ((dot(s, dlam) + dot(lam, ds)) / k).unsqueeze(-1), (dot(ds, dlam) / k).unsqueeze(-1)
    mu_a = res.mu.unsqueeze(-1) + a * (linear + a * quadratic)
    merit0 = res.mu + infeasibility
    merit = mu_a + (1 - a) * infeasibility.unsqueeze(-1)
    ok = merit <= (1 - _MERIT_DECREASE * a) * merit0.unsqueeze(-1)
    first = torch.where(ok.any(-1), ok.to(torch.int64).argmax(-1), 0)
    return a.gather(-1, first.unsqueeze(-1)).squeeze(-1)


def residuals(data: QPData, sc: Scaling, st: IPMState, settings: IPMSettings) -> Residuals:
    """KKT residuals and the convergence test, measured in the original problem's units."""
    c = sc.c
    qx, gtlam, gx = mv(data.Q, st.x), mtv(data.G, st.lam), mv(data.G, st.x)
    if data.A.shape[-2]:
        atnu, ax = mtv(data.A, st.nu), mv(data.A, st.x)
    else:
        atnu, ax = torch.zeros_like(st.x), st.nu
    r_d = qx + data.p + atnu + gtlam
    r_e = ax - data.b
    r_i = gx + st.s - data.h
    dual_unscale = 1.0 / (sc.d * c.unsqueeze(-1))
    dual = inf_norm(r_d * dual_unscale)
    dual_size = torch.stack([inf_norm(v * dual_unscale) for v in (qx, data.p, atnu, gtlam)]).amax(0)
    primal = torch.maximum(inf_norm(r_e / sc.e), inf_norm(r_i / sc.f))
    primal_size = torch.stack([inf_norm(ax / sc.e), inf_norm(data.b / sc.e), inf_norm(gx / sc.f), inf_norm(data.h / sc.f)]).amax(0)
    terms = torch.stack([dot(st.x, qx), dot(data.p, st.x), dot(data.b, st.nu), dot(data.h, st.lam)])
    complementarity = dot(st.s, st.lam)
    gap = torch.maximum(terms.sum(0).abs(), complementarity) / c
    gap_size = terms.abs().amax(0) / c
    k = data.h.shape[-1]
    mu = complementarity / max(k, 1)
    converged = (
        (primal <= settings.tol + settings.rel_tol * primal_size)
        & (dual <= settings.tol + settings.rel_tol * dual_size)
        & (gap <= settings.tol + settings.rel_tol * gap_size)
    )
    return Residuals(r_d=r_d, r_e=r_e, r_i=r_i, mu=mu, primal=primal, dual=dual, gap=gap, converged=converged)


def _factor_at(Q: Tensor, A: Tensor, G: Tensor, lam: Tensor, s: Tensor, settings: IPMSettings, stiff: bool = False) -> KKTFactor:
    reg = lam.new_full(lam.shape[:1], settings.reg)
    w_inv = lam / (s + settings.ineq_reg * lam)
    return factor_kkt(Q, A, G, w_inv, reg, reg.clone(), stiff=w_inv > _STIFF_W_INV if stiff else None)


def initial_point(data: QPData, settings: IPMSettings) -> IPMState:
    """Mehrotra/CVXOPT start: least-squares x with W = I, then s and λ shifted into the interior."""
    B, n = data.p.shape
    k = data.h.shape[-1]
    ones = data.h.new_ones(B, k)
    reg = data.p.new_full((B,), settings.reg)
    f = factor_kkt(data.Q, data.A, data.G, ones, reg, reg.clone())
    x, nu, z = solve_reduced(f, -data.p, data.b, -data.h, settings.refine_steps)
    if k:
        shift_s = z.amax(-1, keepdim=True)
        shift_l = (-z).amax(-1, keepdim=True)
        s = torch.where(shift_s >= 0, -z + 1 + shift_s, -z).clamp(min=_INTERIOR_FLOOR)
        lam = torch.where(shift_l >= 0, z + 1 + shift_l, z).clamp(min=_INTERIOR_FLOOR)
    else:
        s, lam = ones, ones
    status = torch.where(f.ok, RUNNING, int(QPStatus.NUMERICAL_ERROR)).to(torch.int64)
    zeros = torch.zeros(B, dtype=torch.int64, device=x.device)
    return IPMState(x, nu, lam, s, status, zeros, zeros, zeros, zeros)


@dataclass(frozen=True)
class Step:
    """A Newton direction (B, ·), Q dx, the step length α (B,) and factorisation health (B,)."""

    dx: Tensor
    dnu: Tensor
    dlam: Tensor
    ds: Tensor
    q_dx: Tensor
    alpha: Tensor
    factor_ok: Tensor


def newton_iteration(data: QPData, st: IPMState, res: Residuals, settings: IPMSettings) -> Step:
    """One predictor-corrector direction and step length for every problem."""
    f = _factor_at(data.Q, data.A, data.G, st.lam, st.s, settings)
    k = data.h.shape[-1]
    refine = settings.refine_steps
    dx, dnu, dlam, ds = solve_newton(f, st.s, st.lam, -res.r_d, -res.r_e, -res.r_i, -st.s * st.lam, refine)
    if k:
        alpha = torch.minimum(_max_step(st.s, ds), _max_step(st.lam, dlam)).unsqueeze(-1)
        mu_aff = dot(st.s + alpha * ds, st.lam + alpha * dlam) / k
        sigma = (mu_aff / res.mu.clamp(min=torch.finfo(st.s.dtype).tiny)).clamp(0.0, 1.0) ** 3
        b4 = -st.s * st.lam - ds * dlam + (sigma * res.mu).unsqueeze(-1)
        dx, dnu, dlam, ds = solve_newton(f, st.s, st.lam, -res.r_d, -res.r_e, -res.r_i, b4, refine)
        alpha = (settings.step_fraction * torch.minimum(_max_step(st.s, ds), _max_step(st.lam, dlam))).clamp(max=1.0)
        alpha = _merit_step(st.s, st.lam, ds, dlam, alpha, res)
    else:
        alpha = st.x.new_ones(st.x.shape[0])
    return Step(dx, dnu, dlam, ds, mv(data.Q, dx), alpha, f.ok)


def _certificates(data: QPData, res: Residuals, step: Step, eps: float) -> tuple[Tensor, Tensor]:
    """Whether the direction looks like a primal (Farkas) or a dual infeasibility certificate.

    The Newton equations give Aᵀdν + Gᵀdλ = −r_d − Q dx, A dx = −r_e and G dx = −r_i − ds, so the
    tests need no products with A and G.
    """
    dnu, dlam, dx = step.dnu, step.dlam, step.dx
    ny = torch.maximum(inf_norm(dnu), inf_norm(dlam))
    farkas = (
        (inf_norm(res.r_d + step.q_dx) <= eps * ny)
        & (dot(data.b, dnu) + dot(data.h, dlam) < -eps * ny)
        & ((dlam.amin(-1) if dlam.shape[-1] else ny) >= -eps * ny)
        & (ny > 0)
    )
    nx = inf_norm(dx)
    gdx = -res.r_i - step.ds
    recession = (
        (inf_norm(step.q_dx) <= eps * nx)
        & (inf_norm(res.r_e) <= eps * nx)
        & ((gdx.amax(-1) if gdx.shape[-1] else -nx) <= eps * nx)
        & (dot(data.p, dx) < -eps * nx)
        & (nx > 0)
    )
    return farkas, recession


# For the derivatives, inequalities with W⁻¹ = λ/s above this (scaled units) are kept out of H
# and handled like equalities (see ``kkt.KKTFactor``): near-active rows would otherwise make H
# as ill-conditioned as 1/tol and cost the derivatives digits.
_STIFF_W_INV = 1.0
# A certificate must hold for this many consecutive iterations before it is believed.
_CERTIFICATE_PERSISTENCE = 3
# A step shorter than this is negligible progress.
_NEGLIGIBLE_STEP = 1e-10


def assess(data: QPData, old: IPMState, res: Residuals, step: Step, settings: IPMSettings) -> IPMState:
    """Take the step where the problem is running and sound; update statuses and counters."""
    a = step.alpha.unsqueeze(-1)
    new = replace(old, x=old.x + a * step.dx, nu=old.nu + a * step.dnu, lam=old.lam + a * step.dlam, s=old.s + a * step.ds)
    alpha = step.alpha
    running = old.status == RUNNING
    finite = torch.stack([torch.isfinite(t).all(-1) for t in (new.x, new.nu, new.lam, new.s)]).all(0)
    sound = running & step.factor_ok & finite
    farkas, recession = _certificates(data, res, step, settings.infeasibility_tol)
    one = torch.ones_like(old.iterations)
    p_count = torch.where(farkas, old.primal_infeasible_count + one, 0)
    d_count = torch.where(recession, old.dual_infeasible_count + one, 0)
    stalls = torch.where(alpha < _NEGLIGIBLE_STEP, old.stalls + one, 0)
    status = old.status
    status = torch.where(running & ~sound, int(QPStatus.NUMERICAL_ERROR), status)
    status = torch.where(sound & (stalls >= settings.stall_limit), int(QPStatus.NUMERICAL_ERROR), status)
    status = torch.where(sound & (p_count >= _CERTIFICATE_PERSISTENCE), int(QPStatus.PRIMAL_INFEASIBLE), status)
    status = torch.where(sound & (d_count >= _CERTIFICATE_PERSISTENCE), int(QPStatus.DUAL_INFEASIBLE), status)

    def pick(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(sound.view(-1, *([1] * (a.dim() - 1))), a, b)

    return IPMState(
        x=pick(new.x, old.x),
        nu=pick(new.nu, old.nu),
        lam=pick(new.lam, old.lam),
        s=pick(new.s, old.s),
        status=status,
        iterations=old.iterations + sound.to(old.iterations.dtype),
        stalls=pick(stalls, old.stalls),
        primal_infeasible_count=pick(p_count, old.primal_infeasible_count),
        dual_infeasible_count=pick(d_count, old.dual_infeasible_count),
    )


# Once no more than this fraction of the working batch is still running, the finished problems
# are dropped from it, so that the iterations of the slowest problems cost only their own work.
_COMPACT_FRACTION = 0.75


def solve_scaled(data: QPData, sc: Scaling, settings: IPMSettings, with_factor: bool = True) -> IPMResult:
    """Run the interior point method on a scaled batch until every problem has a status; with
    ``with_factor``, also factorise the KKT system at the solution for the derivatives."""
    full = initial_point(data, settings)
    index = None  # the working batch's elements in the full batch; None while they are all
    work_data, work_sc, st = data, sc, full
    for iteration in range(settings.max_iter + 1):
        res = residuals(work_data, work_sc, st, settings)
        st = replace(st, status=torch.where((st.status == RUNNING) & res.converged, int(QPStatus.SOLVED), st.status))
        running = st.status == RUNNING
        count = int(running.sum())
        if iteration == settings.max_iter or count == 0:
            break
        if count <= _COMPACT_FRACTION * running.shape[0]:
            full = st if index is None else put(full, index, st)
            keep = running.nonzero().squeeze(-1)
            index = keep if index is None else index[keep]
            work_data, work_sc, st, res = take(data, index), take(sc, index), take(st, keep), take(res, keep)
        st = assess(work_data, st, res, newton_iteration(work_data, st, res, settings), settings)
    if index is not None:
        full = put(full, index, st)
        res = residuals(data, sc, full, settings)
    else:
        full = st
    full = replace(full, status=torch.where(full.status == RUNNING, int(QPStatus.MAX_ITER), full.status))
    factor = derivative_factor(data.Q, data.A, data.G, full.lam, full.s, settings) if with_factor else None
    return IPMResult(state=full, residuals=res, factor=factor)


def derivative_factor(Q: Tensor, A: Tensor, G: Tensor, lam: Tensor, s: Tensor, settings: IPMSettings) -> KKTFactor:
    """The KKT factorisation that the derivatives solve with, at a final iterate (λ, s) of the
    scaled problem (Q, A, G): near-active inequalities are kept out of H (see ``_STIFF_W_INV``)."""
    return _factor_at(Q, A, G, lam, s, settings, stiff=True)
