"""Which solved problems' derivatives are inexact or do not exist: those with an inequality row
that the solve left neither clearly active nor clearly inactive, and those whose solution is not
unique (or nearly so).

The derivatives (``qp.derivatives``) differentiate the KKT conditions at the interior point
method's last iterate, where λᵢsᵢ = μ > 0 rather than 0. Where every row has one of λᵢ, sᵢ far
above the other, the iterate's active set is the solution's and its derivative is the solution's
to about the ratio of the two. Where a row has λᵢ and sᵢ of one size (a constraint weakly active at
the solution, λᵢ = sᵢ = 0, or one whose λᵢ or sᵢ is below about √μ), the derivative at the iterate
blends the row's active and inactive derivatives: at a weakly active row the solution map has
no derivative, only one-sided ones, and at a nearly weakly active one the blend is off by up to
the whole size of the derivative. Measured on random strictly convex QPs with one row planted
with λᵢ or sᵢ between 1e-3 and 1e-7 (64 per case, float64, ``tol`` 1e-8 and the default), the
relative error of dz/dp against the active-set derivative stayed below 22 times the largest
ratio min(λᵢ, sᵢ)/max(λᵢ, sᵢ) over the rows (ratios from 1e-12 to 1, errors up to 0.74);
``tests/qp/test_inexact_derivatives.py`` checks that every element not reported is within
25·``AMBIGUOUS_ROW_RATIO`` of it.

Where the solution is not unique (an LP or a singular Q with a face of optima), the iterate is
the face's centre and its derivative along the face about 4/tol, where the map has none: the
derivative's amplification (``amplification``) tells it.

This module finds such problems (``inexact_derivatives``: the forward computes it where gradients
are possible, with the derivatives' factorisation, and reads it with the final statuses, no host
synchronisation of its own) and warns about them: where it found some, the forward names them
(``inexact_message``, a read more) and its derivatives give that warning (``status.warn_inexact_derivative``: the
backward and forward-mode derivatives, under any ``torch.func`` transform, whose tensors the text
does not read); a forward-mode derivative of a forward that kept no factorisation makes one and
tests there (``qp.autograd``). It does not find
dependent active rows (the multipliers' derivatives are then not defined; docs/qp.md).
"""
from __future__ import annotations

import torch
from torch import Tensor

from optlayers.engine.kkt import KKTFactor, solve_reduced
from optlayers.qp.status import QPStatus
from optlayers.status import listed_elements, warn_inexact_derivative

AMBIGUOUS_ROW_RATIO = 1e-3
"""A solved problem's derivative is reported inexact where some inequality row has
min(λᵢ, sᵢ) > ``AMBIGUOUS_ROW_RATIO``·max(λᵢ, sᵢ) at the scaled solution: its derivative may be
off by about 2% or more (see the module docstring). On the benchmark's random QPs at the default
tolerance the largest ratio was 1.6e-5 (batch 128, n = 50 with 25 equalities; 3.8e-6 at n = 100),
and 5.5e-4 at ``tol`` 1e-8 (n = 10)."""


MAX_AMPLIFICATION = 1e6
"""A solved problem's derivative is reported where dz/dp of the scaled problem amplifies some
direction more than this (``amplification``): its solution is not unique (a face of optima, where
the iterate's derivative along the face is about 4/tol, e.g. 4e9 at the default tol and 3.9e8 at
tol 1e-8, where the map has none) or nearly so (curvature below about 1e-6 of the data's scale,
whose derivative is as large and, near the tolerance, inexact). The benchmark's and the tests'
random QPs amplified by at most 565 (batches of 64 with n = 10 and 32 with n = 50, with and without
equalities); a Q with an eigenvalue of 1e-4 (OptNet's ε) by 5e3. A face of
optima at a tolerance above about 1e-6 amplifies by less than this, and is not reported."""


def amplification(f: KKTFactor) -> Tensor:
    """(B,) an estimate of the largest amplification ‖dz‖/‖dp‖ of each problem's derivative (the
    largest eigenvalue of the x-block of the KKT system's inverse): two steps of the power method
    with the derivatives' factorisation ``f``, from a fixed vector, unrefined (the regularisation
    caps it at about 1/ρ). A lower bound, close after two steps where one direction dominates."""
    n = f.G.shape[-1]
    v = torch.sin(torch.arange(1, n + 1, dtype=f.G.dtype, device=f.G.device)).expand(f.G.shape[0], n)
    for _ in range(2):
        v = v / v.norm(dim=-1, keepdim=True)  # dx ≠ 0 where the factorisation succeeded (f.ok)
        v = solve_reduced(f, v, None, None, refine_steps=0, use_y=True)[0]
    return torch.where(f.ok, v.norm(dim=-1), 0.0)


def row_ratios(lam: Tensor, s: Tensor) -> Tensor:
    """(B,) the largest min(λᵢ, sᵢ)/max(λᵢ, sᵢ) over each problem's inequality rows (0 without rows,
    and for a row where both are 0)."""
    if lam.shape[-1] == 0:
        return lam.new_zeros(lam.shape[:-1])
    low, high = torch.minimum(lam, s), torch.maximum(lam, s)
    return torch.where(high > 0, low / high, 0.0).amax(-1)


def ambiguous_rows(lam: Tensor, s: Tensor) -> Tensor:
    """(B,) bool: some inequality row has ``row_ratios`` above ``AMBIGUOUS_ROW_RATIO``, compared
    without dividing."""
    return (torch.minimum(lam, s) > AMBIGUOUS_ROW_RATIO * torch.maximum(lam, s)).any(-1)


def inexact_derivatives(status: Tensor, lam: Tensor, s: Tensor, f: KKTFactor) -> Tensor:
    """(B,) bool: the problem was solved and its derivative is inexact, at the scaled solution
    (λ, s) (B, k) whose derivatives' factorisation is ``f``: ``ambiguous_rows``, or
    ``amplification`` above ``MAX_AMPLIFICATION``."""
    return (ambiguous_rows(lam, s) | (amplification(f) > MAX_AMPLIFICATION)) & (status == int(QPStatus.SOLVED))


def warn_inexact(status: Tensor, lam: Tensor, s: Tensor, f: KKTFactor | None, batch_shape: tuple[int, ...]) -> None:
    """Warn (an ``InexactDerivativeWarning``) naming the solved problems whose derivative is
    inexact, where some is, by reason (``inexact_message``)."""
    warn_inexact_derivative(inexact_message(status, lam, s, f, batch_shape))


def inexact_message(status: Tensor, lam: Tensor, s: Tensor, f: KKTFactor | None,
                    batch_shape: tuple[int, ...]) -> str | None:
    """The text of the ``InexactDerivativeWarning`` that names the solved problems whose derivative
    is inexact, by reason, or None where none is: ``status`` (B,), the scaled solution's (λ, s)
    (B, k), its derivatives' factorisation ``f`` (None: the amplification is not tested) and the
    batch's shape, whose indices name them (one host read, more where some is inexact). Plain
    tensors only (a forward's): the text is what a backward or a forward-mode derivative under any
    ``torch.func`` transform gives without reading its tensors."""
    solved = status == int(QPStatus.SOLVED)
    ambiguous = solved & ambiguous_rows(lam, s)
    growth = amplification(f) if f is not None else lam.new_zeros(lam.shape[:-1])
    amplified = solved & (growth > MAX_AMPLIFICATION)
    if not bool((ambiguous | amplified).any()):
        return None

    def named(mask: Tensor) -> str:
        return f"at elements {listed_elements(mask.reshape(batch_shape).nonzero().tolist())}" if batch_shape else "of the QP"
    reasons = []
    if bool(ambiguous.any()):
        reasons.append(
            f"the derivative {named(ambiguous)} is inexact: an inequality row is neither clearly active nor clearly "
            f"inactive at the solution (its λ and s within a factor {1 / AMBIGUOUS_ROW_RATIO:g} of each other; largest "
            f"min(λ, s)/max(λ, s) {float(row_ratios(lam, s)[ambiguous].max()):.1e}). The derivative computed is that of the interior "
            "point method's last iterate, which blends the row's active and inactive derivatives; it may be off by up to "
            "its own size. A constraint that is weakly active (λ = s = 0) has no derivative, only one-sided ones; one "
            "that is only nearly so (λ or s below about √tol) is resolved by a smaller tol")
    if bool(amplified.any()):
        reasons.append(
            f"the derivative {named(amplified)} amplifies a change of p by up to {float(growth[amplified].max()):.1e} "
            f"(above {MAX_AMPLIFICATION:g}, in the scaled problem): the solution is not unique (a face of optima, "
            "which an LP or a singular Q can have, and where the derivative computed, about 4/tol along the face, "
            "is not the solution map's: it has none) or nearly so (curvature below about 1e-6 of the data's scale)")
    return "; ".join(reasons) + "."
