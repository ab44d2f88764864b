"""Implicit differentiation of the QP solution map through its KKT conditions.

At a solution, F(x, ν, λ, s; θ) = (Qx + p + Aᵀν + Gᵀλ, Ax − b, Gx + s − h, λ∘s) = 0. The forward
(JVP) and reverse (VJP) derivatives solve J d = −∂F/∂θ·t and Jᵀ w = g with the Jacobian J
of F; both reduce to the same reduced KKT system that the interior point method factorised at
its last iterate, so a derivative costs one more solve. Everything here acts on the scaled
problem (see ``scaling``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from optlayers.linalg import mtv, mv
from optlayers.qp.kkt import KKTFactor, solve_reduced
from optlayers.qp.scaling import QPData


def _outer_sum(u1: Tensor, v1: Tensor, u2: Tensor, v2: Tensor) -> Tensor:
    """u1 v1ᵀ + u2 v2ᵀ for (B, r) u's and (B, c) v's, as one (B, r, 2) @ (B, 2, c) product."""
    return torch.stack([u1, u2], dim=-1) @ torch.stack([v1, v2], dim=-2)


def solution_vjp(
    f: KKTFactor, x: Tensor, nu: Tensor, lam: Tensor, s: Tensor,
    gx: Tensor, gnu: Tensor, glam: Tensor, gs: Tensor, refine_steps: int,
) -> QPData:
    """Cotangent of the data from cotangents of (x, ν, λ, s); all (B, ·)."""
    wx, wnu, wlam = solve_reduced(f, gx, gnu, (s / lam) * gs - glam, refine_steps)
    return QPData(
        Q=_outer_sum(-0.5 * wx, x, -0.5 * x, wx),
        p=-wx,
        A=_outer_sum(-nu, wx, -wnu, x),
        b=wnu,
        G=_outer_sum(-lam, wx, -wlam, x),
        h=wlam,
    )


def solution_jvp(
    f: KKTFactor, x: Tensor, nu: Tensor, lam: Tensor, s: Tensor, t: QPData, refine_steps: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tangents (dx, dν, dλ, ds) of the solution from a tangent ``t`` of the data."""
    r1 = mv(t.Q, x) + t.p + mtv(t.A, nu) + mtv(t.G, lam)
    r2 = mv(t.A, x) - t.b
    r3 = mv(t.G, x) - t.h
    dx, dnu, dlam = solve_reduced(f, -r1, -r2, r3, refine_steps)
    return dx, dnu, dlam, -(s / lam) * dlam


def zero_tangent_like(data: QPData) -> QPData:
    return QPData(*(torch.zeros_like(t) for t in (data.Q, data.p, data.A, data.b, data.G, data.h)))
