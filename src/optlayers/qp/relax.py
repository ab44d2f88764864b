"""The elastic relaxation of a QP, always feasible, for infeasible elements (``on_failure="relax"``).

    min  ½zᵀQz + pᵀz + ρ·1ᵀ(t + u + v) + ½ε‖(t, u, v)‖²
    s.t. Gz ≤ h + t,   Az = b + u − v,   t, u, v ≥ 0

over x = (z, t, u, v). Any z is feasible with large enough slacks, and the ε term makes the
slacks unique; with ρ above the largest multiplier of a feasible problem the ℓ1 penalty is exact
(z solves the original QP), and for an infeasible one z trades the objective against the total
violation ρ·‖(Gz − h)₊‖₁ + ρ·‖Az − b‖₁. Built from differentiable tensor operations: solving it
with the QP layer gives its exact derivatives with respect to the original data.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from optlayers.options import check_number

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
