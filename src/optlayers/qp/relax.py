"""The elastic relaxation of a QP, always feasible, for infeasible elements (``on_failure="relax"``).

    min  ½zᵀQz + pᵀz + ρ·1ᵀ(t + u + v) + ½ε‖(t, u, v)‖²
    s.t. Gz ≤ h + t,   Az = b + u − v,   t, u, v ≥ 0

over x = (z, t, u, v). Any z is feasible with large enough slacks. For a fixed z the best slacks
are t = (Gz − h)₊, u − v = Az − b with u, v the positive and negative parts, so the relaxation is

    min_z  f(z) + ρ‖(Gz − h)₊‖₁ + ρ‖Az − b‖₁ + ½ε(‖(Gz − h)₊‖² + ‖Az − b‖²),   f(z) = ½zᵀQz + pᵀz,

a trade of the objective against the violation, with unique slacks (its z is unique where Q ≻ 0).

What is guaranteed where the original QP is feasible: if it has an optimal solution with
multipliers (λ*, ν*) (a QP with a finite optimum always has them; its constraints are linear)
such that ``‖λ*‖∞ ≤ ρ`` and ``‖ν*‖∞ ≤ ρ``, then the relaxation's minimisers are exactly (z*, 0, 0, 0)
for the original's minimisers z*, and its multipliers of Gz ≤ h + t and Az = b + u − v are
multipliers of the original (entries at most ρ). Proof: the Lagrangian bound
f(z) ≥ f* − λ*ᵀ(Gz − h) − ν*ᵀ(Az − b) ≥ f* − ρ1ᵀ(t + u + v) makes the relaxed objective at least
f* + ½ε‖(t, u, v)‖², which (z*, 0, 0, 0) attains; so a minimiser has zero slacks and is feasible
with f(z) ≤ f*. Where moreover ρ exceeds the multipliers strictly and the original's solution is
unique and strictly complementary, the slacks stay at zero under small changes of the data and the
relaxation's derivatives are the original's. Solved to the solver's tolerance, the relaxed z is
the original's solution to about that accuracy (the slacks are within tolerance of zero). If some
multiplier exceeds ρ (no bound on them holds in general: they grow as the constraints approach
infeasibility), the relaxed z is the minimiser above instead: feasible problems with large
multipliers need a larger ``Relaxation.penalty`` to keep their solution. Built from
differentiable tensor operations: solving it with the QP layer gives its exact derivatives with
respect to the original data.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from optlayers.validation.options import check_number

DEFAULT_PENALTY = 1e3
"""ρ: above the multipliers of problems with data of order 1, so that a feasible problem's
relaxation has the original solution; larger values make the relaxed KKT systems stiffer."""

DEFAULT_QUADRATIC = 1e-3
"""ε: enough to make the slacks unique (a strictly convex objective in them) while moving the
relaxed solution by about ε·t/ρ, far below the violation itself."""


@dataclasses.dataclass(frozen=True)
class Relaxation:
    """Weights of the elastic relaxation: ``penalty`` ρ > 0 on the ℓ1 norm of the violations,
    ``quadratic`` ε > 0 on their squared ℓ2 norm."""

    penalty: float = DEFAULT_PENALTY
    quadratic: float = DEFAULT_QUADRATIC

    def __post_init__(self) -> None:
        check_number("Relaxation.penalty", self.penalty, positive=True)
        check_number("Relaxation.quadratic", self.quadratic, positive=True)


def elastic_data(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor,
                 relaxation: Relaxation) -> tuple[Tensor, ...]:
    """Flat QP data (B, ·) of the relaxation over x = (z, t, u, v), sizes n + k + 2m."""
    B, n = p.shape
    k, m = G.shape[-2], A.shape[-2]
    like = dict(dtype=p.dtype, device=p.device)
    slacks = k + 2 * m
    eye = torch.eye(slacks, **like).expand(B, slacks, slacks)
    Q_r = torch.cat([torch.cat([Q, p.new_zeros(B, n, slacks)], -1),
                     torch.cat([p.new_zeros(B, slacks, n), relaxation.quadratic * eye], -1)], -2)
    p_r = torch.cat([p, torch.full((B, slacks), relaxation.penalty, **like)], -1)
    G_r = torch.cat([torch.cat([G, -eye[:, :k]], -1),                       # G z − t ≤ h
                     torch.cat([p.new_zeros(B, slacks, n), -eye], -1)], -2)  # −(t, u, v) ≤ 0
    h_r = torch.cat([h, p.new_zeros(B, slacks)], -1)
    eye_m = torch.eye(m, **like).expand(B, m, m)
    A_r = torch.cat([A, p.new_zeros(B, m, k), -eye_m, eye_m], -1)           # A z − u + v = b
    return Q_r, p_r, G_r, h_r, A_r, b


def original_parts(n: int, k: int, z: Tensor, lam: Tensor, nu: Tensor, s: Tensor) -> tuple[Tensor, ...]:
    """From the relaxation's solution: z, the multipliers of Gz ≤ h + t and Az = b + u − v, and the
    slacks h + t − Gz."""
    return z[..., :n], lam[..., :k], nu, s[..., :k]
