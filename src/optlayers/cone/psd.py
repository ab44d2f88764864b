"""The cone of positive semidefinite matrices (self-dual), in SCS's vectorization.

A symmetric d x d matrix X is the vector of its lower triangle stacked by columns, with the
off-diagonal entries scaled by sqrt(2) so that <vec X, vec Y> = trace(X Y).
"""
from __future__ import annotations

import math

import torch

from optlayers.cone.operator import LinearMap

ZERO_EIG_ULPS = 64  # eigenvalues within 64 ulps of the spectral radius of zero count as zero (on the boundary)


def order(size: int) -> int:
    """The matrix order d of a vectorized PSD cone of length d(d+1)/2."""
    d = (math.isqrt(8 * size + 1) - 1) // 2
    if d * (d + 1) // 2 != size:
        raise ValueError(f"a vectorized PSD cone has length d(d+1)/2, got {size}")
    return d


def _indices(d: int, device: torch.device):
    upper = torch.triu_indices(d, d, device=device)
    rows, cols = upper[1], upper[0]  # lower triangle, column by column
    return rows, cols


def _scale(rows: torch.Tensor, cols: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    one = torch.ones(rows.shape, dtype=dtype, device=rows.device)
    return torch.where(rows == cols, one, one * math.sqrt(2))


def vec_to_mat(v: torch.Tensor) -> torch.Tensor:
    """(..., d(d+1)/2) -> symmetric (..., d, d)."""
    d = order(v.shape[-1])
    rows, cols = _indices(d, v.device)
    vals = v / _scale(rows, cols, v.dtype)
    mat = v.new_zeros(*v.shape[:-1], d, d)
    mat[..., rows, cols] = vals
    mat[..., cols, rows] = vals
    return mat


def mat_to_vec(mat: torch.Tensor) -> torch.Tensor:
    """Symmetric (..., d, d) -> (..., d(d+1)/2)."""
    rows, cols = _indices(mat.shape[-1], mat.device)
    return mat[..., rows, cols] * _scale(rows, cols, mat.dtype)


def project(v: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Projection of v (..., d(d+1)/2) onto the PSD cone: clip the eigenvalues at zero."""
    lam, vecs = torch.linalg.eigh(vec_to_mat(v))
    return mat_to_vec((vecs * lam.clamp_min(0).unsqueeze(-2)) @ vecs.transpose(-1, -2))


def derivative(v: torch.Tensor, dual: bool = False) -> LinearMap:
    """Derivative of ``project`` at v: dX -> V (G o (V^T dX V)) V^T (symmetric).

    G_ij = (max(l_i,0) - max(l_j,0)) / (l_i - l_j) for eigenvalues of opposite signs, 1 when
    both are >= 0 up to round-off (the piece inside the cone on its boundary) and 0 when both are negative.
    """
    lam, vecs = torch.linalg.eigh(vec_to_mat(v))
    round_off = ZERO_EIG_ULPS * torch.finfo(v.dtype).eps * lam.abs().amax(-1, keepdim=True)
    pos = lam >= -round_off
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    pi, pj = pos.unsqueeze(-1), pos.unsqueeze(-2)
    mixed = pi != pj
    denom = torch.where(mixed, li - lj, torch.ones_like(li - lj))
    ratio = (li.clamp_min(0) - lj.clamp_min(0)) / denom
    gamma = torch.where(mixed, ratio, (pi & pj).to(v.dtype))
    vecs_t = vecs.transpose(-1, -2)

    def apply(d: torch.Tensor) -> torch.Tensor:
        inner = vecs_t @ vec_to_mat(d) @ vecs
        return mat_to_vec(vecs @ (gamma * inner) @ vecs_t)

    def dense() -> torch.Tensor:
        k = v.shape[-1]
        basis = torch.eye(k, dtype=v.dtype, device=v.device).reshape(k, *([1] * (v.dim() - 1)), k)
        return apply(basis).movedim(0, -1)

    return LinearMap(apply, apply, dense)
