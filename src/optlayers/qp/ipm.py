"""Batched primal-dual interior point method (Mehrotra predictor-corrector) on scaled QPs.

The QP method on the engine: its loop (``engine.loop.run``) drives ``start`` / ``step`` over
the engine's explicit ``State``; a step is the engine's predictor-corrector direction
(``engine.step.newton_step``, the inequalities as its nonnegative rows) and this method's
``assess`` (statuses, infeasibility certificates). Every problem of the batch keeps its own
status: a problem that converged, was found infeasible or failed numerically is frozen while
the others go on.
"""
from __future__ import annotations

import functools
import operator
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import Tensor

from optlayers.compiling import compiled, owned
from optlayers.engine import loop
from optlayers.engine.batch import put, take
from optlayers.engine.constants import constant, made_once
from optlayers.engine.graphed import GraphedCall, GraphedStep, graphs_calls, linalg_key, replays_graphs
from optlayers.engine.kkt import MAX_FACTOR_RETRIES, KKTFactor, factor_kkt, raise_limit, regularisation_after, solve_reduced
from optlayers.engine.step import BACKTRACK, BACKTRACK_STEPS, QPData, State, Step, StepRules, factor_at, newton_step
from optlayers.host import RUNNING, cpu_schedule, host_read
from optlayers.linalg import add_mtv, inf_norm, mtv, mv, power_of_two_above
from optlayers.qp.derivative_checks import inexact_derivatives
from optlayers.qp.multipliers import smaller_multipliers
from optlayers.qp.scaling import SMALL_DATA, Scaling
from optlayers.qp.status import QPStatus
from optlayers.sides import far_sides

# The interior point iteration runs in float64 whatever the data's dtype: its KKT systems grow
# as ill-conditioned as 1/tol, beyond float32's reach, and GPUs of the H100 class run float64
# at their float32 (non-tensor-core) rate. Results are returned in the data's dtype.
COMPUTE_DTYPE = torch.float64
# The start keeps s and λ at least this far inside the cone: the shift by 1 in ``initial_point``
# is lost to rounding when |Gx − h| is huge.
_INTERIOR_FLOOR = 1e-2

BALANCED_STEP_FRACTION = 0.999
"""The fraction of the step to the boundary of s ≥ 0, λ ≥ 0 that the QP's iteration takes where μ is at
least ``StepRules.balance`` (10⁻³) times the largest scaled residual (``IPMSettings.balanced_step_fraction``;
elsewhere ``step_fraction``, 0.99), as qpth takes everywhere and the cone method on its nonnegative rows
(``ConeIPMSettings.nonneg_step_fraction``). Near the solution the step to the boundary is just above 1, and a
fraction of 0.99 held each iteration's reduction of the residuals and the gap to at most 100 times. Measured
against 0.99 everywhere on the Maros–Meszaros set (tol 1e-8, rel_tol 0; AMD EPYC): 61 of 62 solved either way,
at one thread and at two, in 911 against 966 iterations (one thread) and 908 against 989 (two) without
QFORPLAN. On the benchmarks' random QPs (batch 64, n = 10 to 100) the mean iterations per problem fell by 6
to 15 % (``tests/qp/test_step_fraction.py``). Where μ has fallen far below the residuals, 0.999 everywhere
left a badly scaled fuzzed element (``tests/test_fuzz_qp.py``, seed 29507) with μ below 1e-300 before its gap
closed, INACCURATE where 0.99 solves it; 0.9999 everywhere left QSCAGR25 unsolved, IPOPT's max(0.99, 1 − μ)
QBEACONF, and 0.999 only where the scaled residuals were below 10⁻⁴ QSCAGR25 (at one thread). In the fuzzing's
10,000 cases, 10 infeasible or unbounded elements of about 16,000 end without their certificate (MAX_ITER or
NUMERICAL_ERROR, honest statuses) against 1 at 0.99 everywhere (docs/testing.md). Requiring also a predictor step
of at least 0.9 missed 3, but took 940 Maros–Meszaros iterations against 911 and flipped two of the fuzzing's
regression cases (docs/qp.md, "Step length")."""


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
        refine_steps: iterative refinement steps per corrector solve (with one, 57 of the 62
            Maros–Meszaros problems solve; with three, 61).
        predictor_refine_steps: refinement steps of the predictor (affine) solve, which only
            sets the centring σ and the second-order term of the corrector.
        derivative_refine_steps: refinement steps per derivative solve (these must be exact).
        step_fraction: fraction of the step to the boundary of s ≥ 0, λ ≥ 0 that is taken, and
        balanced_step_fraction: that fraction where μ is not far below the residuals
            (``BALANCED_STEP_FRACTION``; ``StepRules.balanced_step_fraction``).
        infeasibility_tol: tolerance of the infeasibility certificates (scaled problem).
        stall_limit: consecutive iterations with a negligible step after which a problem is
            declared a numerical failure.
        progress_limit: consecutive iterations without progress (``_PROGRESS``: neither of
            ``Residuals.progress`` fell below 0.9 of its value at the last progress) after which a
            problem whose iterate of its last progress has residuals within ``_REDUCED_ACCURACY``
            times their tolerances returns to that iterate and stops, INACCURATE. Farther from
            tolerance it goes on: an infeasible or unbounded problem can go long without progress
            before its certificate holds. On the Maros–Meszaros set (tol 1e-8, rel_tol 0) the
            problems that are solved go at most 7 iterations without progress; QBEACONF at two
            threads on an AMD EPYC, whose dual residual sits at the rounding of its cancelling
            terms (3e-8), runs without the test to the 200-iteration limit, its primal residual
            growing to 2e3.
        augment: factorise H + σAᵀA in place of H (``kkt.factor_kkt``'s ``augment``): the same
            Newton steps, with H positive definite where a direction without curvature and
            without an inequality row is held by equality rows alone (on Maros–Meszaros QCAPRI
            35 iterations instead of 58; a fuzzed equality-constrained QP solved in 8 that ran to
            ``max_iter``).
        tol_follows_data: ``tol`` times the size of each problem's data where that is far below 1
            (``Units.absolute``); ``default_settings`` sets it where no ``tol`` is given.
        compiled: run the equilibration, the start, each iteration and the derivatives'
            factorisation as ``torch.compile``d graphs (``fullgraph=True``; on the CPU the start,
            the iterations and the factorisation as one, ``qp.fused``; on CUDA the iteration
            replayed from one CUDA graph, ``engine.graphed``) on a batch of fixed shape: finished
            problems stay in it, frozen, instead of leaving it. The first call for each new
            shape pays the compilation (about a minute on a CPU); it pays off for thousands of
            calls on small problems, where an iteration's cost is its kernel launches.
    """

    tol: float
    rel_tol: float
    max_iter: int
    reg: float
    ineq_reg: float
    refine_steps: int = 3
    predictor_refine_steps: int = StepRules.predictor_refine_steps
    derivative_refine_steps: int = 3
    step_fraction: float = StepRules.step_fraction
    balanced_step_fraction: float = BALANCED_STEP_FRACTION
    infeasibility_tol: float = 1e-7
    stall_limit: int = 5
    progress_limit: int = 20
    augment: bool = True
    compiled: bool = False
    tol_follows_data: bool = False

    @property
    def rules(self) -> StepRules:
        """The step's rules (``engine.step``): Mehrotra's centring σ = (μ_aff / μ)³, the merit search,
        at most ``step_fraction`` of the step to the boundary (``balanced_step_fraction`` where μ is
        not far below the residuals), solves without kkt's Y (their
        rounding decides some Maros–Meszaros problems)."""
        return StepRules(merit=True, step_fraction=self.step_fraction, balanced_step_fraction=self.balanced_step_fraction,
                         ineq_reg=self.ineq_reg,
                         refine_steps=self.refine_steps, predictor_refine_steps=self.predictor_refine_steps,
                         augment=self.augment)


def default_settings(dtype: torch.dtype, tol: float | None, rel_tol: float | None, max_iter: int | None,
                     compiled: bool = False) -> IPMSettings:
    """Settings for data of ``dtype``. The iteration itself always runs in float64 (see
    ``COMPUTE_DTYPE``), so float32 data is solved nearly as tightly: a looser gap tolerance
    lets the multipliers of inactive constraints stay large enough to move z by (gap / smallest
    eigenvalue of Q), far beyond float32's resolution."""
    tight = dtype == torch.float64
    base = IPMSettings(tol=1e-12 if tight else 1e-10, rel_tol=1e-12 if tight else 1e-10, max_iter=100, reg=1e-9, ineq_reg=1e-10,
                       compiled=compiled, tol_follows_data=True)
    if tol is not None:  # an absolute tolerance asked for is taken as it is
        base = replace(base, tol=tol, rel_tol=tol if rel_tol is None else rel_tol, tol_follows_data=False)
    elif rel_tol is not None:
        base = replace(base, rel_tol=rel_tol)
    if max_iter is not None:
        base = replace(base, max_iter=max_iter)
    return base


@dataclass(frozen=True)
class Units:
    """Per-problem constants of one solve: the factors that carry the scaled residuals back to
    the original problem's units, and the merit step's candidate factors."""

    dual: Tensor  # (B, n): 1 / (d c)
    cost: Tensor  # (B,): 1 / c
    backtrack: Tensor  # (B, j): the merit step's candidate factors βʲ (the same for every problem)
    primal: Tensor  # (B, m + k): [1 / e, 1 / f]
    gauge: Tensor  # (B, 1, 5): [1, 1, 1 / c, 1, 1 / c], the factors of the primal and dual norms (already in units), the gap, the complementarity by component (a ratio) and sᵀλ
    absolute: Tensor  # (B, 5): the absolute tolerances of the residuals, the gap, the complementarity by component (1: its measure is a ratio to its tolerance) and sᵀλ (``absolute_tolerance``)
    # ``_complementarity_by_component``'s constants:
    g_abs: Tensor  # (B, k, n): |G| of the scaled problem
    row_sides: Tensor  # (B, k): |h| plus the size below which the absolute tolerance rules (tol / rel_tol), in the rows' scaled units
    dual_absolute: Tensor  # (B, n): the dual residual's absolute tolerance in each variable's scaled units

    @staticmethod
    def of(sc: Scaling, data: QPData, settings: IPMSettings) -> Units:
        """The units of the problems ``data`` scaled by ``sc``, solved with ``settings``."""
        batch, cost = sc.c.shape[0], 1.0 / sc.c
        dual, primal = 1.0 / (sc.d * sc.c.unsqueeze(-1)), torch.cat([1.0 / sc.e, 1.0 / sc.f], -1)
        ones = constant((1.0, 1.0), cost).expand(batch, 2)
        absolute = absolute_tolerance(data, dual, primal, settings, sc.objective)
        # tol / rel_tol in the rows' scaled units (with rel_tol = 0 ``residuals`` skips the test)
        floor = absolute[:, :1] / (settings.rel_tol * primal[:, data.b.shape[-1]:]) if settings.rel_tol > 0 else 0.0
        return Units(dual=dual, cost=cost, backtrack=_backtrack_factors(sc.c.dtype, sc.c.device).expand(batch, -1),
                     primal=primal,
                     gauge=torch.stack([ones[:, 0], ones[:, 1], cost, ones[:, 0], cost], -1).unsqueeze(-2),
                     absolute=torch.cat([absolute[:, :3], ones[:, :1], absolute[:, 3:]], -1),
                     g_abs=data.G.abs(), row_sides=data.h.abs() + floor, dual_absolute=absolute[:, 1:2] / dual)


def absolute_tolerance(data: QPData, dual: Tensor, primal: Tensor, settings: IPMSettings,
                       objective: Tensor | None = None) -> Tensor:
    """(B, 4): the absolute tolerances of the primal residual, the dual residual, the gap and sᵀλ:
    ``settings.tol``, times, where ``tol_follows_data``, σ, σω, σ²ω and σ²ω, where σ is the size of
    each problem's p, h and b (their largest entry in the original units, as a power of two) where
    that is below ``SMALL_DATA`` (else 1), and ω the objective's size beside the constraints
    (``objective``, ``scaling.objective_size``; 1 where None). The tests are tol + rel_tol × their
    terms' size. A QP is homogeneous in (p, h, b): z(αp, αh, αb) = αz, its residuals scale by α and
    its gap and sᵀλ by α²; and in (Q, p): at (ωQ, ωp) z is the same, the multipliers, the dual
    residual and the gap scale by ω. On data of size 1e-6 a tolerance of 1e-12 on all four is one
    of 1e-6 relative on the residuals, met with z 6 % off and gradients 1 % to 60 % off, SOLVED;
    tol σ on the gap (σ² = 1e-12) left them 1e-4 off; with Q and p of 1e-6 and 1e-8 (and a fixed
    tolerance on the dual residual and the gap), the gradients were 8e-5 and 6e-3 off. Scaled so,
    the test is the one of unit data; an explicit ``tol`` is absolute as asked."""
    tol = torch.full_like(data.p[:, :1], settings.tol)
    if not settings.tol_follows_data:
        return tol.expand(-1, 4)
    sides = torch.cat([data.p * dual, torch.cat([data.b, data.h], -1) * primal], -1)
    size = inf_norm(sides).unsqueeze(-1) if sides.shape[-1] else tol.new_zeros(tol.shape)
    sigma = torch.where((size > 0) & (size < SMALL_DATA), power_of_two_above(size), 1.0)
    dual_side = sigma if objective is None else sigma * objective.unsqueeze(-1)
    return tol * torch.cat([sigma, dual_side, sigma * dual_side, sigma * dual_side], -1)


@made_once
def _backtrack_factors(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The merit step's candidate factors βʲ, j < ``BACKTRACK_STEPS`` (``Units.backtrack``)."""
    return BACKTRACK ** torch.arange(BACKTRACK_STEPS, dtype=dtype, device=device)


@dataclass(frozen=True)
class Residuals:
    """Residuals of the scaled problem (B, ·), their largest scaled entry ``scaled`` (B,), and the
    convergence test in the original problem's units: ``measured`` (B, 3) holds the primal
    residual, the dual residual and the gap (infinity norms) as the test measured them, ``limit``
    (B, 3) the bounds they must meet: their tolerances (tol + rel_tol · size), the gap's less the
    rounding bound of its plain measurement (``_GAP_ROUNDING`` times ``gap_size``, the largest of
    its terms, (B,)), so that a plain gap within its limit is within tolerance whatever its
    rounding. Where that bound reaches the tolerance (rel_tol = 0 and terms of 1e8 or more), only
    an accurate measurement (``_accept_accurate_gaps``) can pass the gap. Everything the test says is
    read from ``measured`` and ``limit`` (the properties below), so that a measurement replaced
    later cannot disagree with the verdict. ``y_terms`` (B, 1 or 2, n): Gᵀλ and Aᵀν (where m > 0),
    the terms of r_d that the iterate's Farkas test (``_certificates``) adds up. ``progress`` (B, 2):
    the largest ratio of the primal residual, the dual residual and the gap to their tolerances (the
    limits before the gap's rounding comes off), and the same with the complementarity sᵀλ in the
    gap's place (it goes on falling where the plain gap is stuck at its rounding); ``assess``
    tracks them (``IPMSettings.progress_limit``)."""

    r_d: Tensor
    r_e: Tensor
    r_i: Tensor
    mu: Tensor
    scaled: Tensor
    measured: Tensor
    limit: Tensor
    gap_size: Tensor
    y_terms: Tensor
    progress: Tensor

    @property
    def primal(self) -> Tensor:
        """(B,) the primal residual."""
        return self.measured[:, 0]

    @property
    def dual(self) -> Tensor:
        """(B,) the dual residual."""
        return self.measured[:, 1]

    @property
    def gap(self) -> Tensor:
        """(B,) the duality gap."""
        return self.measured[:, 2]

    @property
    def met(self) -> Tensor:
        """(B, 3) which of the primal residual, the dual residual and the gap are within tolerance."""
        return self.measured <= self.limit

    @property
    def converged(self) -> Tensor:
        """(B,) all three are within tolerance."""
        return self.met.all(-1)


@dataclass(frozen=True)
class IPMResult:
    """Final scaled iterate, per-problem outcome, the derivatives' KKT factorisation at the
    solution when it was asked for (``derivative_factor``), and whether every problem was
    solved when the host last read the statuses (known on the host, so that the failure policy
    needs no synchronisation; where that read found unsolved problems and the end's accurate gap
    test, ``_accurate_gaps_of_inaccurate``, then turned every one of them SOLVED, it stays False and
    the policy reads the statuses itself)."""

    state: State
    residuals: Residuals
    factor: KKTFactor | None
    all_solved: bool
    inexact: bool = False
    """With the derivatives' factorisation: some problem solved when the host last read the statuses
    has an inexact derivative (``derivative_checks.inexact_derivatives``), read with them."""


def _pair_dots(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise dot products of (..., B, r) tensors: (..., B). A product and a sum, not a batched
    matrix product: torch's sum adds in a cascade, more accurately than BLAS's dot, and the duality
    gap of hard problems (large terms that cancel) depends on those digits."""
    return (u * v).sum(-1)


# The rounding of the plain gap of ``residuals`` (sums of products whose largest term is T) is
# taken as at most this times T: 64 ulps of T, for the sums' lengths and the rounding of Qx.
# Where rel_tol is above it (the defaults: 1e-12 for float64 data), the plain gap can always pass;
# with rel_tol = 0 and terms of T ≥ tol / this (1e8 at tol = 1e-8), only the accurate gap can.
_GAP_ROUNDING = 64 * torch.finfo(torch.float64).eps


def residuals(data: QPData, units: Units, st: State, settings: IPMSettings) -> Residuals:
    """KKT residuals and the convergence test, measured in the original problem's units."""
    x, nu, lam, s, _, _ = st.split()
    n, m, k = st.n, st.m, st.k
    qx, gtlam = mv(data.Q, x), mtv(data.G, lam)
    # [r_d, Qx, p, Gᵀλ, Aᵀν]: the terms stacked behind a first row that their sum then fills
    dual = torch.stack([qx, qx, data.p, gtlam, mtv(data.A, nu)] if m else [qx, qx, data.p, gtlam])
    r_d = torch.sum(dual[1:], 0, out=dual[0])
    dual_norms = inf_norm(dual * units.dual)
    terms = [_pair_dots(x, dual[1:3])]  # xᵀQx, pᵀx, then hᵀλ, bᵀν
    r_e = r_i = x[:, :0]
    if k:
        gx = mv(data.G, x)
        r_i = (gx + s) - data.h
        lam_products = lam * torch.stack([data.h, s])  # the terms of hᵀλ and sᵀλ (summed as ``_pair_dots`` does)
        lam_dots = lam_products.sum(-1)
        terms.append(lam_dots[:1])
        complementarity = lam_dots[1]
    else:
        complementarity = torch.zeros_like(units.cost)
    if m:
        ax = mv(data.A, x)
        r_e = ax - data.b
        terms.append(_pair_dots(nu, data.b).unsqueeze(0))
    stacked = torch.cat([r_d, r_e, r_i], dim=-1)
    scaled = inf_norm(stacked)
    if m and k:  # [r_e, r_i], [Ax, Gx], [b, h] in units
        primal_norms = inf_norm(torch.stack([stacked[:, n:], torch.cat([ax, gx], -1), torch.cat([data.b, data.h], -1)])
                                 * units.primal)
    elif m or k:
        primal_norms = inf_norm(torch.stack([r_e, ax, data.b] if m else [r_i, gx, data.h]) * units.primal)
    else:
        primal_norms = units.gauge.new_zeros(3, units.gauge.shape[0])
    terms = torch.cat(terms)
    # with rel_tol = 0 the test asks nothing that the absolute tests do not (every row's size is infinite)
    by_component = (_complementarity_by_component(units, s, lam, lam_products[1], dual, settings.rel_tol)
                    if k and settings.rel_tol > 0 else constant(0.0, units.cost).expand_as(units.cost))
    # (B, 2, 5): the primal residual, the dual residual, the gap, the complementarity by component and
    # sᵀλ; then their sizes (the gap's for sᵀλ; none for the ratio); in the original units
    gap, gap_size = torch.maximum(terms.sum(0).abs(), complementarity), inf_norm(terms, 0)
    tested = torch.stack([primal_norms[0], dual_norms[0], gap, by_component, complementarity, primal_norms[1:].amax(0),
                          dual_norms[1:].amax(0), gap_size, constant(0.0, gap_size).expand_as(gap_size), gap_size], -1).unflatten(-1, (2, 5)) * units.gauge
    measured, sizes = tested.unbind(1)
    mu = complementarity / max(k, 1)
    limit = sizes.mul(settings.rel_tol).add_(units.absolute)
    # [primal, dual, by component, gap] and [primal, dual, by component, sᵀλ] over their tolerances, each one's largest
    ratios = measured / limit
    progress = torch.maximum(torch.maximum(ratios[:, :2].amax(-1, keepdim=True), ratios[:, 3:4]), ratios[:, 2::2])
    measured, limit, gap_size = measured[:, :4], limit[:, :4], sizes[:, 2]
    limit[:, 2].sub_(gap_size, alpha=_GAP_ROUNDING)  # the plain gap's rounding comes off its limit
    return Residuals(r_d, r_e, r_i, mu, scaled, measured, limit, gap_size, dual[3:].movedim(0, 1), progress)


def _complementarity_by_component(units: Units, s: Tensor, lam: Tensor, lam_s: Tensor, dual: Tensor, rel_tol: float) -> Tensor:
    """(B,) the largest ratio, over the variables j, of the complementarity that the inequality rows
    leave on variable j, Σᵢ |Gᵢⱼ| λᵢ sᵢ / Pᵢ, to its tolerance rel_tol · max(|Qx|ⱼ, |p|ⱼ, |Gᵀλ|ⱼ,
    |Aᵀν|ⱼ, (|G|ᵀλ)ⱼ) + tol (the dual residual's, in its units); Pᵢ = |hᵢ| + sᵢ + tol / rel_tol, the
    row's size (|(Gx)ᵢ| is at most |hᵢ| + sᵢ, to the primal residual; the absolute tolerance rules
    below tol / rel_tol); ``lam_s`` is λ∘s (``residuals``'). The gap test is
    relative to the gap's largest term: where one variable is far larger than the others (z₀ = 1e8
    beside |z₁| ≤ 0.5, z₁ = −0.5 at the optimum), the small variables' rows could keep a
    complementarity as large as the gap's tolerance, and their variables were solved only to it
    (z₁ = −6e-5, SOLVED at the start). Here each variable's rows are resolved on that variable's own
    scale: an active row's slack to rel_tol of the row's size, an inactive row's λ to rel_tol of the
    variable's terms. Where s and λ vanish together (a weakly active row) it asks for sλ ≤ rel_tol
    times the row's and the variable's sizes, as the gap test does on unit data; (|G|ᵀλ)ⱼ keeps rows
    whose multipliers cancel (two rows bounding one variable from both sides) from asking for more."""
    size = units.row_sides + s
    # two products of one row each, not one of two rows: under compilation rows and columns are the library's
    # (``linalg.vector_in_library``) where a product of two rows would be inductor's own sum
    seen, cancelling = mtv(units.g_abs, lam_s / size), mtv(units.g_abs, lam)  # |G|ᵀ(λs/P), |G|ᵀλ
    terms = torch.maximum(dual[1:].abs().amax(0), cancelling)
    return (seen / torch.addcmul(units.dual_absolute, terms, constant(rel_tol, terms))).amax(-1)


def initial_point(data: QPData, settings: IPMSettings, retries: int = MAX_FACTOR_RETRIES) -> State:
    """Mehrotra/CVXOPT start: least-squares x with W = I, then s and λ shifted into the interior.
    Its factorisation retries failed problems at once (one host synchronisation; none with
    ``retries=0``); a problem that still fails is a numerical failure."""
    B, n = data.p.shape
    m, k = data.b.shape[-1], data.h.shape[-1]
    ones = data.h.new_ones(B, k)
    reg = data.p.new_full((B,), settings.reg)
    rows = _start_row_scales(data.h) if k else ones
    f = factor_kkt(data.Q, data.A, data.G, rows * rows, reg, reg, retries=retries, diagonal=data.diagonal,
                   augment=settings.augment)
    x, nu, z = solve_reduced(f, -data.p, data.b, -data.h, settings.refine_steps)
    if k:
        z = z / rows  # the scaled rows' G'x − h' = α(Gx − h)
        # a far row that the fit (which all but left it out) violates is one the objective pushes on,
        # likely active: it takes the start of its own scale (``_start_row_scales``; other rows have α = 1)
        own = torch.where(z > 0, 1.0, rows)
        z, rows = z * own / rows, own
        shift_s = z.amax(-1, keepdim=True)
        shift_l = (-z).amax(-1, keepdim=True)
        s = torch.where(shift_s >= 0, -z + 1 + shift_s, -z).clamp(min=_INTERIOR_FLOOR) / rows
        lam = torch.where(shift_l >= 0, z + 1 + shift_l, z).clamp(min=_INTERIOR_FLOOR) * rows
    else:
        s, lam = ones, ones
    status = torch.where(f.ok, RUNNING, int(QPStatus.NUMERICAL_ERROR))
    zeros = torch.zeros(B, dtype=torch.int64, device=x.device)
    no = torch.zeros(B, dtype=torch.bool, device=x.device)
    v = torch.cat([x, nu, lam, s], dim=-1)
    return State(v, status, zeros, zeros.new_zeros(B, 4), reg, no, no, n, m, k,
                 best=torch.full((B, 2), torch.inf, dtype=v.dtype, device=v.device), best_v=v.clone())


def _start_row_scales(h: Tensor) -> Tensor:
    """(B, k) factors αᵢ by which ``initial_point`` scales the rows of Gx ≤ h (αG, αh) for its start,
    whose s and λ it then maps back (s/α, αλ): 1 but on the far rows (``sides.far_sides``), which it
    brings to the size of the largest other side. The start is a least-squares fit of Gx to h and a
    shift of every row by the largest residual, so a far row (a bound of 1e12 among unit rows: one
    never active) pulled x to its side and shifted every other row's λ to it: the method then
    stalled at a gap of 1e13 (5 of 8 random QPs with one such bound reached the iteration limit).
    Scaled, the far row barely weighs in the fit, and starts with its slack at its side and λ at
    the other rows' size over it (sλ is unchanged by the scaling, as are the Newton directions).
    A far row that the fit then violates (the objective pushes the variables beyond it: z₀ ≤ 1e6
    with p₀ = −1e8) is active at the solution, not absent: scaled, its multiplier would be as large
    as the scale is small, and the solve ended MAX_ITER at 1e6 and NUMERICAL_ERROR at 1e8; it
    takes its own scale back after the fit. Where no side is far the start is CVXOPT's, bit for bit."""
    far, typical = far_sides(h)
    return torch.where(far, (1 + typical.unsqueeze(-1)) / h.abs(), constant(1.0, h))


def newton_iteration(data: QPData, units: Units, st: State, res: Residuals, settings: IPMSettings,
                     stiff: str = "none") -> Step:
    """The engine's predictor-corrector step (``engine.step.newton_step``) on the QP's rows: the
    inequalities are its nonnegative rows, there are no other cones; ``stiff`` as there. Its
    factorisation's health leaves out the finiteness of the factors: ``assess`` treats a
    non-finite step as a failed factorisation. Only the running problems' steps are taken
    (``assess``), so only theirs need be factorised (``newton_step``'s ``active``): under
    compilation, where the batch keeps its finished problems (eagerly they are shed, and the mask
    would be a kernel per iteration for nothing)."""
    active = st.status == RUNNING if torch.compiler.is_compiling() else None
    return newton_step(data, None, (), st, res, units.backtrack, settings.rules, stiff, check_finite=False, active=active)


def _certificates(data: QPData, st: State, res: Residuals, step: Step, eps: float,
                  reg_limit: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Whether the step is negligible (α < ``_NEGLIGIBLE_STEP``), whether the direction looks like
    a primal (Farkas) or a dual infeasibility certificate, and whether the iteration made no progress
    (``Residuals.progress`` against ``State.best``; see ``IPMSettings.progress_limit``), as (B, 4) (the
    order of ``State.counters``); whether the step is sound (B,): the problem runs, its factorisation
    succeeded and the step is finite; and, for ``assess``, whether the problem runs (B,) and whether
    its regularisation is below ``reg_limit`` (B,: ``kkt.raisable``), in the same comparison.

    Primal infeasibility, the direction dy = (dν, dλ) with its negative dλ dropped, y⁺ = (dν, dλ⁺):
    ‖Aᵀdν + Gᵀdλ⁺‖ ≤ ε‖dy‖, bᵀdν + hᵀdλ⁺ < −ε‖dy‖, and −(bᵀdν + hᵀdλ⁺) > r‖Aᵀdν + Gᵀdλ⁺‖ with
    r = min(2(1 + n‖x‖∞), 1/ε);
    dλ ≥ −ε‖dy‖; and ‖dy‖ > 64 ε₆₄ ‖y‖ (``_ROUNDING``): where the duals have converged, a step dy at
    their rounding passes the relative tests by rounding (‖dy‖ = 1e-16 ‖y‖ certified a feasible LP;
    right certificates were seen to fire with ‖dy‖ down to 1.8e-12 ‖y‖). As y⁺ ≥ 0 exactly, every
    feasible point x̄ has ‖x̄‖₁ ≥ −(bᵀdν + hᵀdλ⁺) / ‖Aᵀdν + Gᵀdλ⁺‖ (as below), so the third test puts
    every feasible point beyond twice the iterate's size (n‖x‖∞ ≥ ‖x‖₁), or beyond 1/ε where the
    iterate has diverged (an infeasible element of the fuzzing, certified at ‖x‖ = 3e20 by a
    direction of radius 3e16). The relative tests alone put
    feasible points only beyond about one (scaled) unit, and pass on feasible LPs with equality rows
    2^-27 to 2^-40 apart, feasible at integer points within four units, by directions whose negative
    dλ, on rows with h > 0, make bᵀdν + hᵀdλ negative (``tests/qp/test_status.py``). A radius of 1/ε,
    as the iterate's test below asks, is beyond the regularised direction's accuracy (‖Aᵀdν + Gᵀdλ⁺‖
    of 3e-11 to 8e-10 ‖dy‖ in the last iterations of a box |x| ≤ 1 with a·x = ‖a‖₁ + 1e-2 or 1e-4):
    it leaves such problems uncertified from margins of 2e-3 down.
    Or the iterate y = (ν, λ) itself (λ > 0 always, so no sign test):
    ‖Aᵀν + Gᵀλ‖ < ε(−bᵀν − hᵀλ), bᵀν + hᵀλ < −ε‖y‖, with the primal residual unmet. Every
    feasible x then has ‖x‖₁ > 1/ε (0 ≥ yᵀ(Gx − h, Ax − b) ≥ −‖Aᵀν + Gᵀλ‖‖x‖₁ − bᵀν − hᵀλ): the
    test proves that no point within 1/ε of the origin (scaled problem) is feasible. It catches
    infeasible LPs whose direction fails the sign test for good: once s → 0 and λ → ∞ the
    inequality regularisation δᵢ outweighs W = S/Λ and dλ follows the residual rows of either sign
    (1-D LPs with G = (2.5, 0.7, −0.3, −1.3): dλ_min = −0.035‖dy‖ for 70 iterations), while λ
    grows along a Farkas direction. Either test's iterations count towards the persistence.
    Dual infeasibility dx: ‖Q dx‖ ≤ ε‖dx‖, ‖A dx‖ ≤ ε‖dx‖, G dx ≤ ε‖dx‖, pᵀdx < −ε‖dx‖, and the
    objective still descends at the far point x + T dx, T = ‖x‖/‖dx‖: (Q(x + T dx) + p)ᵀdx < −ε‖dx‖.
    The last test keeps a bounded problem whose Q is singular to working precision along dx
    (‖Q dx‖ ≤ ε‖dx‖, yet dxᵀQ dx > 0: scalings of 1e5 leave such directions) from passing: along a
    true recession direction the objective falls on every scale, while there its curvature stops
    the descent within the iterate's reach (the slope at x is about −pᵀdx when x is near an optimum).
    It is waived where x has diverged (``_DIVERGED``).
    Or the iterate x itself, once it has diverged (‖x‖ > ``_DIVERGED``) and while it still moves (the
    step about to be taken, α‖dx‖, is at least ``_STILL_DIVERGING``‖x‖): ‖Qx‖ ≤ ε‖x‖, ‖Ax‖ ≤ ε‖x‖,
    Gx ≤ ε‖x‖, (Qx + p)ᵀx < −ε‖x‖, with the dual residual unmet (Qx, Ax and Gx read back from the
    residuals: r_d − p − Aᵀν − Gᵀλ, r_e + b, r_i + h − s). Without the divergence a primal
    infeasible element scaled by 1e5.7, its iterate stuck at ‖x‖ = 1.5e6 with Ax and Gx within
    ε‖x‖ (inconsistent equalities hold ‖Ax‖ bounded), passed and was reported unbounded; without
    the movement, another, stuck at ‖x‖ = 1.3e14 (its dual feasible, but only with multipliers
    beyond 1/ε). Then x/‖x‖ passes the direction's tests, and every dual feasible point has
    ‖(x, ν, λ)‖ > 1/ε roughly (pᵀx = −(Qw + Aᵀν + Gᵀλ)ᵀx for any such point), the dual counterpart
    of the iterate's Farkas test. It catches unbounded problems whose iterate diverges along a
    recession direction while the Newton directions pass their tests in fewer than
    ``_CERTIFICATE_PERSISTENCE`` consecutive iterations (the 14 unbounded elements that the 10,000
    fuzzed batches of the AMD EPYC run left at ``MAX_ITER``, with the factorisation of H + σAᵀA);
    its iterations count towards the persistence as the direction's do.
    The Newton equations give Aᵀdν + Gᵀdλ = −r_d − Q dx, so Aᵀdν + Gᵀdλ⁺ = −r_d − Q dx − Gᵀmin(dλ, 0);
    A dx and G dx are measured (the regularised step need not satisfy A dx = −r_e,
    G dx = −r_i − ds where A is rank deficient).
    All families of comparisons are one stacked operation.
    """
    n, m, k = st.n, st.m, st.k
    dv, x = step.dv, st.x
    dx, dy, dlam = dv[:, :n], dv[:, n : n + m + k], dv[:, n + m : n + m + k]
    # ‖r_d + Q dx‖ (= ‖Aᵀdν + Gᵀdλ‖), ‖Q dx‖, ‖dx‖, ‖x‖; [Q dx, dx] is reused below
    # and ‖Aᵀν + Gᵀλ‖ at the iterate
    # and, for the iterate's recession test, Qx + p = r_d − Aᵀν − Gᵀλ and Qx
    aty = res.y_terms.sum(1) if m else res.y_terms[:, 0]
    qx_p = res.r_d - aty
    # the direction's certificate is (dν, dλ⁺), its negative dλ dropped (``_certificates``' docstring):
    # −(Aᵀdν + Gᵀdλ⁺) = r_d + Q dx + Gᵀ min(dλ, 0)
    certificate_terms = res.r_d + step.q_dx
    if k:
        dlam_plus = dlam.clamp_min(0.0)
        certificate_terms = add_mtv(certificate_terms, data.G, dlam - dlam_plus)
    on_x = torch.stack([certificate_terms, step.q_dx, dx, qx_p, x, aty, qx_p - data.p])
    residual_y, norm_qdx, nx, _, norm_x, norm_aty, norm_qx = inf_norm(on_x)
    if m + k:
        dy_plus = (torch.cat([dy[:, :m], dlam_plus], -1) if m else dlam_plus) if k else dy
        dy_y = torch.stack([dy, st.v[:, n : n + m + k], dy_plus])
        ny, norm_y = inf_norm(dy_y[:2])
        by = torch.cat([data.b, data.h], -1) if m and k else (data.b if m else data.h)
        farkas_iterate, farkas_value = (dy_y[1:] * by).sum(-1)  # bᵀν + hᵀλ, bᵀdν + hᵀdλ⁺
    else:
        ny = norm_y = farkas_value = farkas_iterate = torch.zeros_like(nx)
    # pᵀdx, and the objective's slope along dx at x + T dx, T = ‖x‖ / ‖dx‖: pᵀdx + (x + T dx)ᵀQ dx
    # and the objective's slope along x at x: (Qx + p)ᵀx
    far_point = torch.addcmul(x, (norm_x / nx).unsqueeze(-1), dx)
    far_q_slope, p_slope, x_slope = (torch.stack([far_point, data.p, x]) * on_x[1:4]).sum(-1).unbind(0)
    far_slope = (far_q_slope + p_slope).masked_fill(norm_x > _DIVERGED, -torch.inf)  # an iterate beyond reach: test waived
    # ε‖dy‖, ε‖dx‖, 64 ε₆₄ ‖y‖ (``_ROUNDING``), −ε(bᵀν + hᵀλ); −ε‖dy‖, −ε‖dx‖, −ε‖y‖ in one product, and
    # ε‖x‖, ``_STILL_DIVERGING``·‖x‖, −ε‖x‖ in another (constants of at most 8 entries: inductor writes larger
    # ones as tensors of the graph, which its C++ wrapper leaves undeclared inside the compiled loop's body)
    (eps_y, eps_x, rounding_y, eps_farkas), (minus_eps_y, minus_eps_x, minus_eps_norm_y, _) = (
        torch.stack([ny, nx, norm_y, farkas_iterate])
        * constant((eps, eps, _ROUNDING, -eps, -eps, -eps, -eps, 0.0), nx).view(2, 4, 1))
    # bᵀdν + hᵀdλ⁺ + min(2(1 + n‖x‖∞), 1/ε)‖Aᵀdν + Gᵀdλ⁺‖: negative where (dν, dλ⁺) puts every feasible
    # point beyond twice the iterate's size, or beyond 1/ε (``_certificates``' docstring)
    radius = torch.add(constant(2.0, nx), norm_x, alpha=2.0 * n).clamp_max(1.0 / eps)
    beyond_iterate = torch.addcmul(farkas_value, residual_y, radius)
    zero = constant(0.0, nx).expand(nx.shape[0])
    eps_norm_x, moving_x, minus_eps_norm_x = norm_x * constant((eps, _STILL_DIVERGING, -eps), nx).unsqueeze(-1)
    (primal_limit, dual_limit, *_), (primal, dual, *_) = res.limit.unbind(-1), res.measured.unbind(-1)
    # without equality (inequality) rows their tests are taken by another test of the same certificate
    farkas_rows = [(residual_y, eps_y), (farkas_value, minus_eps_y), (beyond_iterate, zero),
                   # dy must move y: a step of dy at y's rounding (an optimum's dual, converged) passes the relative tests by rounding
                   (rounding_y, ny),
                   # a primal (dual) infeasible problem cannot have its primal (dual) residual within tolerance:
                   # there the direction is an optimum's vanishing step, whose relative tests are rounding noise
                   (primal_limit, primal),
                   (minus_eps_y, dlam.amin(-1)) if k else (residual_y, eps_y)]
    recession_rows = [(norm_qdx, eps_x), (inf_norm(mv(data.A, dx)) if m else norm_qdx, eps_x),
                      (mv(data.G, dx).amax(-1) if k else norm_qdx, eps_x), (p_slope, minus_eps_x),
                      (far_slope, minus_eps_x), (dual_limit, dual)]
    # the iterate's own Farkas test (λ > 0 always): ‖Aᵀν + Gᵀλ‖ < ε(−bᵀν − hᵀλ), bᵀν + hᵀλ < −ε‖y‖, primal unmet
    iterate_rows = [(norm_aty, eps_farkas), (farkas_iterate, minus_eps_norm_y), (primal_limit, primal)]

    # the tests' constant sides, (B,) each, as rows of one constant
    negligible, below_running, above_running, half, minus_inf, inf, reg_cap = constant(
        (_NEGLIGIBLE_STEP, RUNNING - 0.5, RUNNING + 0.5, 0.5, -torch.inf, torch.inf, reg_limit), nx
    ).unsqueeze(-1).expand(-1, nx.shape[0]).unbind(0)
    diverged = constant(_DIVERGED, nx).expand(nx.shape[0])
    # the iterate's own recession test: ‖Qx‖, ‖Ax‖ < ε‖x‖, Gx < ε‖x‖, (Qx + p)ᵀx < −ε‖x‖, dual unmet,
    # with Ax and Gx read back from the residuals (r_e + b, r_i + h − s); diverged, and still moving
    iterate_recession_rows = [(norm_qx, eps_norm_x), (inf_norm(res.r_e + data.b) if m else norm_qx, eps_norm_x),
                              ((res.r_i + data.h - st.s).amax(-1) if k else norm_qx, eps_norm_x),
                              (x_slope, minus_eps_norm_x), (dual_limit, dual), (diverged, norm_x),
                              (moving_x, step.alpha * nx)]
    stall_rows = [(step.alpha, negligible)]
    total = dv.sum(-1)  # NaN or ±inf if any part of the direction is (α is finite: max_step ignores NaN)
    # the status (an integer) is RUNNING, the factorisation succeeded (bool), the direction and α are finite
    status, factor_ok = st.status, step.factor_ok
    if not torch.compiler.is_compiling() and cpu_schedule(nx.device):
        # the integer status and the flag cast first (exactly): torch stacks tensors of one dtype on
        # its fast path, where the stack below that promotes them took 66 against 28 µs for its 63
        # rows (one thread), twice an iteration; elsewhere the stack promotes them in its one kernel
        status, factor_ok = status.to(nx.dtype), factor_ok.to(nx.dtype)
    running_rows = [(below_running, status), (status, above_running)]
    sound_rows = [*running_rows, (half, factor_ok), (minus_inf, total), (total, inf), (step.alpha, inf)]
    raisable_rows = [(st.reg, reg_cap)]
    # no progress: neither measure of ``Residuals.progress`` fell below ``_PROGRESS`` times its value at the last progress
    progress_rows = list(zip((st.best * _PROGRESS).unbind(-1), res.progress.unbind(-1)))
    # every test strict: ‖·‖ < ε·size also says size > 0; all nine families in one comparison (stack promotes
    # the status and the flags to floats exactly)
    families = (stall_rows, farkas_rows, recession_rows, sound_rows, running_rows, raisable_rows, iterate_rows,
                progress_rows, iterate_recession_rows)
    if torch.compiler.is_compiling():
        # the same comparisons, joined by ``&``: inductor fuses them either way, and on the CPU it
        # writes each input of a stack into a slice of its output, which its C++ wrapper names by
        # a tensor handle of its own at every iteration (72 here; see ``compiling.POINTWISE_CAT_OPTIONS``)
        tests = [functools.reduce(operator.and_, (lower < upper for lower, upper in family)) for family in families]
        return torch.stack([tests[0], tests[1] | tests[6], tests[2] | tests[8], tests[7]], -1), tests[3], tests[4], tests[5]
    # each family padded to the longest by repeating its first test (which leaves its verdict as it is),
    # so that the verdicts are the rows of one (families, width) comparison
    width = max(map(len, families))
    padded = (row for family in families for row in family + family[:1] * (width - len(family)))
    lower, upper = (torch.stack(side) for side in zip(*padded))
    stall, farkas, recession, sound, running, raisable, iterate, stuck, iterate_recession = (
        lower < upper).unflatten(0, (len(families), -1)).all(1)
    return torch.stack([stall, farkas | iterate, recession | iterate_recession, stuck], -1), sound, running, raisable


# The far-point slope test of a recession direction is waived where ‖x‖ (scaled) exceeds this
# (≈ 1/√ε of float64): an unbounded problem's iterate has diverged there, and x's rounding-level
# components times a Q dx at the solve's accuracy outweigh pᵀdx; the bounded problems this test
# keeps from being certified have iterates of 1e3–1e6.
_DIVERGED = 1e8
# A dual step below this fraction of the duals (64 ulps) is their rounding, no Farkas direction.
_ROUNDING = 64 * torch.finfo(torch.float64).eps
# A certificate must hold for this many consecutive iterations before it is believed.
_CERTIFICATE_PERSISTENCE = 3
# The iterate's own recession test counts where the step about to be taken moves x by at least this
# fraction of ‖x‖ (infinity norms): an unbounded problem's iterate is still diverging there, where
# a primal infeasible one's was seen stuck at ‖x‖ = 1.3e14 (scaled) with every relative test passed.
_STILL_DIVERGING = 1e-2
# A step shorter than this is negligible progress.
_NEGLIGIBLE_STEP = 1e-10
# Progress (``IPMSettings.progress_limit``): a measure of ``Residuals.progress`` below this times its
# value at the last progress.
_PROGRESS = 0.9
# The column of ``State.counters`` that counts iterations without progress (after stalls, primal and
# dual infeasibility certificates).
_PROGRESS_COUNTER = 3
# A problem that stops progressing ends INACCURATE where the residuals of the iterate of its last
# progress are within this many times their tolerances (its ``Residuals.progress``).
_REDUCED_ACCURACY = 100.0


def assess(data: QPData, st: State, res: Residuals, step: Step, settings: IPMSettings) -> State:
    """Take the step where the problem is running and sound; update statuses and counters.

    A problem whose factorisation failed (or whose step is not finite: a factor with NaN) keeps
    its iterate and retries with more regularisation
    (``kkt.next_regularisation``); once that has happened ``MAX_FACTOR_RETRIES`` times in a row it
    is a numerical failure. (The host may then switch it to the stiff split: ``_switch_stiff``.)"""
    # sound: running, factored, finite; can_raise: kkt.raisable
    events, sound, running, can_raise = _certificates(data, st, res, step, settings.infeasibility_tol,
                                                      raise_limit(settings.reg))
    unsound = running > sound  # a factor with NaN gives a NaN step
    retry, gave_up = unsound & can_raise, unsound > can_raise  # as kkt.next_regularisation
    reg = regularisation_after(st.reg, settings.reg, retry, sound)
    taken = sound.unsqueeze(-1)
    # progress (the fourth event is its absence): the iterate and its measures become the reference
    # (both measures, though one may have risen; a NaN measure reads as progress, so NaN residuals
    # never trigger the test)
    progressed = taken > events[:, _PROGRESS_COUNTER:]
    best, best_v = torch.where(progressed, res.progress, st.best), torch.where(progressed, st.v, st.best_v)
    v = torch.where(taken, torch.addcmul(st.v, step.alpha.unsqueeze(-1), step.dv), st.v)
    counters = torch.where(taken, torch.addcmul(events, st.counters, events), st.counters)  # (c + 1)·e
    # a stall, a primal and a dual infeasibility certificate, and no progress, held long enough
    stalled, primal_infeasible, dual_infeasible, stuck = (counters >= constant(
        (settings.stall_limit, _CERTIFICATE_PERSISTENCE, _CERTIFICATE_PERSISTENCE, settings.progress_limit), counters)).unbind(-1)
    # no progress near tolerance (INACCURATE), a failure or a stall, then dual, then primal infeasibility:
    # the later test wins. Where both certificates hold, primal infeasibility is reported: its tests ask
    # for the primal residual unmet, which an unbounded problem's iterates meet, while the recession
    # test's relative margins pass by rounding on a badly scaled problem with inconsistent equalities
    # (‖A dx‖ = 7.6e-8 ‖dx‖, pᵀdx = −1.3e-7 ‖dx‖ against ε = 1e-7: a fuzzed linear program whose dual
    # is feasible by construction, reported unbounded)
    status = st.status.masked_fill(stuck & (best[:, 0] <= _REDUCED_ACCURACY), int(QPStatus.INACCURATE))
    status = status.masked_fill(gave_up | stalled, int(QPStatus.NUMERICAL_ERROR))
    status = status.masked_fill(dual_infeasible, int(QPStatus.DUAL_INFEASIBLE))
    status = status.masked_fill(primal_infeasible, int(QPStatus.PRIMAL_INFEASIBLE))
    # an INACCURATE problem holds the iterate of its last progress (frozen ones hold it already)
    v = torch.where((status == int(QPStatus.INACCURATE)).unsqueeze(-1), best_v, v)
    return replace(st, v=v, status=status, iterations=st.iterations + sound, counters=counters, reg=reg,
                   best=best, best_v=best_v)


def _look_flags(st: State, res: Residuals, units: Units, running: Tensor, iteration: int,
                settings: IPMSettings) -> Tensor:
    """(4, B) masks that the host's look before iteration ``iteration`` counts (``host.look``):

    0. running problems to switch to the stiff split (``_switch_stiff``): a factorisation has
       failed since the start (fewer steps than iterations), and they have not been switched yet;
    1. stiff ones to switch back: their stiff factorisation failed too (the step raised ``reg``);
    2. running stiff ones;
    3. running problems whose gap alone fails the convergence test, with the complementarity sᵀλ
       within tolerance: there the gap may be rounding (``_accept_accurate_gaps``)."""
    switch = ((st.iterations < iteration) > st.stiff_tried) & running
    stiff = running & st.stiff
    met = res.met
    gap_alone = ((met[:, :2].all(-1) & met[:, 3]) > met[:, 2]) & (res.mu * units.cost <= units.absolute[:, 4] / max(st.k, 1))
    return torch.stack([switch, stiff & (st.reg > settings.reg), stiff, gap_alone & running])


def _switch_stiff(st: State, switch: Tensor, back: Tensor, settings: IPMSettings) -> State:
    """Switch problems to the stiff split, where they retry at the base regularisation, or back
    (keeping the raised ``reg``, with the plain factorisation); each problem switches once."""
    return replace(st, stiff=(st.stiff | switch) & ~back, stiff_tried=st.stiff_tried | switch,
                   reg=st.reg.masked_fill(switch, settings.reg))


# Veltkamp's splitting constant for float64 (2²⁷ + 1): a = hi + lo with 26-bit halves, whose
# products are exact.
_SPLITTER = 134217729.0


def _two_product(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """a·b = p + e exactly (Dekker): p the rounded product, e its rounding error."""
    p = a * b
    t, u = a * _SPLITTER, b * _SPLITTER
    a_hi, b_hi = t - (t - a), u - (u - b)
    a_lo, b_lo = a - a_hi, b - b_hi
    return p, a_lo * b_lo - (((p - a_hi * b_hi) - a_lo * b_hi) - a_hi * b_lo)


def _compensated_sum(v: Tensor) -> tuple[Tensor, Tensor]:
    """Sum over the last dimension as s + c: s the pairwise sum, c the sum of the rounding errors
    of its additions (Knuth's TwoSum at each level), so that s + c is off by ≈ ε² Σ|v|."""
    width = 1 << max(v.shape[-1] - 1, 0).bit_length()
    v = torch.nn.functional.pad(v, (0, width - v.shape[-1]))
    c = v.new_zeros(v.shape[:-1])
    while v.shape[-1] > 1:
        a, b = v[..., 0::2], v[..., 1::2]
        s = a + b
        bb = s - a
        c = c + ((a - (s - bb)) + (b - bb)).sum(-1)
        v = s
    return v[..., 0], c


def accurate_gap(data: QPData, units: Units, st: State) -> Tensor:
    """|xᵀQx + pᵀx + hᵀλ + bᵀν| (B,) in the original problem's units, evaluated with error-free
    products and sums: about as accurate as the iterate, where the plain evaluation of
    ``residuals`` is off by ε times the largest term (terms of 1e8 that cancel to 1e-9 read as
    1e-8 there: Maros–Meszaros QISRAEL). Costs a few dozen kernels on (B, n, n); run only when a
    problem's gap is the one test it fails."""
    q_hi, q_err = _two_product(data.Q, st.x.unsqueeze(-2))  # Q_ij x_j
    qx, qx_err = _compensated_sum(q_hi)
    qx_lo = qx_err + q_err.sum(-1)  # Qx = qx + qx_lo to about ε² |Q||x|
    pairs = [(st.x, qx), (data.p, st.x), (data.h, st.lam), (data.b, st.nu)]
    products = [_two_product(u, v) for u, v in pairs if u.shape[-1]]
    total, err = _compensated_sum(torch.cat([p for p, _ in products], dim=-1))
    err = err + torch.cat([e for _, e in products], dim=-1).sum(-1) + _pair_dots(st.x, qx_lo)
    return (total + err).abs() * units.cost


def _accept_accurate_gaps(data: QPData, units: Units, st: State, res: Residuals, candidates: Tensor) -> Residuals:
    """``res`` where the ``candidates`` (problems whose primal and dual residuals are within
    tolerance) pass the convergence test with the gap of ``accurate_gap`` against the gap's
    tolerance (the limit that ``residuals`` set, with the plain measurement's rounding bound given
    back: ``accurate_gap`` is exact to about ε times the gap): their measured gap and its limit
    replaced by those, so that they read converged."""
    gap = torch.maximum(accurate_gap(data, units, st), res.mu * max(st.k, 1) * units.cost)
    tolerance = res.limit[:, 2] + _GAP_ROUNDING * res.gap_size
    passed = candidates & res.met[:, :2].all(-1) & res.met[:, 3] & (gap <= tolerance)
    measured, limit = res.measured, res.limit
    return replace(res, measured=torch.stack([measured[:, 0], measured[:, 1], torch.where(passed, gap, measured[:, 2]), measured[:, 3]], -1),
                   limit=torch.stack([limit[:, 0], limit[:, 1], torch.where(passed, tolerance, limit[:, 2]), limit[:, 3]], -1))


# RUNNING is the one status below SOLVED, so that raising a status to at least SOLVED marks a running
# problem solved and leaves a finished one as it is.
if not RUNNING < int(QPStatus.SOLVED) == min(int(s) for s in QPStatus):  # checked under python -O too
    raise ImportError(f"_mark_converged needs RUNNING ({RUNNING}) to be the one status below SOLVED "
                      f"({int(QPStatus.SOLVED)}), got statuses {sorted(int(s) for s in QPStatus)}")


def _mark_converged(st: State, res: Residuals) -> State:
    """Running problems that pass the convergence test are solved (two kernels)."""
    return replace(st, status=torch.where(res.converged, st.status.clamp(min=int(QPStatus.SOLVED)), st.status))


def start(data: QPData, units: Units, settings: IPMSettings,
          retries: int = MAX_FACTOR_RETRIES) -> tuple[State, Residuals]:
    """The initial point, its residuals and its convergence test (a start may already be optimal);
    ``retries`` as in ``kkt.factor_kkt``."""
    st = initial_point(data, settings, retries)
    res = residuals(data, units, st, settings)
    return _mark_converged(st, res), res


def step(data: QPData, units: Units, st: State, res: Residuals, settings: IPMSettings,
         stiff: str = "none") -> tuple[State, Residuals]:
    """One iteration for every problem, with no host synchronisation: a predictor-corrector step
    where the problem is still running, then the residuals and the convergence test at the new
    point. The test ends the step, so that a host look right after it sees the convergence.
    ``stiff`` as in ``newton_iteration``."""
    st = assess(data, st, res, newton_iteration(data, units, st, res, settings, stiff), settings)
    res = residuals(data, units, st, settings)
    return _mark_converged(st, res), res


def _start_unretried(data: QPData, units: Units, settings: IPMSettings) -> tuple[State, Residuals]:
    return start(data, units, settings, retries=0)


def _derivative_factor_unretried(Q: Tensor, A: Tensor, G: Tensor, lam: Tensor, s: Tensor, settings: IPMSettings,
                                 diagonal: bool = False) -> KKTFactor:
    return derivative_factor(Q, A, G, lam, s, settings, retries=0, diagonal=diagonal)


class _StiffAndGapLook:
    """The QP's part in the host's look (``engine.loop.Look``): it counts the flags of
    ``_look_flags``, switches problems whose factorisation has failed to the stiff split (see
    ``newton_iteration``; such steps run eagerly) and tests problems whose gap alone fails the
    convergence test again with ``accurate_gap``. ``accurate_gaps`` records on the host whether
    some problem was found converged that way (the end of the solve reports their gap again)."""

    def __init__(self, settings: IPMSettings, plain_step: Callable) -> None:
        self.settings, self.plain_step, self.accurate_gaps = settings, plain_step, False

    def flags(self, data: tuple, st: State, res: Residuals, running: Tensor, iteration: int) -> Tensor:
        return _look_flags(st, res, data[1], running, iteration, self.settings)

    def react(self, data: tuple, st: State, res: Residuals, flags: Tensor, counts: list[int], running: int,
              step_now: Callable) -> tuple[State, Residuals, Callable]:
        switch, back, marked, gap_alone = counts
        settings = self.settings
        if switch or back:
            st = _switch_stiff(st, flags[0], flags[1], settings)
            marked += switch - back
        if gap_alone:
            res = _accept_accurate_gaps(*data, st, res, flags[3])
            st, self.accurate_gaps = _mark_converged(st, res), True
        if marked == 0:
            return st, res, self.plain_step
        stiff = "all" if marked == running else "mixed"
        return st, res, lambda data, units, st, res: step(data, units, st, res, settings, stiff)


def solve_scaled(data: QPData, sc: Scaling, settings: IPMSettings, with_factor: bool = True) -> IPMResult:
    """Run the interior point method on a scaled batch until every problem has a status; with
    ``with_factor``, also factorise the KKT system at the solution for the derivatives.

    The iterations run in the engine's loop (``engine.loop.run``) without host synchronisation
    (compiled into one graph with ``settings.compiled``, whose batch keeps its shape: finished
    problems stay in it, frozen; on the CPU the QP's forward compiles its solves with
    ``qp.fused.whole`` instead). The
    loop's looks also count the flags of ``_look_flags`` (``_StiffAndGapLook``). One more read at
    the end tells which problems failed and whether the derivatives' factorisation needs a retry."""
    units = Units.of(sc, data, settings)
    device = data.p.device
    if settings.compiled or graphs_calls(device, settings.compiled):
        full, res = solve_part(_start_unretried, settings, device)(data, units, settings)
        if host_read((full.status == int(QPStatus.NUMERICAL_ERROR)).any(0, keepdim=True))[0]:
            full, res = start(data, units, settings)  # the start's factorisation retried with more regularisation
    else:
        full, res = start(data, units, settings)
    step_fn = compiled(step, device.type) if settings.compiled else step
    plain_step = lambda data, units, st, res: step_fn(data, units, st, res, settings)  # noqa: E731
    if replays_graphs(device, settings.compiled):  # one CUDA graph launch per iteration; a graph per setting of what the step reads
        plain_step = GraphedStep(plain_step, graph_key(settings))
    return iterate(data, units, full, res, plain_step, settings, with_factor)


def graph_key(settings: IPMSettings) -> tuple:
    """What a CUDA graph of the solve's parts depends on beyond its arguments' layout: the settings,
    the inversion limit and torch's CUDA linear algebra library (both read where it is captured)."""
    return (settings, *linalg_key())


def solve_part(fn: Callable, settings: IPMSettings, device: torch.device) -> Callable:
    """``fn``, a part of the solve without host synchronisation, as the solve runs it on
    ``device``: compiled with ``settings.compiled``, replayed from a CUDA graph where
    ``engine.graphed.graphs_calls`` says so."""
    run = compiled(fn, device.type) if settings.compiled else fn
    return GraphedCall(run, (fn, *graph_key(settings))) if graphs_calls(device, settings.compiled) else run


def iterate(data: QPData, units: Units, full: State, res: Residuals, plain_step: loop.Step | loop.Steps,
            settings: IPMSettings, with_factor: bool, first: int = 0, factor: KKTFactor | None = None,
            resume: bool = True) -> IPMResult:
    """``solve_scaled`` from iteration ``first`` at ``full`` (with residuals ``res``): the engine's
    loop with ``plain_step`` (unless the host's look reacts), then the statuses, the residuals and
    the derivatives' factorisation; ``factor``, where given, is that factorisation at ``full``,
    used if the loop takes no step. Problems that stopped progressing with their dual residual
    failing go on from smaller multipliers (``_smaller_multipliers_of_unsolved``); with ``resume``,
    those that do not pass the test at once run again, once, in the iterations left."""
    device = data.p.device
    hook = _StiffAndGapLook(settings, plain_step)
    graphed = isinstance(plain_step, GraphedStep)  # a fixed batch: each smaller one would be another capture
    outcome = loop.run((data, units), full, res, plain_step, settings.max_iter, device, hook,
                       compact=not (settings.compiled or graphed), first=first)
    if outcome.state.v is not full.v:
        factor = None
    full, res = outcome.state, outcome.working_res
    if outcome.index is not None:
        res = residuals(data, units, full, settings)
    elif graphed:
        full, res = owned(full), owned(res)  # out of the step's CUDA-graph buffers, which its next replay overwrites
    if hook.accurate_gaps:  # the problems that converged by their accurate gap report it again (later steps re-evaluated it)
        res = _accept_accurate_gaps(data, units, full, res, (full.status == int(QPStatus.SOLVED)) & ~res.converged)
    full = replace(full, status=full.status.masked_fill(full.status == RUNNING, int(QPStatus.MAX_ITER)))
    if with_factor and factor is None:
        factor = solve_part(_derivative_factor_unretried, settings, device)(data.Q, data.A, data.G, full.lam, full.s, settings, data.diagonal)
    unsolved, unfactored, inexact = host_read(torch.stack([
        full.status != int(QPStatus.SOLVED), full.status != full.status if factor is None else ~factor.ok,
        inexact_derivatives(full.status, full.lam, full.s, factor) if factor is not None else full.status != full.status]).any(-1))
    if unsolved:
        full, res = _accurate_gaps_of_inaccurate(data, units, full, res)
        full, res, polished, again = _smaller_multipliers_of_unsolved(data, units, full, res, settings,
                                                                      resume and outcome.iteration < settings.max_iter)
        if again:
            return iterate(data, units, full, res, plain_step, settings, with_factor, first=outcome.iteration, resume=False)
        unfactored = unfactored or (polished and with_factor)
    if unfactored:
        factor = derivative_factor(data.Q, data.A, data.G, full.lam, full.s, settings, diagonal=data.diagonal)
    return IPMResult(state=full, residuals=res, factor=factor, all_solved=not unsolved, inexact=bool(inexact))


def _accurate_gaps_of_inaccurate(data: QPData, units: Units, st: State, res: Residuals) -> tuple[State, Residuals]:
    """INACCURATE problems (their iterate that of their last progress) whose primal and dual
    residuals are within tolerance and whose gap passes with ``accurate_gap``: SOLVED. The host
    tests a gap accurately only at its looks (``_look_flags``), every few iterations where they
    are spaced out, so a problem whose plain gap is stuck at its rounding may stop progressing
    before a look has tested it."""
    candidates = (st.status == int(QPStatus.INACCURATE)) & ~res.converged
    res = _accept_accurate_gaps(data, units, st, res, candidates)
    return replace(st, status=st.status.masked_fill(candidates & res.converged, int(QPStatus.SOLVED))), res


def _smaller_multipliers_of_unsolved(data: QPData, units: Units, st: State, res: Residuals, settings: IPMSettings,
                                     resume: bool) -> tuple[State, Residuals, bool, bool]:
    """INACCURATE and MAX_ITER problems whose primal residual is within tolerance and whose dual
    residual is not, with the multipliers of ``multipliers.smaller_multipliers`` (see
    ``qp/multipliers.py`` for the problems this finds): SOLVED where the convergence test then
    passes (the gap accurately where it alone fails); with ``resume``, INACCURATE ones that do not
    pass RUNNING again from there, their progress test restarted; the others unchanged. Also
    returns whether some problem was SOLVED and whether some runs again (on the host: up to three
    synchronisations, on this path of unsolved problems only)."""
    unsolved = (st.status == int(QPStatus.INACCURATE)) | (st.status == int(QPStatus.MAX_ITER))
    index = (unsolved & res.met[:, 0] & ~res.met[:, 1]).nonzero().squeeze(-1)
    if index.numel() == 0:
        return st, res, False, False
    part_data, part_units, before = take(data, index), take(units, index), take(st, index)
    part = smaller_multipliers(part_data, before)
    part_res = residuals(part_data, part_units, part, settings)
    part_res = _accept_accurate_gaps(part_data, part_units, part, part_res, ~part_res.converged)
    passed = part_res.converged
    again = ~passed & (before.status == int(QPStatus.INACCURATE)) & resume
    changed = (passed | again).nonzero().squeeze(-1)
    if changed.numel() == 0:
        return st, res, False, False
    progress_column = torch.arange(st.counters.shape[-1], device=again.device) == _PROGRESS_COUNTER
    part = replace(part, status=torch.where(passed, int(QPStatus.SOLVED), torch.where(again, RUNNING, part.status)),
                   counters=part.counters.masked_fill(again.unsqueeze(-1) & progress_column, 0),
                   best=part.best.masked_fill(again.unsqueeze(-1), torch.inf),
                   best_v=torch.where(again.unsqueeze(-1), part.v, part.best_v))
    solved_some, again_some = host_read(torch.stack([passed.any(), again.any()]))
    return (put(st, index[changed], take(part, changed)), put(res, index[changed], take(part_res, changed)),
            solved_some, again_some)


def derivative_factor(Q: Tensor, A: Tensor, G: Tensor, lam: Tensor, s: Tensor, settings: IPMSettings,
                      retries: int = MAX_FACTOR_RETRIES, diagonal: bool = False) -> KKTFactor:
    """The KKT factorisation that the derivatives solve with, at a final iterate (λ, s) of the
    scaled problem (Q, A, G): near-active inequalities are kept out of H (see ``engine.step.STIFF_W_INV``).
    ``diagonal``: H is diagonal (``QPData.diagonal``)."""
    return factor_at(Q, A, G, lam, s, lam.new_full(lam.shape[:1], settings.reg), settings.rules, stiff=True, retries=retries,
                      diagonal=diagonal)
