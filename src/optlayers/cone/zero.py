"""The zero cone {0}; its dual is the whole space."""
from __future__ import annotations

import torch

from optlayers.cone.operator import LinearMap, identity, zero_map


def project(v: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Projection of v (..., k) onto {0}^k, or onto R^k (its dual) if ``dual``."""
    return v.clone() if dual else torch.zeros_like(v)


def derivative(v: torch.Tensor, dual: bool = False) -> LinearMap:
    """Derivative of ``project`` at v (..., k): the identity on the dual, zero otherwise."""
    return identity(v) if dual else zero_map(v)
