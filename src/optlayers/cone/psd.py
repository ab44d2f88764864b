"""The cone of positive semidefinite matrices (self-dual), in SCS's vectorization
(``optlayers.engine.cones.svec``: the lower triangle stacked by columns, the off-diagonal
entries scaled by sqrt(2), so that <vec X, vec Y> = trace(X Y)).
"""
from __future__ import annotations

import torch

from optlayers.cone.operator import LinearMap
from optlayers.engine.cones.svec import mat_to_vec, order, vec_to_mat
from optlayers.engine.constants import constant

ZERO_EIG_ULPS = 64  # eigenvalues within 64 ulps of the spectral radius of zero count as zero (on the boundary)


def project(v: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Projection of v (..., d(d+1)/2) onto the PSD cone: clip the eigenvalues at zero."""
    return project_with_eig(v, dual)[0]


def project_with_eig(v: torch.Tensor, dual: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``project`` and the eigendecomposition it took, (..., d + d^2): the eigenvalues, then the
    eigenvectors one after another (the matrix by columns, LAPACK's layout: no copy), which
    ``derivative`` at the same v takes instead of solving the same eigenvalue problem again."""
    lam, vecs = torch.linalg.eigh(vec_to_mat(v))
    out = mat_to_vec((vecs * lam.clamp_min(0).unsqueeze(-2)) @ vecs.transpose(-1, -2))
    return out, torch.cat([lam, vecs.mT.flatten(-2)], -1)


def derivative(v: torch.Tensor, dual: bool = False, eig: torch.Tensor | None = None) -> LinearMap:
    """Derivative of ``project`` at v: dX -> V (G o (V^T dX V)) V^T (symmetric). ``eig``: the
    eigendecomposition ``project_with_eig`` returned at this v (None: solved here).

    G_ij = (max(l_i,0) - max(l_j,0)) / (l_i - l_j) for eigenvalues of opposite signs, 1 when
    both are >= 0 up to round-off (the piece inside the cone on its boundary) and 0 when both are negative.
    """
    if eig is None:
        lam, vecs = torch.linalg.eigh(vec_to_mat(v))
    else:
        d = order(v.shape[-1])
        eig = eig.reshape(*v.shape[:-1], d + d * d)
        lam, vecs = eig[..., :d], eig[..., d:].unflatten(-1, (d, d)).mT
    round_off = ZERO_EIG_ULPS * torch.finfo(v.dtype).eps * lam.abs().amax(-1, keepdim=True)
    pos = lam >= -round_off
    li, lj = lam.unsqueeze(-1), lam.unsqueeze(-2)
    pi, pj = pos.unsqueeze(-1), pos.unsqueeze(-2)
    mixed = pi != pj
    denom = torch.where(mixed, li - lj, constant(1.0, li))
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
