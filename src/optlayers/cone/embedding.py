"""Derivative of the residual map of the homogeneous self-dual embedding at a solution.

With u = (x, y, tau), z = u - v = (x, y - s, tau) and the (quadratic) embedding
Q(u) = (P x + A^T y + c tau,  -A x + b tau,  -c^T x - b^T y - x^T P x / tau), the residual map
R(z) = Q(Pi(z)) - Pi(z) + z vanishes at a solution, Pi projecting onto R^n x K* x R_+. Its
derivative M = (DQ - I) DPi + I is singular: R is positively homogeneous, so M z = 0. We fix
that gauge by holding tau = 1 (dropping M's tau column) and drop the tau row, which is implied
by the others (it is the derivative of the zero duality gap). What remains is, with
D = DPi_K*(y - s),

    M = [[P, A^T D], [-A, I - D]],   M dz = -g,   g = (dP x + dA^T y + dc,  -dA x + db),

and (dx, dy, ds) = (dz_x, D dz_y, D dz_y - dz_y). Batched over a leading dimension B.
"""
from __future__ import annotations

import dataclasses

import torch

from optlayers.cone.operator import LinearMap
from optlayers.engine.constants import identity
from optlayers.linalg import mtv, mv


def matvec(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A v for A (B, m, n), shared dense or sparse (m, n), and v (B, n) -> (B, m)."""
    if A.layout != torch.strided:
        return (A @ v.T).T
    return mv(A, v)


def rmatvec(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A^T v for v (B, m) -> (B, n)."""
    if A.layout != torch.strided:
        return (v @ A)
    return mtv(A, v)


@dataclasses.dataclass(frozen=True)
class ResidualDerivative:
    """M of the module docstring for A, P (or None) and the cone derivative D, acting on (B, n + m)."""

    A: torch.Tensor
    P: torch.Tensor | None
    D: LinearMap

    @property
    def n(self) -> int:
        return self.A.shape[-1]

    def _plus_p(self, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """P v + u (u alone without a P)."""
        return u if self.P is None else matvec(self.P, v) + u

    def matvec(self, dz: torch.Tensor) -> torch.Tensor:
        dx, dw = dz[..., :self.n], dz[..., self.n:]
        d_dw = self.D.matvec(dw)
        return torch.cat([self._plus_p(dx, rmatvec(self.A, d_dw)), -matvec(self.A, dx) + dw - d_dw], dim=-1)

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        rx, ry = r[..., :self.n], r[..., self.n:]
        return torch.cat([self._plus_p(rx, -rmatvec(self.A, ry)), self.D.rmatvec(matvec(self.A, rx) - ry) + ry], dim=-1)

    def dense(self, batch: int, index: torch.Tensor | None = None) -> torch.Tensor:
        """M as a (B, n + m, n + m) tensor, or only the elements selected by the boolean ``index`` (B,).

        A^T D is one batched product with the dense D (m^2 n flops, less than the (n + m)^3 of
        the factorization that follows; applying D's blocks to A's n columns one block at a time
        is 2-5x slower at m = 96, n = 48). The blocks are written by the operations that compute
        them into one buffer laid out column by column (its transpose is contiguous), the layout
        in which LAPACK's LU factorises it in place (``linsolve.solve_dense``); where D has
        ``write_dense``, -D is written into the block that becomes I - D by adding 1 to its
        diagonal (no pass over the (B, m, m) block), and A^T D is taken as -(A^T (-D)) (exactly
        the same numbers). On D's ``diagonal_lead`` (the zero and nonnegative cones' rows) A^T D
        is A^T with its columns scaled, and the product is taken only with the rest of -D (the
        lead's rows of it are zero there): at m = 96, n = 48 with 44 such rows, 33 of the 113
        MFLOP per batch of 128, and the same numbers as the whole product (its other terms are
        exact zeros).
        """
        A = self.A.to_dense() if self.A.layout != torch.strided else self.A
        A = A.expand(batch, *A.shape[-2:])
        n, m = self.n, A.shape[-2]
        P = None if self.P is None else self.P.expand(batch, n, n)
        if index is not None:
            A, P = A[index], None if P is None else P[index]
        out = A.new_empty(A.shape[0], n + m, n + m).mT  # column-major
        top, bottom = out[:, :n], out[:, n:]
        if P is None:
            top[:, :, :n].zero_()
        else:
            top[:, :, :n].copy_(P)
        torch.neg(A, out=bottom[:, :, :n])
        if index is None and self.D.write_dense is not None:
            minus_d = self.D.write_dense(bottom[:, :, n:], negated=True)
            lead, a_d = self.D.diagonal_lead, top[:, :, n:]
            if lead:
                d_lead = minus_d.diagonal(dim1=-2, dim2=-1)[:, :lead].neg().unsqueeze(-2)
                torch.mul(A.mT[:, :, :lead], d_lead, out=a_d[:, :, :lead])
            if lead < m:  # beta=0: the block is not read
                torch.baddbmm(a_d[:, :, lead:], A.mT[:, :, lead:], minus_d[:, lead:, lead:], beta=0, alpha=-1,
                              out=a_d[:, :, lead:])
            minus_d.diagonal(dim1=-2, dim2=-1).add_(1)
            return out
        d_dense = self.D.dense().expand(batch, m, m)
        d_dense = d_dense if index is None else d_dense[index]
        torch.bmm(A.mT, d_dense, out=top[:, :, n:])
        torch.sub(identity(m, A.device, A.dtype), d_dense, out=bottom[:, :, n:])
        return out




def perturbation(x: torch.Tensor, y: torch.Tensor, dA: torch.Tensor | None, db: torch.Tensor | None,
                 dc: torch.Tensor | None, dP: torch.Tensor | None) -> torch.Tensor:
    """g = (dP x + dA^T y + dc, -dA x + db), (B, n + m); None means a zero perturbation."""
    gx, gy = torch.zeros_like(x), torch.zeros_like(y)
    if dA is not None:
        gx = gx + rmatvec(dA, y)
        gy = gy - matvec(dA, x)
    if dP is not None:
        gx = gx + matvec(dP, x)
    if dc is not None:
        gx = gx + dc
    if db is not None:
        gy = gy + db
    return torch.cat([gx, gy], dim=-1)


def adjoint_A(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, shared: bool = False) -> torch.Tensor:
    """The A cotangent of -<r, g(dA, db, dc, dP)> for r (B, n + m) (those of b and c are -r_y and -r_x),
    r_y x^T - y r_x^T = [r_y, y] [x, -r_x]^T: one product of rank two, written once (two outer products
    and their difference passed over it three times). With ``shared`` it is summed over the batch (a
    shared parameter's gradient is the sum)."""
    n = x.shape[-1]
    left, right = torch.stack([r[..., n:], y], -1), torch.stack([x, -r[..., :n]], -1)  # (B, m, 2), (B, n, 2)
    if shared:
        return left.transpose(0, 1).flatten(1) @ right.transpose(0, 1).flatten(1).T
    return left @ right.mT


def adjoint_P(x: torch.Tensor, r: torch.Tensor, shared: bool = False) -> torch.Tensor:
    """The P cotangent of -<r, g(dA, db, dc, dP)>, the symmetric part of -r_x x^T (summed over the
    batch with ``shared``)."""
    rx = r[..., :x.shape[-1]]
    outer = torch.einsum("bi,bj->ij" if shared else "bi,bj->bij", rx, x)
    return -(outer + outer.transpose(-1, -2)) / 2


def output_map(D: LinearMap, dz: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, ds) from dz (B, n + m)."""
    dx, dw = dz[..., :n], dz[..., n:]
    dy = D.matvec(dw)
    return dx, dy, dy - dw


def output_adjoint(D: LinearMap, vx: torch.Tensor, vy: torch.Tensor, vs: torch.Tensor) -> torch.Tensor:
    """The transpose of ``output_map``: (vx, D^T (vy + vs) - vs), (B, n + m)."""
    return torch.cat([vx, D.rmatvec(vy + vs) - vs], dim=-1)


def grad_A_entries(x: torch.Tensor, y: torch.Tensor, r: torch.Tensor, rows: torch.Tensor,
                   cols: torch.Tensor) -> torch.Tensor:
    """The entries (rows, cols) of the A cotangent, summed over the batch (for a sparse shared A)."""
    n = x.shape[-1]
    rx, ry = r[..., :n], r[..., n:]
    return (ry[:, rows] * x[:, cols] - y[:, rows] * rx[:, cols]).sum(0)
