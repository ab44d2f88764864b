"""Newton refinement of a solver's solution on the normalized residual map (Busseti et al. 2019).

Interior point solutions on the boundary of a curved cone are accurate only to about the square
root of the solver's tolerance, and SCS is run loosely for speed. With w = y - s, the residual
R(x, w) = (P x + A^T Pi_K*(w) + c,  -A x + b - Pi_K*(w) + w) has the derivative M of
embedding.py. In dense mode each Newton step solves with the exact M by iterative refinement
preconditioned with the previous factorization, refactorising only when that stalls (and falling
back to least squares where M is singular); the last factorization is kept for the backward
pass. A (backtracked) step is kept per element only if it lowers ||R||; an element stops at its
first step that does not (its next step, from the same point, would be the same); elements
never improved, and those whose refined point fails the SOLVED test with a larger KKT residual
(``kkt_residual``) than the solver's answer, keep the solver's answer. y = Pi_K*(w) and s = y - w stay exactly in K*, K and complementary.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from optlayers.cone import embedding, linsolve, product
from optlayers.cone.derivative import Point, solve_system
from optlayers.host import host_read
from optlayers.linalg import inf_norm

MAX_STEPS = 20  # Newton steps: an interior point method's answers reach TARGET in two or three; SCS's at its
# default eps (1e-4) can take damped steps for a while first: on docs/cone.md's example programs (batch 64,
# seeds 0 and 1) 6 steps left 9 and 6 of 64 INACCURATE or SOLVED but 1e-5 off, 12 left 2, 20 left 1, whose
# refinement stalls. A batch takes steps only while some element still improves (a batch of interior point
# answers stops after two or three)
TARGET = 1e-13  # relative residual below which an element needs no more steps (float64 round-off level)
UNREFINED_KKT = 1e-11  # relative KKT residual above which a SOLVED element was not refined to round-off (its
# refinement stalled, or was not run: refine_steps=0), so that its solution, and its derivative, are accurate
# only to about that: the forward solves it again at a tighter tolerance (cone.autograd.RETRY_TOLERANCES; with
# the default refine_steps or more), and the derivatives warn where that did not help. Refined answers sit far below it: on 3,072 programs of the
# cone_fallbacks kinds and docs/cone.md's example (two seeds of 128 each), from the interior point method and
# Clarabel, at most 1.4e-12; on 2,560 random programs of five kinds (cone.testing.random_program, with and
# without P) at most 3.2e-13. A stalled refinement ends well above it: from SCS at its default eps, at 1.4e-7
# and 3.7e-7 (one of which gave a derivative 2.4 % off), and at 8.6e-10 on one of docs/cone.md's example
# programs solved alone, with a dual 1.1 and a derivative 8e-4 off (1e-9, this bound until then, let it pass)
UNREACHED = 1e3  # an element whose refined point leaves ||R|| above this times TARGET did not reach it
# (``Refined.unreached``): refined answers end below TARGET itself (at most 0.9 of it on 2,560 random programs
# of five kinds from the interior point method and Clarabel); a refinement that found no step leaves the
# solver's own ||R||, 1e-7 relative on the two-variable program whose small variable is 2.4 % off
# (docs/cone.md, "A refinement that cannot start"), where the KKT residual, relative to the large
# variable's terms, is 6e-12
SOLVED_TOL = 1e-6  # relative KKT residual for SOLVED: refined answers reach ~1e-13, and an answer the
# refinement could not improve must still be as good as the solvers' own defaults (1e-8 Clarabel, 1e-4 SCS
# relative to their scaling) would suggest; anything worse is reported INACCURATE
NEWTON_FORCING = 1e-6  # relative accuracy of each Newton step's linear solve (inexact Newton: enough for
# superlinear convergence; the stopping test is on R itself)
MAX_BACKTRACKS = 4  # halvings of a Newton step that does not lower ||R|| (semismooth Newton can overshoot)


def residual(point: Point, b: torch.Tensor, c: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """R(x, w), (B, n + m)."""
    return _residual(point, b, c, w)[0]


def _residual(point: Point, b: torch.Tensor, c: torch.Tensor, w: torch.Tensor, guesses: list | None = None,
              near: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, list, tuple[torch.Tensor, ...]]:
    """R(x, w), y = Pi_K*(w), the exponential cones' roots and PSD cones' eigendecompositions of that
    projection (``product.project_with_roots``, whose root solves start from ``guesses`` or ``near``), and the
    products (A x, A^T y[, P x]) it took, which ``kkt_residual`` at (x, y) takes too."""
    y, roots = product.project_with_roots(point.spec, w, dual=True, guesses=guesses, near=near)
    aty = embedding.rmatvec(point.A, y)  # P x + A^T y + c (no zeros added without a P)
    px = None if point.P is None else embedding.matvec(point.P, point.x)
    dual = (aty if px is None else px + aty) + c
    ax = embedding.matvec(point.A, point.x)
    res = torch.cat([dual, -ax + b - y + w], -1)
    return res, y, roots, (ax, aty) if px is None else (ax, aty, px)


def _merge_roots(take: torch.Tensor, new: list, old: list) -> list:
    """Per block, the roots of ``new`` where ``take`` (B,), else those of ``old``."""
    return [None if a is None else torch.where(take.unsqueeze(-1), a, b) for a, b in zip(new, old)]


def _scale(b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return 1 + b.norm(dim=-1) + c.norm(dim=-1)


def kkt_residual(point: Point, b: torch.Tensor, c: torch.Tensor,
                 products: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Worst relative KKT residual per element (B,): primal ||Ax + s - b||, dual ||Px + A^T y + c||
    and gap |x^T P x + c^T x + b^T y|, each over 1 + the largest of its terms (inf norms, as SCS);
    without a P its terms are left out (they are zero). ``products``: (A x, A^T y[, P x]) at this
    x and y where known (``_residual``'s; None: taken here)."""
    x, y, s = point.x, point.y, point.s
    if products is None:
        products = (embedding.matvec(point.A, x), embedding.rmatvec(point.A, y))
        products += () if point.P is None else (embedding.matvec(point.P, x),)
    ax, aty = products[:2]
    if point.P is None:
        dual, dual_terms = aty + c, [aty, c]
        gap_terms = [(c * x).sum(-1), (b * y).sum(-1)]
    else:
        px = products[2]
        dual, dual_terms = px + aty + c, [px, aty, c]
        gap_terms = [(x * px).sum(-1), (c * x).sum(-1), (b * y).sum(-1)]
    primal = _relative(ax + s - b, [ax, s, b])
    dual = _relative(dual, dual_terms)
    gap = _relative(sum(gap_terms), gap_terms)
    return torch.stack([primal, dual, gap]).amax(0)


def _relative(total: torch.Tensor, terms: list[torch.Tensor]) -> torch.Tensor:
    """|total| over 1 + the largest |term| (B,), inf norms over the last dimension of (B, k)
    tensors (or absolute values of (B,) ones): one reduction of them stacked."""
    stacked = torch.stack([total, *terms])
    norms = inf_norm(stacked) if stacked.dim() > 2 else stacked.abs()
    return norms[0] / (1 + norms[1:].amax(0))


def _derivative(point: Point, w: torch.Tensor, roots: list | None = None) -> embedding.ResidualDerivative:
    """M at w; ``roots``: those of the projection at w (``_residual``; None: solved again)."""
    return embedding.ResidualDerivative(point.A, point.P, product.derivative(point.spec, w, dual=True, roots=roots))


def _backtrack(point: Point, b: torch.Tensor, c: torch.Tensor, w: torch.Tensor, step: torch.Tensor,
               norm: torch.Tensor, active: torch.Tensor, target: torch.Tensor,
               roots: list) -> tuple[tuple[torch.Tensor, ...], list, bool]:
    """(x, w, y, R, ||R||, *products) at the first of the step lengths 1, 1/2, 1/4, ... that lowers
    ||R||, per element (the best tried if none does; products: ``_residual``'s), and the roots of
    its projection (solved from ``roots``, those at w), stopping once every ``active`` element has improved;
    and whether an element will still be active (improved, and its ||R|| still above ``target``)
    after it. The
    host reads both facts at once, one synchronisation per step length tried."""
    n = point.x.shape[-1]
    best = None
    length = 1.0
    for _ in range(MAX_BACKTRACKS + 1):
        x_try, w_try = point.x - length * step[:, :n], w - length * step[:, n:]
        res_try, y_try, roots_try, products = _residual(dataclasses.replace(point, x=x_try), b, c, w_try, roots)
        trial = (x_try, w_try, y_try, res_try, res_try.norm(dim=-1), *products)
        if best is None:
            best, best_roots = trial, roots_try
        else:
            take = ~(best[4] < norm) & (trial[4] < best[4])
            best = tuple(torch.where(take.unsqueeze(-1) if t.dim() > 1 else take, t, u) for t, u in zip(trial, best))
            best_roots = _merge_roots(take, roots_try, best_roots)
        improved = best[4] < norm
        done, left = host_read(torch.stack([(improved | ~active).all(), (active & improved & (best[4] > target)).any()]))
        if done:
            break
        length /= 2
    return best, best_roots, left


def refine(point: Point, b: torch.Tensor, c: torch.Tensor, mode: str, max_steps: int = MAX_STEPS) -> Point:
    """``point`` after up to ``max_steps`` Newton steps on R (failed elements untouched).

    In dense mode the returned point carries the last factorization of M, for the backward pass.
    """
    return _refine(point, b, c, mode, max_steps)[0]


class Refined(NamedTuple):
    """``refine_and_check``'s outcome: the refined ``point``; the ``kkt_residual`` of its cleaned form,
    which takes the products with A (and P) from the refinement's last residual where a step was taken
    (the same x and y), and those at the solver's own x and y elsewhere (no pass over A again); the
    elements whose refinement went ``astray`` (B,): its steps lowered ||R|| but left a KKT residual above
    ``SOLVED_TOL`` and above the solver's answer's, so that they keep the solver's answer, at which the
    derivative is not to be trusted; and the elements the solver returned (``point.ok``) whose returned
    point leaves ||R|| above ``UNREACHED`` times the target (B,): their refinement did not reach it,
    whatever their KKT residual."""

    point: Point
    kkt: torch.Tensor
    astray: torch.Tensor
    unreached: torch.Tensor


def refine_and_check(point: Point, b: torch.Tensor, c: torch.Tensor, mode: str,
                     max_steps: int = MAX_STEPS) -> Refined:
    """``refine``'s point with its checks (``Refined``)."""
    return _refine(point, b, c, mode, max_steps)


def _refine(point: Point, b: torch.Tensor, c: torch.Tensor, mode: str, max_steps: int) -> Refined:
    """``refine`` and its checks (``refine_and_check``)."""
    if max_steps == 0:
        none = torch.zeros_like(point.ok)
        return Refined(point, kkt_residual(point.cleaned(), b, c), none, none)
    current = point.cleaned()
    w = current.y - current.s
    # the roots' Newton iterations start at y's
    res, _, roots, (ax, _, *px) = _residual(current, b, c, w, near=current.y)
    # R's A^T takes Pi_K*(w), which is the solver's y only up to its complementarity (1e-5 apart on
    # an interior point method's answer): an element that keeps its y is checked with A^T y itself
    products = (ax, embedding.rmatvec(current.A, current.y), *px)
    start = (current, w, roots, products)  # the solver's own answer, measured below against the refined one
    norm = res.norm(dim=-1)
    target = TARGET * _scale(b, c)
    active = current.ok & (norm > target)
    if not bool(active.any()):  # also when no element was solved
        none = torch.zeros_like(point.ok)
        return Refined(point, kkt_residual(current, b, c, products), none, none)  # its cleaned form is current
    first_norm = norm
    factorization = None
    improved = torch.zeros_like(point.ok)
    for _ in range(max_steps):
        if mode == "dense":
            solved = linsolve.solve_dense(_derivative(current, w, roots), res, False, factorization, NEWTON_FORCING)
            step, factorization = solved.solution, solved.factorization
        else:
            step = solve_system(current, res, transpose=False, mode=mode, check=False)
        (trial_x, w_trial, y_trial, res_trial, norm_trial, *products_trial), roots_trial, left = _backtrack(
            current, b, c, w, step, norm, active, target, roots)
        better = active & (norm_trial < norm)
        improved = improved | better
        keep = better.unsqueeze(-1)
        w = torch.where(keep, w_trial, w)
        roots = _merge_roots(better, roots_trial, roots)
        y = torch.where(keep, y_trial, current.y)
        current = dataclasses.replace(current, x=torch.where(keep, trial_x, current.x), y=y, s=y - w)
        res = torch.where(keep, res_trial, res)
        products = tuple(torch.where(keep, new, old) for new, old in zip(products_trial, products))
        norm = torch.where(better, norm_trial, norm)
        # an element no step length improved stays where it is, so its next Newton step would be the
        # same: it is done (round-off, or a singular M whose least-squares step does not help)
        active = better & (norm > target)
        if not left:
            break
    # A lower ||R|| need not be a lower KKT residual: far from the solution (an answer whose y is
    # accurate only to the solver's absolute tolerance, on data of scale 1e-4 or less) Newton's
    # steps on R can leave the primal and dual residuals 1,000 times worse than the solver's own
    # answer. An element whose refined point fails the SOLVED test where the solver's answer was
    # better (``astray``) keeps the solver's answer; its derivative is not to be trusted there either
    # (6-36 % off on such LPs, against the unscaled programs'), so it stays INACCURATE. A refined
    # point that passes the test is kept, whatever the answer's residual: it has y = Pi_K*(w) and
    # s = y - w exactly, which the derivative assumes.
    first, w_first, roots_first, products_first = start
    refined_kkt, first_kkt = kkt_residual(current, b, c, products), kkt_residual(first, b, c, products_first)
    astray = improved & (refined_kkt > SOLVED_TOL) & (refined_kkt > first_kkt)
    keep = point.ok & improved & ~astray  # never improved: the solver's own (unprojected) answer
    # w and its roots: the refined elements' last accepted w, the others' first one (y - s of the
    # cleaned point, whose y and s they keep); the KKT residual of the point returned, cleaned
    w = torch.where(keep.unsqueeze(-1), w, w_first)
    roots = _merge_roots(keep, roots, roots_first)
    kkt = torch.where(keep, refined_kkt, first_kkt)
    unreached = point.ok & (torch.where(keep, norm, first_norm) > UNREACHED * target)
    keep = keep.unsqueeze(-1)
    refined = dataclasses.replace(point, x=torch.where(keep, current.x, point.x), y=torch.where(keep, current.y, point.y),
                                  s=torch.where(keep, current.s, point.s), factorization=factorization, w=w, roots=roots)
    return Refined(refined, kkt, astray, unreached)
