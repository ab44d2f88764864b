"""Linear algebra of the interior point KKT systems: factorise once, solve many right-hand sides.

The Newton system of the (regularised) KKT conditions of

    minimize ½ xᵀQx + pᵀx   subject to   A x = b,   G x + s = h,   s ≥ 0

is, with W = diag(s/λ + δᵢ),

    (Q + ρI) dx + Aᵀ dν + Gᵀ dλ = b1
    A dx − δₑ dν               = b2
    G dx + ds − δᵢ dλ          = b3
    λ∘ds + s∘dλ                = b4

Eliminating ds and dλ leaves H dx + Aᵀ dν = rx, A dx − δₑ dν = re with the symmetric positive
definite H = Q + ρI + Gᵀ W⁻¹ G, and a Schur complement S = A H⁻¹ Aᵀ + δₑ I for the equalities.
Both are factorised by Cholesky. The primal and equality regularisations ρ and δₑ are removed
again by iterative refinement against the unregularised reduced system, so they perturb
neither the step nor the derivatives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Each failed Cholesky factorisation is retried with its regularisation multiplied by this.
_REG_GROWTH = 100.0
_MAX_FACTOR_RETRIES = 4


@dataclass(frozen=True)
class KKTFactor:
    """Cholesky factors of the regularised reduced KKT system of a batch of B problems.

    Attributes:
        Q, A, G: problem matrices, (B, n, n), (B, m, n), (B, k, n).
        w_inv: (B, k) the diagonal of W⁻¹.
        chol_h: (B, n, n) lower Cholesky factor of H = Q + ρI + Gᵀ W⁻¹ G.
        chol_s: (B, m, m) lower Cholesky factor of S = A H⁻¹ Aᵀ + δₑ I.
        ok: (B,) whether both factorisations succeeded with finite entries.
    """

    Q: Tensor
    A: Tensor
    G: Tensor
    w_inv: Tensor
    chol_h: Tensor
    chol_s: Tensor
    ok: Tensor


def mv(M: Tensor, v: Tensor) -> Tensor:
    """Batched matrix-vector product (B, r, c) @ (B, c) -> (B, r)."""
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def mtv(M: Tensor, v: Tensor) -> Tensor:
    """Batched transposed product Mᵀ v, (B, r, c), (B, r) -> (B, c)."""
    return (v.unsqueeze(-2) @ M).squeeze(-2)


def _cholesky(M: Tensor) -> tuple[Tensor, Tensor]:
    chol, info = torch.linalg.cholesky_ex(M)
    ok = (info == 0) & torch.isfinite(chol).flatten(1).all(-1)
    return chol, ok


def factor_kkt(Q: Tensor, A: Tensor, G: Tensor, w_inv: Tensor, rho: Tensor, delta: Tensor) -> KKTFactor:
    """Factorise H and S for every problem of the batch.

    Args:
        Q, A, G: (B, n, n), (B, m, n), (B, k, n).
        w_inv: (B, k) positive diagonal of W⁻¹.
        rho, delta: (B,) primal and equality regularisation. Where a factorisation fails, both
            are raised (by ``_REG_GROWTH``, at most ``_MAX_FACTOR_RETRIES`` times) for that
            problem alone; problems that still fail are marked in ``ok``.
    """
    n, m = Q.shape[-1], A.shape[-2]
    eye_n = torch.eye(n, dtype=Q.dtype, device=Q.device)
    eye_m = torch.eye(m, dtype=Q.dtype, device=Q.device)
    H0 = Q + G.transpose(-1, -2) @ (w_inv.unsqueeze(-1) * G)
    ok = torch.zeros(Q.shape[0], dtype=torch.bool, device=Q.device)
    chol_h = torch.zeros_like(Q)
    chol_s = Q.new_zeros(Q.shape[0], m, m)
    for _ in range(_MAX_FACTOR_RETRIES + 1):
        lh, ok_h = _cholesky(H0 + rho[:, None, None] * eye_n)
        ok_h = ok_h & ~ok
        y = torch.linalg.solve_triangular(lh, A.transpose(-1, -2), upper=False)
        ls, ok_s = _cholesky(y.transpose(-1, -2) @ y + delta[:, None, None] * eye_m)
        new = ok_h & ok_s
        chol_h = torch.where(new[:, None, None], lh, chol_h)
        chol_s = torch.where(new[:, None, None], ls, chol_s)
        ok = ok | new
        if bool(ok.all()):
            break
        rho = torch.where(ok, rho, rho * _REG_GROWTH)
        delta = torch.where(ok, delta, delta * _REG_GROWTH)
    return KKTFactor(Q=Q, A=A, G=G, w_inv=w_inv, chol_h=chol_h, chol_s=chol_s, ok=ok)


def _solve_regularised(f: KKTFactor, rx: Tensor, re: Tensor) -> tuple[Tensor, Tensor]:
    """Solve H dx + Aᵀ dν = rx, A dx − δₑ dν = re with the regularised factors."""
    t = torch.cholesky_solve(rx.unsqueeze(-1), f.chol_h).squeeze(-1)
    dnu = torch.cholesky_solve((mv(f.A, t) - re).unsqueeze(-1), f.chol_s).squeeze(-1)
    dx = torch.cholesky_solve((rx - mtv(f.A, dnu)).unsqueeze(-1), f.chol_h).squeeze(-1)
    return dx, dnu


def apply_reduced(f: KKTFactor, dx: Tensor, dnu: Tensor) -> tuple[Tensor, Tensor]:
    """The unregularised reduced operator: (Q + Gᵀ W⁻¹ G) dx + Aᵀ dν and A dx."""
    hx = mv(f.Q, dx) + mtv(f.G, f.w_inv * mv(f.G, dx)) + mtv(f.A, dnu)
    return hx, mv(f.A, dx)


def solve_reduced(f: KKTFactor, rx: Tensor, re: Tensor, refine_steps: int) -> tuple[Tensor, Tensor]:
    """Solve (Q + Gᵀ W⁻¹ G) dx + Aᵀ dν = rx, A dx = re, refining away ρ and δₑ.

    Args:
        rx: (B, n); re: (B, m).
        refine_steps: iterative refinement steps against the unregularised system.
    Returns:
        dx (B, n), dν (B, m).
    """
    dx, dnu = _solve_regularised(f, rx, re)
    for _ in range(refine_steps):
        hx, ax = apply_reduced(f, dx, dnu)
        cx, cnu = _solve_regularised(f, rx - hx, re - ax)
        dx, dnu = dx + cx, dnu + cnu
    return dx, dnu


def solve_newton(
    f: KKTFactor, s: Tensor, lam: Tensor, b1: Tensor, b2: Tensor, b3: Tensor, b4: Tensor, refine_steps: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Solve the full Newton system of the module docstring; returns dx, dν, dλ, ds."""
    u = f.w_inv * (b4 / lam - b3)
    dx, dnu = solve_reduced(f, b1 - mtv(f.G, u), b2, refine_steps)
    dlam = f.w_inv * mv(f.G, dx) + u
    ds = (b4 - s * dlam) / lam
    return dx, dnu, dlam, ds
