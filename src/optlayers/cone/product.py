"""Projection onto a product cone K (or K*) and its block-diagonal derivative."""
from __future__ import annotations

import torch

from optlayers.cone import exp, psd, soc
from optlayers.cone.operator import LinearMap, keeping_matrix
from optlayers.cone.spec import Block, ConeSpec
from optlayers.engine.cones import svec


def _piece(v: torch.Tensor, block: Block) -> torch.Tensor:
    return v[..., block.start:block.stop].reshape(*v.shape[:-1], block.count, block.size)


def _wants_dual(block: Block, dual: bool) -> bool:
    """Project onto the dual of the block's module cone? (a dual-exp block's dual is K_exp)."""
    return dual != block.dual


def project(spec: ConeSpec, v: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Projection of v (..., m) onto K, or onto its dual K* if ``dual``."""
    return project_with_roots(spec, v, dual)[0]


def project_with_roots(spec: ConeSpec, v: torch.Tensor, dual: bool = False, guesses: list | None = None,
                       near: torch.Tensor | None = None) -> tuple[torch.Tensor, list]:
    """``project`` and, per block, the exponential cones' roots (..., count) and the PSD cones'
    eigendecompositions (..., count (d + d^2), ``psd.project_with_eig``) (None for the other
    blocks; ``state_width`` gives the widths), for ``derivative`` at the same v: an exponential
    projection's root is solved by an iteration that the host looks at, a PSD projection's
    eigenvalue problem by LAPACK matrix by matrix, and the derivative needs the same. The exponential
    cones' Newton iterations start from ``guesses`` (per block, as the roots returned; those of a
    nearby v) or, without them, from the roots of ``near`` (..., m), a point near the projection
    (``exp.root_guess``); the answer does not depend on them (up to the roots' last few ulps)."""
    pieces, roots = [], []
    for index, block in enumerate(spec.blocks()):
        if block.module is exp:
            guess = None if guesses is None else guesses[index]
            if guess is None and near is not None:
                guess = exp.root_guess(_piece(v, block), _piece(near, block), _wants_dual(block, dual))
            out, rho = exp.project_with_roots(_piece(v, block), _wants_dual(block, dual), guess)
        elif block.module is psd:
            out, rho = psd.project_with_eig(_piece(v, block), _wants_dual(block, dual))
            rho = rho.flatten(-2)
        else:
            out, rho = block.module.project(_piece(v, block), _wants_dual(block, dual)), None
        pieces.append(out.flatten(-2))
        roots.append(rho)
    return (torch.cat(pieces, dim=-1) if pieces else v.clone()), roots


def state_width(block: Block) -> int:
    """The width of ``project_with_roots``' entry for ``block`` (0: None)."""
    if block.module is exp:
        return block.count
    if block.module is psd:
        d = svec.order(block.size)
        return block.count * (d + d * d)
    return 0


def derivative(spec: ConeSpec, v: torch.Tensor, dual: bool = False, roots: list | None = None) -> LinearMap:
    """Derivative of ``project`` at v (..., m): block diagonal, one block per cone. ``roots``: those
    ``project_with_roots`` returned at this v and ``dual`` (None: solved again)."""
    blocks = list(spec.blocks())
    roots = roots if roots is not None else [None] * len(blocks)
    maps = [block.module.derivative(_piece(v, block), _wants_dual(block, dual), rho) if rho is not None
            else block.module.derivative(_piece(v, block), _wants_dual(block, dual)) for block, rho in zip(blocks, roots)]
    # the second-order and PSD cones' maps by their matrices once a dense solve has built them (one
    # product instead of a formula of 10-15 kernels per action: the refinement's residual checks)
    maps = [keeping_matrix(op) if block.module in (soc, psd) else op for block, op in zip(blocks, maps)]

    def apply(d: torch.Tensor, transpose: bool) -> torch.Tensor:
        outs = [(op.rmatvec if transpose else op.matvec)(_piece(d, block)).flatten(-2)
                for block, op in zip(blocks, maps)]
        return torch.cat(outs, dim=-1)

    def write(out: torch.Tensor, negated: bool = False) -> torch.Tensor:
        for block, op in zip(blocks, maps):
            view, dense = _diagonal_blocks(out, block), op.dense()
            if negated and dense.shape == view.shape:
                torch.neg(dense, out=view)
            else:
                view.copy_(dense.neg() if negated else dense)
        return out

    def write_dense(out: torch.Tensor, negated: bool = False) -> torch.Tensor:
        return write(out.zero_(), negated)

    return LinearMap(lambda d: apply(d, False), lambda d: apply(d, True),
                     lambda: write(v.new_zeros(*v.shape, v.shape[-1])), write_dense, _diagonal_lead(blocks))


def _diagonal_lead(blocks: list[Block]) -> int:
    """The rows of the leading blocks whose cones have size 1 (the zero and nonnegative cones,
    SCS order's first), where the derivative is diagonal."""
    lead = 0
    for block in blocks:
        if block.size != 1:
            break
        lead = block.stop
    return lead


def _diagonal_blocks(out: torch.Tensor, block: Block) -> torch.Tensor:
    """The diagonal blocks of ``block``'s cones in ``out`` (..., m, m), as a view (..., count, size, size)
    (written through it: no index tensors, one strided copy per block)."""
    square = out[..., block.start:block.stop, block.start:block.stop]
    square = square.unflatten(-2, (block.count, block.size)).unflatten(-1, (block.count, block.size))
    return square.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
