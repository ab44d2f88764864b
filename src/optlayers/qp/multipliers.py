"""Smaller multipliers for a QP solution whose active constraints' gradients are dependent.

Where the gradients of the equality rows and of the active inequality rows are linearly dependent
(the linear independence constraint qualification fails), the optimal multipliers (ν, λ) form an
unbounded set, and an interior point iterate can settle far out along one of its rays: on
Maros–Meszaros QBEACONF at two threads, multipliers of 5e8 whose terms in the dual residual
(Aᵀν and Gᵀλ, each 2e8) cancel, leaving a residual of one rounding unit of those terms (6e-8),
above the tolerance of 1e-8, where the multipliers of least norm are below 1e3.

``smaller_multipliers`` moves (ν, λ) towards the least-norm multipliers of the iterate's active
set (the inactive rows' λ kept), as far as λ stays positive. Where the least-squares system is
consistent (the active set is right), Aᵀν + Gᵀλ is the same at both ends in exact arithmetic, and
the rounding of the dual residual falls with the multipliers. x and s are not touched. The caller
keeps the result only where the convergence test then passes.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from optlayers.engine.step import QPData, State
from optlayers.linalg import mtv, mv

# Where some λ would reach zero on the way to the least-norm multipliers, the move goes this fraction
# of the way to the first such λ: every λ stays positive (the derivatives' factorisation divides by
# it) and what is left of the old multipliers is 1e-12 of them (the move's rounding is 1e-16 of them).
_FRACTION_TO_BOUNDARY = 1.0 - 1e-12


def least_norm_multipliers(data: QPData, st: State) -> tuple[Tensor, Tensor]:
    """For each problem of the batch, ν and the active rows' λ (those with λ > s) of least norm
    with Aᵀν + Gᵀλ = −(Qx + p) in the least-squares sense, the inactive rows' λ kept as they are
    (pseudo-inverse by SVD, which takes dependent rows as they are). λ may have negative entries
    on active rows."""
    active = st.lam > st.s
    inactive_lam = st.lam * ~active
    rows = torch.cat([data.A, data.G * active.unsqueeze(-1)], dim=-2)  # (B, m + k, n)
    target = -(mv(data.Q, st.x) + data.p + mtv(data.G, inactive_lam))
    y = mv(torch.linalg.pinv(rows.transpose(-2, -1)), target)
    return y[:, : st.m], torch.where(active, y[:, st.m :], inactive_lam)


def smaller_multipliers(data: QPData, st: State) -> State:
    """``st`` with (ν, λ) moved towards ``least_norm_multipliers``: (1 − t)(ν, λ) + t(ν*, λ*) with
    t = 1 where every λ* is positive, else ``_FRACTION_TO_BOUNDARY`` times the step at which the
    first λ reaches zero, so that every λ stays positive."""
    nu_star, lam_star = least_norm_multipliers(data, st)
    lam = st.lam
    t = lam.new_ones(lam.shape[0], 1)
    if st.k:
        # λ reaches zero at t = λ / (λ − λ*) where λ* ≤ 0; elsewhere it stays positive for every t ≤ 1
        to_zero = torch.where(lam_star <= 0, lam / (lam - lam_star), torch.inf).amin(-1, keepdim=True)
        t = torch.where(to_zero <= 1, to_zero * _FRACTION_TO_BOUNDARY, t)
    v = st.v.clone()
    v[:, st.n : st.n + st.m] = torch.lerp(st.nu, nu_star, t)
    v[:, st.n + st.m : st.n + st.m + st.k] = torch.lerp(lam, lam_star, t)
    return replace(st, v=v)
