"""The vectorisation of symmetric matrices that the PSD cone works in (SCS's, Clarabel's "svec").

A symmetric d x d matrix X is the vector of its lower triangle stacked by columns, with the
off-diagonal entries scaled by sqrt(2) so that <vec X, vec Y> = trace(X Y). The engine's PSD
scaling (``symmetric.py``) and the cone package's PSD projection (``optlayers.cone.psd``) both
convert with it.
"""
from __future__ import annotations

import math

import torch

from optlayers.engine.constants import made_once


def order(size: int) -> int:
    """The matrix order d of a vectorized PSD cone of length d(d+1)/2."""
    d = (math.isqrt(8 * size + 1) - 1) // 2
    if d * (d + 1) // 2 != size:
        raise ValueError(f"a vectorized PSD cone has length d(d+1)/2, got {size}")
    return d


@made_once
def _maps(d: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For matrices of order d: (gather, unscale) taking vec to the d x d entries (each entry's
    position in vec, and 1 or 1/sqrt(2)), and (pick, scale) taking the d x d entries to vec; made
    once per order, device and dtype, so that each conversion is two operations (as normal
    tensors even when first asked for under ``torch.inference_mode``)."""
    return _make_maps(d, device, dtype)


def _make_maps(d: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    upper = torch.triu_indices(d, d)
    rows, cols = upper[1], upper[0]  # lower triangle, column by column
    position = torch.empty(d, d, dtype=torch.long)
    position[rows, cols] = torch.arange(rows.numel())
    position[cols, rows] = torch.arange(rows.numel())
    diagonal = (rows == cols).to(torch.float64)
    scale = diagonal + (1 - diagonal) * math.sqrt(2)
    pick = rows * d + cols
    unscale = (1 / scale)[position.flatten()]
    return (position.flatten().to(device), unscale.to(device, dtype), pick.to(device), scale.to(device, dtype))


def vec_to_mat(v: torch.Tensor) -> torch.Tensor:
    """(..., d(d+1)/2) -> symmetric (..., d, d)."""
    d = order(v.shape[-1])
    gather, unscale, _, _ = _maps(d, v.device, v.dtype)
    return (v[..., gather] * unscale).reshape(*v.shape[:-1], d, d)


def mat_to_vec(mat: torch.Tensor) -> torch.Tensor:
    """Symmetric (..., d, d) -> (..., d(d+1)/2)."""
    d = mat.shape[-1]
    _, _, pick, scale = _maps(d, mat.device, mat.dtype)
    return mat.reshape(*mat.shape[:-2], d * d)[..., pick] * scale
