"""Nearly dependent equality rows, replaced by an orthonormal equivalent before the solve.

Two equality rows that differ by δ of their size (a row and a copy with noise, rows of a learned
A that have nearly aligned) still define their feasible set exactly: the rows' difference is a
constraint of its own, at any δ. The interior point method sees it through the Schur complement
A H⁻¹ Aᵀ, whose eigenvalue along that difference is about δ², below the equality rows'
regularisation from δ ≈ 1e-5 on: the step hardly moves the iterate along it, and the solve stalls
with a primal residual of about δ times its distance (MAX_ITER or INACCURATE), or takes a step of
that difference for a Farkas direction.

The rows are replaced by an equivalent set with the same solutions. With E, C a row and a column
equilibration of A (four Ruiz iterations) and (EAC)ᵀ = QR (Householder), A = E⁻¹RᵀQᵀC⁻¹, so
Ax = b holds exactly where QᵀC⁻¹x = R⁻ᵀEb. The rows QᵀC⁻¹ are orthonormal but for the columns'
scaling, which the solve's own equilibration takes out; the difference's δ has moved into the
right-hand side R⁻ᵀEb, of unit size where b is consistent. With M = R⁻ᵀE, the multipliers map back
by ν = Mᵀν̂ = ER⁻¹ν̂, and the derivatives by the same map: with M held fixed, (A, b) ↦ (MA, Mb)
leaves x, λ and s unchanged and ν = Mᵀν̂ for every A and b near the data, so the chain rule through
the fixed M is exact (QᵀC⁻¹ stands for MA's value, which it equals in exact arithmetic and
represents more accurately). The primal residual that the solve reports, and tests against its
tolerance, is that of the replaced rows: the given rows' residual E⁻¹Rᵀ times it, in units of
each row's size.

A float64 problem is transformed where some row's share |R_ii| / ‖(EAC)_i‖ (the part of the row
outside the span of the rows before it, measured on the equilibrated rows, so that neither a row's
nor a column's size decides it) is below ``NEARLY_DEPENDENT`` and every row's is above
``SMALLEST_SHARE``. Rows dependent to rounding (exact duplicates, redundant combinations: shares
of 1e-16) are left to the method, whose regularisation handles them: a division by their R_ii
would make a constraint of rounding noise. Rows nearer than ``SMALLEST_SHARE`` are left too: the
transform's own rounding would move them by more than the method's tolerances. Such problems may
stall (MAX_ITER, INACCURATE); where their rows differ by less than the tolerance, the difference is
not a constraint the method can see, and a SOLVED answer holds the rows to the tolerance only.
Float32 data are solved as given: the replaced rows, cast back to float32, would carry its rounding
into ν amplified by 1/share (ν 1e-5 off at shares of 2^-8, where the rows as given are solved in
float64 to 3e-8).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from optlayers.engine.constants import identity

NEARLY_DEPENDENT = 2.0 ** -7
"""A problem with a row whose share (module docstring) is below this is transformed. LPs
over a box with equality rows copied at noise 2^-12 to 2^-15 of their size were solved in 95 of
100 cases untransformed, at 2^-8 to 2^-11 in all 100; at 2^-16 to 2^-19 in 38 (BENCHMARKS.md,
"Nearly dependent equality rows")."""
SMALLEST_SHARE = 2.0 ** -26
"""A problem with a row whose share is at most this is not transformed. R comes from A + E with E of
float64's rounding, so the transformed rows hold at the exact solution only to about ε/share of
their size (7.7e-8 at a share of 1.5e-9); where the equalities and active inequality rows meet in
a point, that misses it: fuzzed QPs of that kind with shares of 2e-12 to 1.5e-9 ended MAX_ITER or
were certified infeasible, transformed. At this bound the rounding is below 1.5e-8 (BENCHMARKS.md,
"Nearly dependent equality rows")."""


class RowMap(NamedTuple):
    """The map from the rows ``orthonormal_rows`` made back to the given ones, M = R⁻ᵀE (the
    identity for the problems it left as they were): ``factor`` R (B, m, m) and ``scale`` E's
    diagonal (B, m), both detached."""

    factor: Tensor
    scale: Tensor


def given_multipliers(rows: RowMap, nu: Tensor) -> Tensor:
    """ν of the given rows from ν̂ of the rows ``orthonormal_rows`` made: Mᵀν̂ = E R⁻¹ν̂."""
    mapped = torch.linalg.solve_triangular(rows.factor, nu.unsqueeze(-1).to(rows.factor.dtype), upper=True).squeeze(-1)
    return (rows.scale * mapped).to(nu.dtype)


def _carries_derivatives(A: Tensor) -> bool:
    """Whether A may carry a derivative: it requires grad, a torch.func transform is active
    (``jvp``, ``jacfwd``, ``vmap`` of ``grad``), or it is a forward-mode dual tensor."""
    return (A.requires_grad or torch._C._are_functorch_transforms_active()
            or torch.autograd.forward_ad.unpack_dual(A).tangent is not None)


def _equilibrated(A: Tensor, iterations: int = 4) -> tuple[Tensor, Tensor]:
    """Row and column scalings e (B, m), c (B, n) that bring E A C's rows and columns to about unit
    size (Ruiz: each iteration divides every row and column by the square root of its largest
    entry, which takes the root of the sizes' spread; zero rows and columns keep 1). Four
    iterations leave a spread of 10 decades within a factor of 5, enough for the shares."""
    e, c = A.new_ones(A.shape[:-1]), A.new_ones(A.shape[0], A.shape[-1])
    for _ in range(iterations):
        scaled = (e.unsqueeze(-1) * A * c.unsqueeze(-2)).abs()
        row, col = scaled.amax(-1), scaled.amax(-2)
        e = e * torch.where(row > 0, row, torch.ones_like(row)).rsqrt()
        c = c * torch.where(col > 0, col, torch.ones_like(col)).rsqrt()
    return e, c


def orthonormal_rows(A: Tensor, b: Tensor) -> tuple[Tensor, Tensor, RowMap | None]:
    """(A, b) (B, m, n), (B, m) with each problem's nearly dependent equality rows replaced by the
    equivalent rows QᵀC⁻¹x = R⁻ᵀEb (see the module docstring), and the ``RowMap`` back
    (``given_multipliers``); None where no problem can have such rows (no rows, more rows than
    variables, an empty batch, float32 data). Computed in float64 and returned in the data's dtype;
    no host synchronisation."""
    batch, m, n = A.shape
    if m == 0 or m > n or batch == 0 or A.dtype != torch.float64:
        return A, b, None
    given = A.detach().to(torch.float64)
    e, c = _equilibrated(given)
    scaled = e.unsqueeze(-1) * given * c.unsqueeze(-2)
    basis, factor = torch.linalg.qr(scaled.mT)  # (EAC)ᵀ = QR: (B, n, m), (B, m, m)
    share = factor.diagonal(dim1=-2, dim2=-1).abs() / torch.linalg.vector_norm(scaled, dim=-1)
    smallest = share.amin(-1)  # NaN (a zero row) compares False: not transformed
    transformed = (smallest < NEARLY_DEPENDENT) & (smallest > SMALLEST_SHARE)
    # the others' map is the identity: their solves below are exact copies, never a division by a
    # dependent row's R_ii (whose infinities would reach the derivatives as 0·inf)
    kept = transformed[:, None, None]
    factor = torch.where(kept, factor, identity(m, factor.device, factor.dtype))
    e = torch.where(transformed.unsqueeze(-1), e, torch.ones_like(e))
    lower = factor.mT
    rows = (basis.mT / c.unsqueeze(-2)).to(A.dtype)  # EAC = RᵀQᵀ: Ax = b holds where QᵀC⁻¹x = R⁻ᵀEb
    if _carries_derivatives(A):  # value QᵀC⁻¹, derivative R⁻ᵀE dA (M fixed): see the module docstring
        moved = e.unsqueeze(-1) * (A - A.detach()).to(torch.float64)
        rows = rows + torch.linalg.solve_triangular(lower, moved, upper=False).to(A.dtype)
    # R⁻ᵀEb (b itself where the map is the identity)
    sides = torch.linalg.solve_triangular(lower, (e * b.to(torch.float64)).unsqueeze(-1), upper=False).squeeze(-1).to(b.dtype)
    return torch.where(kept, rows, A), sides, RowMap(factor, e)
