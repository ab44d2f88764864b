"""The cone program as a torch.autograd.Function: forward solves, backward/jvp differentiate."""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from optlayers.cone import backends, derivative, embedding, linsolve, refine
from optlayers.cone.interior import solver as interior_solver
from optlayers.cone.spec import ConeSpec
from optlayers.cone.status import ConeStatus


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything non-differentiable about a solve."""

    spec: ConeSpec
    solver: str
    mode: str
    options: dict
    warm_starts: tuple | None
    max_workers: int | None
    refine_steps: int = refine.MAX_STEPS


def _scipy(A: torch.Tensor) -> sp.csc_matrix:
    A = A.detach().cpu().double()
    if A.layout == torch.sparse_csr:
        return sp.csr_matrix((A.values().numpy(), A.col_indices().numpy(), A.crow_indices().numpy()),
                             shape=A.shape).tocsc()
    if A.layout == torch.sparse_coo:
        A = A.coalesce()
        return sp.csc_matrix((A.values().numpy(), tuple(A.indices().numpy())), shape=A.shape)
    return sp.csc_matrix(A.numpy())


def _problems(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None) -> list[backends.Problem]:
    batch = b.shape[0]
    shared_A = _scipy(A) if A.layout != torch.strided or A.dim() == 2 else None
    A_np = None if shared_A is not None else A.detach().cpu().double().numpy()
    b_np, c_np = b.detach().cpu().double().numpy(), c.detach().cpu().double().numpy()
    P_np = None if P is None else P.detach().cpu().double().numpy()
    P_np = None if P_np is None else (P_np + np.swapaxes(P_np, -1, -2)) / 2
    shared_P = None if P_np is None or P_np.ndim == 3 else sp.triu(P_np, format="csc")
    return [backends.Problem(
        A=shared_A if shared_A is not None else sp.csc_matrix(A_np[i]), b=b_np[i], c=c_np[i],
        P=shared_P if P_np is None or P_np.ndim == 2 else sp.triu(P_np[i], format="csc"))
        for i in range(batch)]


def _solve(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None,
           settings: Settings) -> tuple[torch.Tensor, ...]:
    """x (B, n), y, s (B, m) and status (B,) from the chosen solver, before refinement ("ipm":
    the batched interior point method, on A's device)."""
    if settings.solver == "ipm":
        dense = A.detach().to_dense() if A.layout != torch.strided else A.detach()
        batch = b.shape[0]
        P_sym = _sym(P)  # shared (n, n) or (B, n, n): interior_solver.solve takes either
        x, y, s, status = interior_solver.solve(
            dense.expand(batch, *dense.shape[-2:]), b.detach(), c.detach(),
            None if P_sym is None else P_sym.detach(), settings.spec,
            interior_solver.IPMSettings(**settings.options), max_slices=settings.max_workers)
        return x, y, s, status
    results = backends.solve_batch(_problems(A, b, c, P), settings.spec, settings.solver, settings.options,
                                   settings.warm_starts, settings.max_workers)
    like = dict(dtype=b.dtype, device=b.device)
    x = torch.as_tensor(np.stack([r.x for r in results]), **like)
    y = torch.as_tensor(np.stack([r.y for r in results]), **like)
    s = torch.as_tensor(np.stack([r.s for r in results]), **like)
    status = torch.tensor([int(r.status) for r in results], dtype=torch.int64, device=b.device)
    return x, y, s, status


def _solve_and_refine(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None,
                      settings: Settings) -> tuple[derivative.Point, torch.Tensor]:
    """The refined solution and its status: SOLVED only where the relative KKT residual is small."""
    x, y, s, status = _solve(A, b, c, P, settings)
    returned = (status == ConeStatus.SOLVED) | (status == ConeStatus.INACCURATE)
    point = derivative.Point(settings.spec, A.detach(), _sym(P), x, y, s, returned)
    point = refine.refine(point, b.detach(), c.detach(), settings.mode, settings.refine_steps)
    accurate = refine.kkt_residual(point.cleaned(), b.detach(), c.detach()) <= refine.SOLVED_TOL
    status = torch.where(returned & accurate, int(ConeStatus.SOLVED), status)
    return point, torch.where(returned & ~accurate, int(ConeStatus.INACCURATE), status)


def _clarabel_available() -> bool:
    return importlib.util.find_spec("clarabel") is not None


def _fall_back(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, settings: Settings,
               point: derivative.Point, status: torch.Tensor) -> tuple[derivative.Point, torch.Tensor]:
    """Solve the elements the batched interior point method left unsolved with Clarabel (which
    also certifies infeasibility) and take Clarabel's answer where it is SOLVED or where the
    interior point method returned nothing. Without the clarabel package (the ``cone`` extra)
    the interior point method's statuses stand."""
    if not _clarabel_available():
        return point, status
    index = (status != ConeStatus.SOLVED).nonzero().squeeze(-1)
    clarabel = dataclasses.replace(settings, solver="clarabel", options={}, warm_starts=None)
    sub, sub_status = _solve_and_refine(A if A.dim() == 2 else A[index], b[index], c[index],
                                        P if P is None or P.dim() == 2 else P[index], clarabel)
    better = (sub_status == ConeStatus.SOLVED) | (status[index] != ConeStatus.INACCURATE)
    index, sub_status = index[better], sub_status[better]
    merged = []
    for whole, part in ((point.x, sub.x), (point.y, sub.y), (point.s, sub.s)):
        whole = whole.clone()
        whole[index] = part[better]
        merged.append(whole)
    status = status.clone()
    status[index] = sub_status
    factorization = None
    if point.factorization is not None and sub.factorization is not None:
        lu, pivots = point.factorization.lu.clone(), point.factorization.pivots.clone()
        lu[index], pivots[index] = sub.factorization.lu[better], sub.factorization.pivots[better]
        factorization = linsolve.DenseFactorization(lu, pivots)
    point = dataclasses.replace(point, x=merged[0], y=merged[1], s=merged[2], factorization=factorization)
    return point, status


def _sym(P: torch.Tensor | None) -> torch.Tensor | None:
    return None if P is None else (P + P.transpose(-1, -2)) / 2


class ConeProgram(torch.autograd.Function):
    """(A, b, c, P) -> (x, y, s, status, lu, pivots); A (B, m, n) or shared (m, n), b (B, m), c (B, n).

    lu, pivots: the factorization of the residual map's derivative made while refining (empty in
    lsqr/lsmr mode), reused by backward and jvp.
    """

    @staticmethod
    def forward(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None,
                settings: Settings) -> tuple[torch.Tensor, ...]:
        point, status = _solve_and_refine(A, b, c, P, settings)
        if settings.solver == "ipm" and not bool((status == ConeStatus.SOLVED).all()):
            point, status = _fall_back(A, b, c, P, settings, point, status)
        x = point.x
        solved = (status == ConeStatus.SOLVED).unsqueeze(-1)
        nan = lambda t: torch.where(solved, t, torch.full_like(t, torch.nan))  # noqa: E731
        if point.factorization is None:  # lsqr/lsmr: nothing to reuse; empty tensors keep the outputs uniform
            lu, pivots = x.new_empty(0), torch.empty(0, dtype=torch.int32, device=x.device)
        else:
            lu, pivots = point.factorization.lu, point.factorization.pivots
        return nan(point.x), nan(point.y), nan(point.s), status, lu, pivots

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        A, _, _, P, settings = inputs
        x, y, s, status, lu, pivots = output
        ctx.mark_non_differentiable(status, lu, pivots)
        ctx.settings = settings
        ctx.save_for_backward(A, P, x, y, s, status, lu, pivots)
        ctx.save_for_forward(A, P, x, y, s, status, lu, pivots)

    @staticmethod
    def _point(ctx: Any) -> derivative.Point:
        A, P, x, y, s, status, lu, pivots = ctx.saved_tensors
        factorization = linsolve.DenseFactorization(lu, pivots) if lu.numel() else None
        point = derivative.Point(ctx.settings.spec, A.detach(), _sym(P if P is None else P.detach()),
                                 x, y, s, status == ConeStatus.SOLVED, factorization)
        return point.cleaned()  # a failed element's NaN x, y must not reach the A and P cotangents

    @staticmethod
    def backward(ctx: Any, vx: torch.Tensor | None, vy: torch.Tensor | None, vs: torch.Tensor | None,
                 *_non_differentiable: Any) -> tuple:
        point = ConeProgram._point(ctx)
        zeros = lambda v, like: torch.zeros_like(like) if v is None else v  # noqa: E731
        r = derivative.vjp(point, ctx.settings.mode, zeros(vx, point.x), zeros(vy, point.y), zeros(vs, point.s))
        A, P = point.A, point.P
        need_A, need_b, need_c, need_P = ctx.needs_input_grad[:4]
        n = point.x.shape[-1]
        grad_A = grad_P = None
        if need_A and A.layout != torch.strided:
            grad_A = _grad_sparse(A, point, r)
        elif need_A:
            grad_A = embedding.perturbation_adjoint(point.x, point.y, r, shared=A.dim() == 2)[0]
        if need_P:
            grad_P = embedding.perturbation_adjoint(point.x, point.y, r, shared=P.dim() == 2)[3]
        return grad_A, -r[:, n:] if need_b else None, -r[:, :n] if need_c else None, grad_P, None

    @staticmethod
    def jvp(ctx: Any, dA: torch.Tensor | None, db: torch.Tensor | None, dc: torch.Tensor | None,
            dP: torch.Tensor | None, _settings: Any) -> tuple:
        point = ConeProgram._point(ctx)
        # torch.func hands jvp wrapped tensors that scipy's LSQR cannot read: forward mode is dense
        dx, dy, ds = derivative.jvp(point, "dense", dA, db, dc, _sym(dP))
        return dx, dy, ds, None, None, None


def _grad_sparse(A: torch.Tensor, point: derivative.Point, r: torch.Tensor) -> torch.Tensor:
    """The A cotangent of a shared sparse A, on A's sparsity pattern and in its layout."""
    if A.layout == torch.sparse_csr:
        crow, col = A.crow_indices(), A.col_indices()
        rows = torch.repeat_interleave(torch.arange(A.shape[0], device=A.device), crow.diff())
        values = embedding.grad_A_entries(point.x, point.y, r, rows, col)
        return torch.sparse_csr_tensor(crow, col, values, size=A.shape)
    A = A.coalesce()
    rows, cols = A.indices()
    values = embedding.grad_A_entries(point.x, point.y, r, rows, cols)
    return torch.sparse_coo_tensor(A.indices(), values, size=A.shape)
