"""JVP and VJP of the solution map (A, b, c, P) -> (x, y, s) at a computed solution.

Both build the same residual-map derivative M (embedding.py) and differ only in the direction
of the linear solve (linsolve.py); failed elements (``ok`` False) get zero tangents/cotangents.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from optlayers.cone import embedding, exp, linsolve, product
from optlayers.cone.operator import LinearMap
from optlayers.cone.spec import ConeSpec
from optlayers.engine.constants import constant
from optlayers.status import user_stacklevel

RESIDUAL_WARN = 1e-6  # relative residual of the derivative's linear solve above which we warn


@dataclasses.dataclass(frozen=True)
class Point:
    """A batch of solutions and the data it solves: x (B, n), y (B, m), s (B, m), ok (B,) bool."""

    spec: ConeSpec
    A: torch.Tensor
    P: torch.Tensor | None
    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    ok: torch.Tensor
    factorization: linsolve.DenseFactorization | None = None  # of M at (or near) this point
    # The vector w (B, m) whose projection onto K* is y (y - s up to round-off) and, per block of
    # spec, the exponential cones' roots and the PSD cones' eigendecompositions of that projection
    # (``product.project_with_roots``; None for the other blocks), where the refinement knows them:
    # the derivatives are then taken at w without solving for them again.
    w: torch.Tensor | None = None
    roots: list | None = None
    clean: bool = False  # failed elements' x, y, s and w are zeros already (``cleaned``)

    def cleaned(self) -> Point:
        """Failed elements' NaNs replaced by zeros, so that they cannot leak into the batch; their
        w too, and with it their exponential cones' roots: those of the projection at 0 (+inf,
        inside the cone). A root kept from the failed element's own w (an element refined but left
        INACCURATE) would put a root region at 0, where the projection's derivative divides by
        ‖w‖ = 0 (NaN, which failed the whole batch's factorisation). Its PSD eigendecompositions
        stay: finite, and the element's rows are masked."""
        if self.clean:
            return self
        keep, zero = self.ok.unsqueeze(-1), constant(0.0, self.x)
        w = None if self.w is None else torch.where(keep, self.w, zero)
        roots = self.roots
        if roots is not None:
            inside = constant(float("inf"), self.x)
            roots = [root if root is None or block.module is not exp else torch.where(keep, root, inside)
                     for root, block in zip(roots, self.spec.blocks())]
        return dataclasses.replace(self, x=torch.where(keep, self.x, zero), y=torch.where(keep, self.y, zero),
                                   s=torch.where(keep, self.s, zero), w=w, roots=roots, clean=True)

    def projection_derivative(self) -> LinearMap:
        """D = the derivative of the projection onto K* at w (or at y - s where w is not known)."""
        if self.w is None:
            return product.derivative(self.spec, self.y - self.s, dual=True)
        return product.derivative(self.spec, self.w, dual=True, roots=self.roots)


def _element(A: torch.Tensor | None, index: int) -> torch.Tensor | None:
    if A is None or A.layout != torch.strided or A.dim() == 2:
        return A
    return A[index:index + 1]


def solve_system(point: Point, rhs: torch.Tensor, transpose: bool, mode: str, check: bool = True,
                 D: LinearMap | None = None) -> torch.Tensor:
    """Solve M dz = rhs (or M^T r = rhs) at ``point``; zero for failed elements. ``check`` warns on
    inaccuracy; ``D``: the projection's derivative at y - s, when the caller has it already."""
    zy = point.y - point.s
    if mode == "dense":
        D = product.derivative(point.spec, zy, dual=True) if D is None else D
        M = embedding.ResidualDerivative(point.A, point.P, D)
        result = linsolve.solve_dense(M, rhs, transpose, point.factorization)
    else:
        def make(index: int) -> embedding.ResidualDerivative:
            D = product.derivative(point.spec, zy[index:index + 1], dual=True)
            return embedding.ResidualDerivative(_element(point.A, index), _element(point.P, index), D)
        result = linsolve.solve_iterative(make, rhs, transpose, mode)
    if check and not (result.bound is not None and result.bound <= RESIDUAL_WARN):  # else known fine, no sync
        _check_residual(result.residual, point.ok, mode)
    return torch.where(point.ok.unsqueeze(-1), result.solution, constant(0.0, result.solution))


def _check_residual(residual: torch.Tensor, ok: torch.Tensor, mode: str) -> None:
    bad = ok & ~(residual <= RESIDUAL_WARN)
    if bool(bad.any()):
        worst = float(residual[bad].max())
        warnings.warn(f"the derivative's linear system (mode={mode!r}) was solved only to relative residual "
                      f"{worst:.1e} for batch elements {bad.nonzero().flatten().tolist()[:10]}: the solution may "
                      "be degenerate (not strictly complementary) or inaccurate; try mode='dense' or tighter "
                      "solver tolerances", RuntimeWarning, stacklevel=user_stacklevel())


def jvp(point: Point, mode: str, dA: torch.Tensor | None, db: torch.Tensor | None, dc: torch.Tensor | None,
        dP: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, ds), each (B, .), for data tangents shaped like the data (None: zero)."""
    point = point.cleaned()
    g = embedding.perturbation(point.x, point.y, dA, db, dc, dP)
    D = point.projection_derivative()
    dz = -solve_system(point, g, transpose=False, mode=mode, D=D)
    return embedding.output_map(D, dz, point.x.shape[-1])


def vjp(point: Point, mode: str, vx: torch.Tensor | None, vy: torch.Tensor | None,
        vs: torch.Tensor | None) -> torch.Tensor:
    """r (B, n + m) solving M^T r = (output map)^T v (a None cotangent is zero); ``embedding.adjoint_A``
    and ``adjoint_P`` map it to the data."""
    point = point.cleaned()
    D = point.projection_derivative()
    vx = torch.zeros_like(point.x) if vx is None else vx
    if vy is None and vs is None:  # (vx, 0): no product with D^T
        rhs = torch.nn.functional.pad(vx, (0, point.y.shape[-1]))
    else:
        rhs = embedding.output_adjoint(D, vx, torch.zeros_like(point.y) if vy is None else vy,
                                       torch.zeros_like(point.s) if vs is None else vs)
    rhs = torch.where(point.ok.unsqueeze(-1), rhs, constant(0.0, rhs))
    return solve_system(point, rhs, transpose=True, mode=mode, D=D)
