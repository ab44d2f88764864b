"""A QP as a cone program: min 1/2 z^T Q z + p^T z s.t. A z = b, G z <= h through solve_cone.

Cone data: x = z, P = Q, c = p, rows [A; G] with K = {0}^m x R_+^k, b_cone = [b; h]. Then
y = [nu; lam] and s = [0; h - G z]. Built from differentiable tensor operations, so gradients
flow to every QP argument through solve_cone's derivative.
"""
from __future__ import annotations

import dataclasses

import torch

from optlayers.cone.solve import solve_cone
from optlayers.cone.spec import ConeSpec
from optlayers.qp.problem import prepare_qp
from optlayers.validation.qp import InfiniteSides, check_constrained, check_values


@dataclasses.dataclass(frozen=True)
class ConeQPSolution:
    """z (B, n), lam (B, k) >= 0, nu (B, m), s = h - G z (B, k), status (B,) ``Status`` codes (the vocabulary of ``solve_qp``)."""

    z: torch.Tensor
    lam: torch.Tensor
    nu: torch.Tensor
    s: torch.Tensor
    status: torch.Tensor


def solve_qp_cone(Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor | None = None, h: torch.Tensor | None = None,
                  A: torch.Tensor | None = None, b: torch.Tensor | None = None, **cone_options) -> ConeQPSolution:
    """Solve the QP with ``solve_cone`` (its forward solver, the HSDE derivative backward), its data checked
    and broadcast as by ``solve_qp``, sides of +inf in h taken as absent bounds as there.

    Args:
        Q: (n, n) or (B, n, n) positive semidefinite.
        p: (n,) or (B, n).
        G, h: (k, n) / (B, k, n) and (k,) / (B, k), or None.
        A, b: (m, n) / (B, m, n) and (m,) / (B, m), or None.
        **cone_options: passed to ``solve_cone`` (solver, mode, on_failure, solver_options, ...).

    Returns:
        ConeQPSolution, unbatched when every input is.
    """
    (Q, p, G, h, A, b), batch = prepare_qp(Q, p, G, h, A, b)  # the checks and broadcasting of solve_qp
    try:
        check_values(Q, p, G, h, A, b)
    except InfiniteSides:  # absent bounds, as solve_qp takes them: solve_cone leaves out a nonnegative row of side +inf
        check_values(Q, p, G, torch.where(torch.isposinf(h), 0.0, h), A, b)
    m, k = A.shape[-2], G.shape[-2]
    check_constrained(m, k)
    sol = solve_cone(torch.cat([A, G], -2), torch.cat([b, h], -1), p, ConeSpec(zero=m, nonneg=k), Q, **cone_options)
    parts = (sol.x, sol.y[..., m:], sol.y[..., :m], sol.s[..., m:], sol.status)
    z, lam, nu, s, status = (t.reshape((*batch, *t.shape[1:])) for t in parts)
    return ConeQPSolution(z=z, lam=lam, nu=nu, s=s, status=status)
