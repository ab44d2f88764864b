"""Solving M dz = rhs and M^T r = rhs: batched dense LU (CPU or CUDA) or matrix-free LSQR/LSMR.

Every solve reports its relative residual ||M dz - rhs|| / ||rhs|| per element.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import scipy.sparse.linalg as spla
import torch

from optlayers.cone.embedding import ResidualDerivative
from optlayers.host import host_read

MODES = ("dense", "lsqr", "lsmr")
ITERATIVE_TOL = 1e-12  # LSQR/LSMR atol = btol: near float64 accuracy, derivatives feed gradients
ITERATIVE_MAX_ITER_FACTOR = 10  # iteration cap as a multiple of the system size n + m
REFINEMENT_TOL = 1e-12  # relative residual that ends iterative refinement with a reused factorization
SINGULAR_RESIDUAL = 1e-8  # an LU solve this inaccurate (or not finite) means M is singular: use least squares
SINGULAR_PIVOT = 1e-12  # smallest over largest |U_ii| below which M is singular to round-off (sigma_min(M) <=
# ||L|| min |U_ii|): least squares, since an LU solve there can have a small residual and a huge component along
# M's null space (a program with a non-unique dual: such Newton steps never lowered ||R||)
FACTOR_CHECK_TOL = 1e-10  # of LU's componentwise backward error bound: round-off is ~N * 1e-16 of it
MAX_REFINEMENT_STEPS = 4  # each step gains ~ -log10 of the distance between the two points' M


@dataclasses.dataclass(frozen=True)
class SolveResult:
    """Solution (B, N) of the batched linear system, its relative residual (B,), and the dense
    factorization it used (for reuse at a nearby point; None for the iterative solvers)."""

    solution: torch.Tensor
    residual: torch.Tensor
    factorization: DenseFactorization | None = None
    bound: float | None = None  # every residual is known (on the host, without a sync) to be <= this; None: unknown


def relative_residual(apply: Callable[[torch.Tensor], torch.Tensor], sol: torch.Tensor,
                      rhs: torch.Tensor) -> torch.Tensor:
    """||apply(sol) - rhs|| / max(||rhs||, tiny) per element."""
    tiny = torch.finfo(rhs.dtype).tiny
    return torch.linalg.vector_norm(apply(sol) - rhs, dim=-1) / torch.linalg.vector_norm(rhs, dim=-1).clamp_min(tiny)


@dataclasses.dataclass(frozen=True)
class DenseFactorization:
    """Batched LU with partial pivoting of a dense M (B, N, N): factorise once, solve M or M^T many times.
    ``small``: ``_small_pivots`` of these factors where the factorising solve found it (a later solve
    with them reads U's diagonal again otherwise, one strided pass over the factors)."""

    lu: torch.Tensor
    pivots: torch.Tensor
    small: torch.Tensor | None = None

    def small_pivots(self) -> torch.Tensor:
        """(B,) whether an element's factors have a pivot too small to solve with (``_small_pivots``)."""
        return _small_pivots(self.lu) if self.small is None else self.small

    @staticmethod
    def of(M: ResidualDerivative, batch: int) -> DenseFactorization:
        return DenseFactorization(*lu_factor(M.dense(batch)))

    def solve(self, rhs: torch.Tensor, transpose: bool) -> torch.Tensor:
        return torch.linalg.lu_solve(self.lu, self.pivots, rhs.unsqueeze(-1), adjoint=transpose).squeeze(-1)


def lu_factor(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched LU with partial pivoting of (B, N, N), (lu, pivots).

    After ``torch.set_num_threads(k >= 2)`` torch's batched CPU LU can run MKL's getrf from
    several threads at once and return invalid pivots or wrong factors (pytorch/pytorch#142815).
    Each element is checked (pivot i lies in [i, N], and P L U applied to a random vector agrees
    with the matrix's product to round-off) and a failing one is factorised again on its own. The
    check tests the factors, not solvability: a singular matrix's correct factors pass it (its
    solve is no more accurate when factorised again; solve_dense takes least squares there).
    """
    lu, pivots, suspect = _lu_factor_unchecked(matrices)
    return _refactorise(matrices, lu, pivots, suspect)


def _lu_factor_unchecked(matrices: torch.Tensor, check: bool = True,
                         overwrite: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lu_factor`` without the host's look: (lu, pivots) and the suspect elements (B,), which
    ``_refactorise`` factorises again. Invalid pivots are replaced by the identity's, so that
    solving with them is safe (and wrong only for the suspect elements). Without ``check`` only
    the pivots are tested (the caller tests the factors by the residual of its solve). With
    ``overwrite`` the factors are written over ``matrices`` where they are laid out column by
    column (LAPACK's layout; else a column-major copy is factorised, as without)."""
    if matrices.dim() != 3 or matrices.shape[-1] != matrices.shape[-2]:
        raise ValueError(f"lu_factor expects (B, N, N) matrices, got {tuple(matrices.shape)}")
    size = matrices.shape[-1]
    if overwrite and matrices.mT.is_contiguous():
        pivots = torch.empty(matrices.shape[:-1], dtype=torch.int32, device=matrices.device)
        info = torch.empty(matrices.shape[:-2], dtype=torch.int32, device=matrices.device)
        lu, pivots, _ = torch.linalg.lu_factor_ex(matrices, out=(matrices, pivots, info))
    else:
        lu, pivots, _ = torch.linalg.lu_factor_ex(matrices)
    rows = torch.arange(1, size + 1, device=pivots.device, dtype=pivots.dtype)
    suspect = ((pivots < rows) | (pivots > size)).any(-1)
    pivots = torch.where(suspect.unsqueeze(-1), rows.unsqueeze(0).expand_as(pivots), pivots)
    if check and matrices.device.type == "cpu" and size:
        suspect = suspect | ~_factors_match(matrices, lu, pivots)
    return lu, pivots, suspect


def _factors_match(matrices: torch.Tensor, lu: torch.Tensor, pivots: torch.Tensor) -> torch.Tensor:
    """(B,) whether P L U p = M p for a random p, to FACTOR_CHECK_TOL of the componentwise bound
    P |L| |U| |p| on LU's backward error (O(N^2) per element, no solve: singular M pass)."""
    probe = torch.randn(matrices.shape[:-1], dtype=matrices.dtype, generator=torch.Generator().manual_seed(0))
    probe = probe.to(matrices.device).unsqueeze(-1)
    upper, lower = lu.triu(), lu.tril(-1)
    perm, _, _ = torch.lu_unpack(lu, pivots, unpack_data=False)
    u_p, abs_u_p = upper @ probe, upper.abs() @ probe.abs()
    plu_p = perm @ (u_p + lower @ u_p)
    bound = perm @ (abs_u_p + lower.abs() @ abs_u_p)
    error = (plu_p - matrices @ probe).abs().squeeze(-1).amax(-1)
    return error <= FACTOR_CHECK_TOL * bound.squeeze(-1).amax(-1)


def _refactorise(matrices: torch.Tensor, lu: torch.Tensor, pivots: torch.Tensor, suspect: torch.Tensor,
                 known_none: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The suspect elements factorised again one by one (``known_none``: the host knows there are none)."""
    if not known_none and bool(suspect.any()):
        for index in suspect.nonzero().squeeze(-1).tolist():
            lu[index], pivots[index], _ = torch.linalg.lu_factor_ex(matrices[index])
    return lu, pivots


def solve_dense(M: ResidualDerivative, rhs: torch.Tensor, transpose: bool,
                factorization: DenseFactorization | None = None, tol: float = REFINEMENT_TOL) -> SolveResult:
    """Solve with the dense M (B, N, N) on any device.

    With ``factorization`` of a nearby M (e.g. from the forward pass), it is used as a
    preconditioner for iterative refinement against the exact operator M; the elements where
    refinement does not reach ``tol`` within MAX_REFINEMENT_STEPS are refactorised. Where
    the LU solve is not accurate (M singular), minimum-norm least squares is used instead.
    The host looks once per refinement step after the first, and once more only where some
    element did not reach ``tol``.
    """
    apply = M.rmatvec if transpose else M.matvec
    enough = max(tol, SINGULAR_RESIDUAL)
    if factorization is None:
        # M's one dense copy is factorised in place: the rare suspect elements are formed again
        lu, pivots, suspect = _lu_factor_unchecked(M.dense(rhs.shape[0]), check=False, overwrite=True)
        sol = torch.linalg.lu_solve(lu, pivots, rhs.unsqueeze(-1), adjoint=transpose).squeeze(-1)
        residual = relative_residual(apply, sol, rhs)
        small = _small_pivots(lu)
        # Wrong factors (see lu_factor) show as an inaccurate solve against the exact M: such an
        # element is factorised again on its own unless its pivots say M is singular (then least
        # squares below). Testing the factors by this residual, which the solve needs anyway,
        # costs nothing; testing them by a product with the unpacked factors took a fifth of
        # the forward pass at batch 128, m = 96, n = 48.
        suspect = suspect | (~(residual <= enough) & ~small)
        singular = ~(residual <= enough) | small
        any_suspect, any_singular = host_read(torch.stack([suspect.any(), singular.any()]))
        if any_suspect:  # rare (see lu_factor): solve again with the repaired factors
            lu, pivots = _refactorise(M.dense(rhs.shape[0]), lu, pivots, suspect)
            sol = DenseFactorization(lu, pivots).solve(rhs, transpose)
            residual = relative_residual(apply, sol, rhs)
            small = _small_pivots(lu)
            singular = ~(residual <= enough) | small
            any_singular = bool(singular.any())
        factorization = DenseFactorization(lu, pivots, small)
    else:
        small = factorization.small_pivots()  # no use as a preconditioner: least squares below
        sol, residual, converged, any_small = _refined(apply, factorization, rhs, transpose, tol, small)
        stalled = ~(residual <= tol) & ~small
        if not converged and bool(stalled.any()):  # refactorise only where the old factorization no longer helps
            dense = M.dense(rhs.shape[0], stalled)
            lu, pivots = lu_factor(dense)
            factorization = DenseFactorization(factorization.lu.clone(), factorization.pivots.clone())
            factorization.lu[stalled], factorization.pivots[stalled] = lu, pivots
            sol, residual = sol.clone(), residual.clone()
            sol[stalled] = torch.linalg.lu_solve(lu, pivots, rhs[stalled].unsqueeze(-1), adjoint=transpose).squeeze(-1)
            residual[stalled] = relative_residual(apply, sol, rhs)[stalled]
            small = _small_pivots(factorization.lu)
            factorization = dataclasses.replace(factorization, small=small)
            singular = ~(residual <= enough) | small
            any_singular = bool(singular.any())
        else:  # every residual <= tol <= enough, except where the pivots are small
            singular, any_singular = small, any_small
    if not any_singular:
        return SolveResult(sol, residual, factorization, enough)
    sol, residual = sol.clone(), residual.clone()
    sol[singular] = _least_squares(M.dense(rhs.shape[0], singular), rhs[singular], transpose)
    residual[singular] = relative_residual(apply, sol, rhs)[singular]
    return SolveResult(sol, residual, factorization)


def _small_pivots(lu: torch.Tensor) -> torch.Tensor:
    """(B,) whether the LU factors' smallest |U_ii| is below SINGULAR_PIVOT of their largest (or not finite)."""
    if lu.shape[-1] == 0:
        return torch.zeros(lu.shape[0], dtype=torch.bool, device=lu.device)
    diagonal = lu.diagonal(dim1=-2, dim2=-1).abs()
    return ~(diagonal.amin(-1) > SINGULAR_PIVOT * diagonal.amax(-1))


def _refined(apply, factorization: DenseFactorization, rhs: torch.Tensor, transpose: bool, tol: float,
             skip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool, bool]:
    """Iterative refinement of the solution against ``apply``, preconditioned by ``factorization``;
    whether every residual outside ``skip`` (B,) is known to be <= ``tol``, and whether any element
    is skipped. The first refinement step is always taken (the factorization is of another M, so
    the plain solve is rarely accurate enough), then the host looks after each. Each step applies
    M once: the residual rhs - M sol that measures a step is the next step's right-hand side."""
    sol = factorization.solve(rhs, transpose)
    left = rhs - apply(sol)
    scale = torch.linalg.vector_norm(rhs, dim=-1).clamp_min(torch.finfo(rhs.dtype).tiny)
    for _ in range(MAX_REFINEMENT_STEPS):
        sol = sol + factorization.solve(left, transpose)
        left = rhs - apply(sol)
        residual = torch.linalg.vector_norm(left, dim=-1) / scale
        converged, any_skipped = host_read(torch.stack([((residual <= tol) | skip).all(), skip.any()]))
        if converged:
            return sol, residual, True, any_skipped
    return sol, residual, False, any_skipped


def _least_squares(matrices: torch.Tensor, rhs: torch.Tensor, transpose: bool) -> torch.Tensor:
    """Minimum-norm least-squares solutions through the pseudo-inverse (SVD; any device). Where the SVD
    does not converge (LAPACK's ``gesdd`` gave up on a singular M of Maros–Meszaros QGROW7 as a cone
    program, and the solve raised), through LAPACK's ``gelss`` instead: the SVD by QR iteration
    (``bdsqr``) in place of divide and conquer, the same minimum-norm solution, on the CPU. (``gelsy``,
    a complete orthogonal factorisation, took 19 for the rank 23 of such matrices.) The same where the
    pseudo-inverse comes back with a NaN or an infinity (as an accelerator's SVD may, which need not
    raise): one host read, on this rare path only."""
    if transpose:
        matrices = matrices.transpose(-1, -2)
    try:
        solved = (torch.linalg.pinv(matrices) @ rhs.unsqueeze(-1)).squeeze(-1)
        if bool(torch.isfinite(solved).all()) or not bool(torch.isfinite(matrices).all()):
            return solved
    except torch.linalg.LinAlgError:
        pass
    cpu = torch.device("cpu")
    rcond = torch.finfo(matrices.dtype).eps * max(matrices.shape[-2:])
    solved = torch.linalg.lstsq(matrices.to(cpu), rhs.unsqueeze(-1).to(cpu), rcond=rcond, driver="gelss").solution
    return solved.squeeze(-1).to(rhs.device)


def solve_iterative(make: Callable[[int], ResidualDerivative], rhs: torch.Tensor, transpose: bool,
                    method: str) -> SolveResult:
    """Element by element, matrix-free with scipy's LSQR or LSMR on a LinearOperator.

    Args:
        make: element index -> the element's ResidualDerivative (batch of one).
        rhs: (B, N) right-hand sides.
        transpose: solve with M^T instead of M.
        method: "lsqr" or "lsmr".
    """
    solver = spla.lsqr if method == "lsqr" else spla.lsmr
    limit_name = "iter_lim" if method == "lsqr" else "maxiter"
    size = rhs.shape[-1]
    rows, residuals = [], []
    for index in range(rhs.shape[0]):
        M = make(index)
        forward, backward = (M.rmatvec, M.matvec) if transpose else (M.matvec, M.rmatvec)
        op = spla.LinearOperator((size, size), matvec=_numpy_apply(forward, rhs),
                                 rmatvec=_numpy_apply(backward, rhs), dtype=np.float64)
        sol = solver(op, rhs[index].detach().cpu().double().numpy(), atol=ITERATIVE_TOL, btol=ITERATIVE_TOL,
                     **{limit_name: ITERATIVE_MAX_ITER_FACTOR * size})[0]
        sol = torch.as_tensor(sol, dtype=rhs.dtype, device=rhs.device).unsqueeze(0)
        rows.append(sol)
        residuals.append(relative_residual(forward, sol, rhs[index:index + 1]))
    return SolveResult(torch.cat(rows), torch.cat(residuals))


def _numpy_apply(apply: Callable[[torch.Tensor], torch.Tensor], like: torch.Tensor):
    def run(vec: np.ndarray) -> np.ndarray:
        arg = torch.as_tensor(np.ravel(vec), dtype=like.dtype, device=like.device).unsqueeze(0)
        return apply(arg)[0].detach().cpu().double().numpy()
    return run
