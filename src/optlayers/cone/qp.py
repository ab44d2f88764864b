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


@dataclasses.dataclass(frozen=True)
class ConeQPSolution:
    """z (B, n), lam (B, k) >= 0, nu (B, m), s = h - G z (B, k), status (B,) ``Status`` codes (the vocabulary of ``solve_qp``)."""

    z: torch.Tensor
    lam: torch.Tensor
    nu: torch.Tensor
    s: torch.Tensor
    status: torch.Tensor


def _batch(*tensors: torch.Tensor | None, batched_dim: tuple[int, ...]) -> int | None:
    sizes = {t.shape[0] for t, dim in zip(tensors, batched_dim) if t is not None and t.dim() == dim}
    if len(sizes) > 1:
        raise ValueError(f"batched QP inputs must share one batch size, got sizes {sorted(sizes)}")
    return sizes.pop() if sizes else None


def solve_qp_cone(Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor | None = None, h: torch.Tensor | None = None,
                  A: torch.Tensor | None = None, b: torch.Tensor | None = None, **cone_options) -> ConeQPSolution:
    """Solve the QP with ``solve_cone`` (Clarabel or SCS forward, the HSDE derivative backward).

    Args:
        Q: (n, n) or (B, n, n) positive semidefinite.
        p: (n,) or (B, n).
        G, h: (k, n) / (B, k, n) and (k,) / (B, k), or None.
        A, b: (m, n) / (B, m, n) and (m,) / (B, m), or None.
        **cone_options: passed to ``solve_cone`` (solver, mode, on_failure, solver_options, ...).

    Returns:
        ConeQPSolution, unbatched when every input is.
    """
    if (G is None) != (h is None) or (A is None) != (b is None):
        raise ValueError("G and h (and A and b) must be given together")
    if G is None and A is None:
        raise ValueError("solve_qp_cone needs at least one constraint; an unconstrained QP is the linear solve Q z = -p")
    batch = _batch(Q, p, G, h, A, b, batched_dim=(3, 2, 3, 2, 3, 2))
    n = p.shape[-1]
    like = p.new_zeros(0, n)
    rows = [like.expand(*([batch] if batch else []), 0, n)]
    offsets = [like.new_zeros(*([batch] if batch else []), 0)]
    if A is not None:
        rows.append(A.expand(batch, *A.shape[-2:]) if batch else A)
        offsets.append(b.expand(batch, b.shape[-1]) if batch else b)
    if G is not None:
        rows.append(G.expand(batch, *G.shape[-2:]) if batch else G)
        offsets.append(h.expand(batch, h.shape[-1]) if batch else h)
    m = 0 if A is None else A.shape[-2]
    k = 0 if G is None else G.shape[-2]
    sol = solve_cone(torch.cat(rows, -2), torch.cat(offsets, -1), p, ConeSpec(zero=m, nonneg=k), Q, **cone_options)
    return ConeQPSolution(z=sol.x, lam=sol.y[..., m:], nu=sol.y[..., :m], s=sol.s[..., m:], status=sol.status)
