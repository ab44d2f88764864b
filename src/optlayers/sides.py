"""Inequality sides far above the others: bounds such as 1e12 or 1e20 that stand for absent ones.

A bound far above a problem's other sides is never active unless the variables grow as large, but
where a solver follows the largest side (a scale of the data, a least-squares start, a tolerance
relative to the largest term) such a side sets the size of everything else. The QP's variables'
scale and its start (``qp.scaling``, ``qp.ipm.initial_point``) leave the far sides out. The cone
layer scales its nonnegative rows' far sides away by a rule of its own (``cone.scaling.far_rows``:
its solvers' tests are relative to the largest side, not only their start).

Sides of +inf are absent bounds: both layers solve without those rows (``without_absent``) and give
them the multiplier 0 and the slack +inf of a bound that is not there (``with_absent``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

FAR_SIDE = 1e3
"""A side is far where it is above this times (1 + the next smaller side, itself not zero), or above
a far side (``far_sides``)."""


def far_sides(h: Tensor) -> tuple[Tensor, Tensor]:
    """(B, k) the far sides of Gx ≤ h: the positive ones from the first gap of ``FAR_SIDE`` between
    nonzero sides in the sorted |h| up, and (B,) the largest |h| that is not far. Without a host
    synchronisation.

    Where the nonzero sides run in steps of less than ``FAR_SIDE`` none is far, however widely they
    spread, and the smallest nonzero side never is: zero sides (bounds x ≥ 0) beside sides of 1e3 to
    1e7 (Maros–Meszaros QGROW7) are no gap. A side far below the others (Gᵢx ≤ −1e8) is never far:
    it holds only where the variables are as large, so they follow it."""
    size = h.abs()
    if size.shape[-1] < 2:
        return torch.zeros_like(size, dtype=torch.bool), size.amax(-1)
    ordered = size.sort(-1).values
    below, above = ordered[:, :-1], ordered[:, 1:]
    gaps = (torch.add(above, below, alpha=-FAR_SIDE) > FAR_SIDE) & (below > 0)
    first_far = torch.where(gaps, above, torch.inf).amin(-1, keepdim=True)
    far = (size >= first_far) & (h > 0)
    return far, size.masked_fill(far, 0).amax(-1)


def without_absent(G: Tensor, h: Tensor, absent: Tensor) -> tuple[Tensor, Tensor]:
    """Gx ≤ h (G (B or 1, k, n) or (k, n), h (B, k)) with the rows ``absent`` (B, k) made rows that hold for
    every x: their rows of G zeros (a batched G where some are), their sides the problem's largest finite
    |h| (1 where that is 0), so that they change neither the variables' scale nor the tolerances' sizes.
    Differentiable: the data's derivatives at those rows are zero (the side filled in is detached).
    ``with_absent`` maps the solution back."""
    finite = torch.where(torch.isfinite(h), h, 0.0).detach().abs().amax(-1, keepdim=True)
    fill = torch.where(finite > 0, finite, 1.0)
    return torch.where(absent.unsqueeze(-1), 0.0, G), torch.where(absent, fill, h)


def with_absent(lam: Tensor, s: Tensor, absent: Tensor, solved: Tensor) -> tuple[Tensor, Tensor]:
    """Multipliers and slacks (B, k) of programs solved without their absent bounds (``without_absent``'s
    ``absent``), at those rows of the elements that hold a solution (``solved``, (B,)): 0 and +inf, the
    multiplier and slack of a bound that is not there, with zero derivatives."""
    rows = absent & solved.unsqueeze(-1)
    return torch.where(rows, 0.0, lam), torch.where(rows, math.inf, s)
