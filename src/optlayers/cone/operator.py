"""A batched linear operator given by its action and the action of its transpose."""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

Apply = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class LinearMap:
    """Batched linear map v (..., n) -> (..., m); ``dense()`` builds the (..., m, n) matrix on request
    (``write_dense(out)``, where there is one, writes it into ``out``)."""

    matvec: Apply
    rmatvec: Apply
    dense: Callable[[], torch.Tensor]
    # Where given: writes the (..., m, n) matrix (with ``negated=True`` its negative) into a tensor
    # of that shape (or one its batch broadcasts to), such as a block of a larger matrix, and
    # returns it (no tensor of its own).
    write_dense: Callable[..., torch.Tensor] | None = None
    # The map is diagonal on its first ``diagonal_lead`` coordinates: its matrix is block diagonal
    # with a diagonal leading block of that order (a product cone's leading cones of size 1).
    diagonal_lead: int = 0


def identity(v: torch.Tensor) -> LinearMap:
    """The identity on vectors shaped like ``v`` (..., k)."""
    eye = torch.eye(v.shape[-1], dtype=v.dtype, device=v.device)
    return LinearMap(lambda d: d, lambda d: d, lambda: eye.expand(*v.shape, v.shape[-1]))


def zero_map(v: torch.Tensor) -> LinearMap:
    """The zero map on vectors shaped like ``v`` (..., k)."""
    return LinearMap(torch.zeros_like, torch.zeros_like, lambda: v.new_zeros(*v.shape, v.shape[-1]))


def keeping_matrix(op: LinearMap) -> LinearMap:
    """``op`` whose matrix, once asked for (``dense()``), is kept and applied by one batched product
    instead of ``op``'s own action: for maps whose action is a formula of many kernels (the
    second-order and PSD cones' derivatives) and whose matrix a dense solve builds anyway. Until
    then ``op``'s action (a matrix of k columns writes k times the bytes of one action)."""
    kept: list[torch.Tensor] = []

    def matrix() -> torch.Tensor:
        if not kept:
            kept.append(op.dense())
        return kept[0]

    def apply(d: torch.Tensor, transpose: bool) -> torch.Tensor:
        if not kept:
            return op.rmatvec(d) if transpose else op.matvec(d)
        return ((kept[0].mT if transpose else kept[0]) @ d.unsqueeze(-1)).squeeze(-1)

    return LinearMap(lambda d: apply(d, False), lambda d: apply(d, True), matrix)
