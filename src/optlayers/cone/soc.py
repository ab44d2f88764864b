"""The second-order cone {(t, x): ||x||_2 <= t} (self-dual), t first as in SCS."""
from __future__ import annotations

import torch

from optlayers.cone.operator import LinearMap
from optlayers.engine.constants import constant


def _split(v: torch.Tensor):
    t, x = v[..., 0], v[..., 1:]
    norm = torch.linalg.vector_norm(x, dim=-1)
    inside = norm <= t
    polar = (norm <= -t) & ~inside
    return t, x, norm, inside, polar


def project(v: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Projection of v (..., k) onto the second-order cone of size k."""
    t, x, norm, inside, polar = _split(v)
    outside = ~(inside | polar)
    safe = torch.where(outside, norm, constant(1.0, norm))
    half = (t + norm) / 2
    cone_point = torch.cat([half.unsqueeze(-1), (half / safe).unsqueeze(-1) * x], dim=-1)
    out = torch.where(outside.unsqueeze(-1), cone_point, constant(0.0, v))
    return torch.where(inside.unsqueeze(-1), v, out)


def derivative(v: torch.Tensor, dual: bool = False) -> LinearMap:
    """Derivative of ``project`` at v (..., k) (symmetric).

    Outside both the cone and its polar it is
    1/2 [[1, u^T], [u, (1 + t/||x||) I - (t/||x||) u u^T]] with u = x / ||x||; on the cone's
    boundary the identity (the piece inside the cone) is used.
    """
    t, x, norm, inside, polar = _split(v)
    outside_mask = ~(inside | polar)
    outside, keep = outside_mask.to(v.dtype), inside.to(v.dtype)
    safe = torch.where(outside_mask, norm, constant(1.0, norm))
    u = x / safe.unsqueeze(-1)
    ratio = t / safe

    def apply(d: torch.Tensor) -> torch.Tensor:
        dt, dx = d[..., 0], d[..., 1:]
        udx = (u * dx).sum(-1)
        out_t = (dt + udx) / 2
        out_x = (u * dt.unsqueeze(-1) + (1 + ratio).unsqueeze(-1) * dx - (ratio * udx).unsqueeze(-1) * u) / 2
        out = torch.cat([out_t.unsqueeze(-1), out_x], dim=-1)
        return keep.unsqueeze(-1) * d + outside.unsqueeze(-1) * out

    def dense() -> torch.Tensor:
        k = v.shape[-1]
        eye = torch.eye(k, dtype=v.dtype, device=v.device)
        basis = eye.reshape(k, *([1] * (v.dim() - 1)), k)
        return apply(basis).movedim(0, -1)

    return LinearMap(apply, apply, dense)
