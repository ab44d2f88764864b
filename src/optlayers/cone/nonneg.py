"""The nonnegative orthant R_+^k (self-dual)."""
from __future__ import annotations

import torch

from optlayers.cone.operator import LinearMap


def project(v: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Elementwise max(v, 0) for v (..., k); ``dual`` is the same cone."""
    return v.clamp_min(0)


def derivative(v: torch.Tensor, dual: bool = False) -> LinearMap:
    """Diagonal derivative of ``project`` at v (..., k).

    On the boundary (v_i = 0) the derivative of the piece inside the cone (1) is used.
    """
    mask = (v >= 0).to(v.dtype)
    apply = lambda d: mask * d  # noqa: E731
    return LinearMap(apply, apply, lambda: torch.diag_embed(mask))
