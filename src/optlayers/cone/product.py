"""Projection onto a product cone K (or K*) and its block-diagonal derivative."""
from __future__ import annotations

import torch

from optlayers.cone.operator import LinearMap
from optlayers.cone.spec import Block, ConeSpec


def _piece(v: torch.Tensor, block: Block) -> torch.Tensor:
    return v[..., block.start:block.stop].reshape(*v.shape[:-1], block.count, block.size)


def _wants_dual(block: Block, dual: bool) -> bool:
    """Project onto the dual of the block's module cone? (a dual-exp block's dual is K_exp)."""
    return dual != block.dual


def project(spec: ConeSpec, v: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Projection of v (..., m) onto K, or onto its dual K* if ``dual``."""
    pieces = [block.module.project(_piece(v, block), _wants_dual(block, dual)).flatten(-2)
              for block in spec.blocks()]
    return torch.cat(pieces, dim=-1) if pieces else v.clone()


def derivative(spec: ConeSpec, v: torch.Tensor, dual: bool = False) -> LinearMap:
    """Derivative of ``project`` at v (..., m): block diagonal, one block per cone."""
    blocks = list(spec.blocks())
    maps = [block.module.derivative(_piece(v, block), _wants_dual(block, dual)) for block in blocks]

    def apply(d: torch.Tensor, transpose: bool) -> torch.Tensor:
        outs = [(op.rmatvec if transpose else op.matvec)(_piece(d, block)).flatten(-2)
                for block, op in zip(blocks, maps)]
        return torch.cat(outs, dim=-1)

    def dense() -> torch.Tensor:
        out = v.new_zeros(*v.shape, v.shape[-1])
        for block, op in zip(blocks, maps):
            index = (block.start + torch.arange(block.count, device=v.device).unsqueeze(-1) * block.size
                     + torch.arange(block.size, device=v.device))
            out[..., index.unsqueeze(-1), index.unsqueeze(-2)] = op.dense()
        return out

    return LinearMap(lambda d: apply(d, False), lambda d: apply(d, True), dense)
