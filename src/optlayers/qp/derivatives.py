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


def _outer(u: Tensor, v: Tensor) -> Tensor:
    return u.unsqueeze(-1) * v.unsqueeze(-2)


def solution_vjp(
    f: KKTFactor, x: Tensor, nu: Tensor, lam: Tensor, s: Tensor,
    gx: Tensor, gnu: Tensor, glam: Tensor, gs: Tensor, refine_steps: int,
) -> QPData:
    """Cotangent of the data from cotangents of (x, ν, λ, s); all (B, ·)."""
    wx, wnu, wlam = solve_reduced(f, gx, gnu, (s / lam) * gs - glam, refine_steps)
    return QPData(
        Q=-0.5 * (_outer(wx, x) + _outer(x, wx)),
        p=-wx,
        A=-(_outer(nu, wx) + _outer(wnu, x)),
        b=wnu,
        G=-(_outer(lam, wx) + _outer(wlam, x)),
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
