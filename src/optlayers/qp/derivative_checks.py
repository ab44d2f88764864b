"""Which solved problems' derivatives are inexact: those with an inequality row that the solve
left neither clearly active nor clearly inactive.

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

This module finds such problems (``inexact_derivatives``: the forward computes it where gradients
are possible and reads it with the final statuses, no host synchronisation of its own) and warns
about them (``warn_inexact``: the backward does where the forward found some, and a forward-mode
derivative does; ``qp.autograd``). It does not find a solution that is not unique (an LP or a
singular Q with a face of optima), whose derivative does not exist either (docs/qp.md).
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

from optlayers.qp.status import QPStatus
from optlayers.status import InexactDerivativeWarning, listed_elements, user_stacklevel

AMBIGUOUS_ROW_RATIO = 1e-3
"""A solved problem's derivative is reported inexact where some inequality row has
min(λᵢ, sᵢ) > ``AMBIGUOUS_ROW_RATIO``·max(λᵢ, sᵢ) at the scaled solution: its derivative may be
off by about 2% or more (see the module docstring). On the benchmark's random QPs at the default
tolerance the largest ratio was 1.6e-5 (batch 128, n = 50 with 25 equalities; 3.8e-6 at n = 100),
and 5.5e-4 at ``tol`` 1e-8 (n = 10)."""


def row_ratios(lam: Tensor, s: Tensor) -> Tensor:
    """(B,) the largest min(λᵢ, sᵢ)/max(λᵢ, sᵢ) over each problem's inequality rows (0 without rows,
    and for a row where both are 0)."""
    if lam.shape[-1] == 0:
        return lam.new_zeros(lam.shape[:-1])
    low, high = torch.minimum(lam, s), torch.maximum(lam, s)
    return torch.where(high > 0, low / high, 0.0).amax(-1)


def inexact_derivatives(status: Tensor, lam: Tensor, s: Tensor) -> Tensor:
    """(B,) bool: the problem was solved and its derivative is inexact (``AMBIGUOUS_ROW_RATIO``), at
    the scaled solution (λ, s) (B, k): ``row_ratios`` above the ratio, compared without dividing
    (seven kernels)."""
    ambiguous = (torch.minimum(lam, s) > AMBIGUOUS_ROW_RATIO * torch.maximum(lam, s)).any(-1)
    return ambiguous & (status == int(QPStatus.SOLVED))


def warn_inexact(status: Tensor, lam: Tensor, s: Tensor, batch_shape: tuple[int, ...]) -> None:
    """Warn (an ``InexactDerivativeWarning``) naming the solved problems whose derivative is inexact, where some
    is: ``status`` (B,), the scaled solution's (λ, s) (B, k) and the batch's shape, whose indices
    name them (one host read)."""
    ratios, inexact = row_ratios(lam, s), inexact_derivatives(status, lam, s)
    if not bool(inexact.any()):
        return
    where = inexact.reshape(batch_shape).nonzero().tolist() if batch_shape else []
    elements = f"at elements {listed_elements(where)}" if batch_shape else "of the QP"
    warnings.warn(
        f"the derivative {elements} is inexact: an inequality row is neither clearly active nor clearly "
        f"inactive at the solution (its λ and s within a factor {1 / AMBIGUOUS_ROW_RATIO:g} of each other; largest "
        f"min(λ, s)/max(λ, s) {float(ratios[inexact].max()):.1e}). The derivative computed is that of the interior "
        "point method's last iterate, which blends the row's active and inactive derivatives; it may be off by up to "
        "its own size. A constraint that is weakly active (λ = s = 0) has no derivative, only one-sided ones; one that "
        "is only nearly so (λ or s below about √tol) is resolved by a smaller tol.",
        InexactDerivativeWarning, stacklevel=user_stacklevel())
