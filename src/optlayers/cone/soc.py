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
    boundary the identity (the piece inside the cone) is used. Held as a diagonal plus a rank-two
    term, diag(g) + E e^T - H e~^T with e = (1, u), e~ = (0, u), E = e / 2, H = (1 + t/||x||) e~ / 2
    and g = (0, 1, ..., 1) (1 + t/||x||) / 2 outside (g = 1, E = H = 0 inside, all zero in the
    polar): an action is two small products and one fused product.
    """
    t, x, norm, inside, polar = _split(v)
    outside_mask = ~(inside | polar)
    half = torch.where(outside_mask, constant(0.5, v), constant(0.0, v))  # 1/2 outside, else 0
    safe = torch.where(outside_mask, norm, constant(1.0, norm))
    u = x / safe.unsqueeze(-1)
    scale = torch.addcmul(half, half, t / safe)  # (1 + t/||x||) / 2 outside, else 0
    left = torch.nn.functional.pad(u, (1, 0), value=1.0)  # e
    tilde = torch.nn.functional.pad(u, (1, 0))  # e~
    right = torch.stack([left, tilde], -2)  # (..., 2, k): e^T, e~^T
    factors = torch.stack([half.unsqueeze(-1) * left, -scale.unsqueeze(-1) * tilde], -1)  # (..., k, 2): E, -H
    diagonal = torch.addcmul(inside.to(v.dtype).unsqueeze(-1), scale.unsqueeze(-1), _tail_mask(v))

    def apply(d: torch.Tensor) -> torch.Tensor:
        low_rank = (factors @ (right @ d.unsqueeze(-1))).squeeze(-1)
        return torch.addcmul(low_rank, diagonal, d)

    def dense() -> torch.Tensor:
        out = factors @ right
        out.diagonal(dim1=-2, dim2=-1).add_(diagonal)
        return out

    return LinearMap(apply, apply, dense)


def _tail_mask(v: torch.Tensor) -> torch.Tensor:
    """(0, 1, ..., 1) (k,) for v (..., k), made once per size, device and dtype."""
    return constant((0.0,) + (1.0,) * (v.shape[-1] - 1), v)
