"""The cone program as a torch.autograd.Function: forward solves, backward/jvp differentiate.

First derivatives are exact in every form (backward, jvp, torch.func.vjp/jvp/jacrev/jacfwd, and
under torch.func.vmap). The derivative rules are not themselves differentiable (they solve
with a factorisation of the residual map's derivative whose own derivative is not formed), so
they are Functions of their own (``_VJP``, ``_JVP``) whose derivatives raise: second
derivatives — double backward, torch.func.hessian, a jacobian of a jacobian — fail with a
message instead of returning a wrong answer. Being Functions also lets them run on plain
tensors under ``torch.func.vmap`` (their linear solves take data-dependent branches).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import threading
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from optlayers import threads
from optlayers.cone import backends, derivative, embedding, linsolve, product, refine
from optlayers.cone.interior import solver as interior_solver
from optlayers.cone.spec import ConeSpec
from optlayers.cone.status import ConeStatus
from optlayers.engine.constants import constant
from optlayers.functions import applied_as_given, refuses_batched_gradients
from optlayers.host import host_read
from optlayers.status import FailurePolicy, listed_elements, warn_inexact_derivative
from optlayers.validation.cone import check_finite, check_semidefinite

SECOND_ORDER = (
    "second derivatives of the cone program (double backward, torch.func.hessian, jacrev or jacfwd of a "
    "derivative) are not supported: its derivative rules are exact but not themselves differentiable. First "
    "derivatives (backward, jvp, torch.func.vjp, jvp, jacrev, jacfwd, vmap) are available; "
    "torch.autograd.functional.jvp and hvp take theirs by double backward: use torch.func.jvp.")


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
    policy: FailurePolicy | None = None  # applied by the forward, on plain tensors (so also under vmap)
    compile: bool = False  # the interior point method compiled (ConeIPMSettings.compiled)
    automatic: bool = False  # the solver was chosen by solver="auto" (its failures may go to the other one)


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
            interior_solver.ConeIPMSettings(**settings.options, compiled=settings.compile), max_slices=settings.max_workers)
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
                      settings: Settings) -> tuple[derivative.Point, torch.Tensor, torch.Tensor]:
    """The refined solution, its status (SOLVED only where the relative KKT residual is small) and
    the SOLVED elements not refined to round-off (B,): a relative KKT residual above
    ``refine.UNREFINED_KKT``, or a refinement that did not reach its target (``refine.Refined.unreached``)."""
    x, y, s, status = _solve(A, b, c, P, settings)
    returned = (status == ConeStatus.SOLVED) | (status == ConeStatus.INACCURATE)
    point = derivative.Point(settings.spec, A.detach(), _sym(P), x, y, s, returned)
    point, kkt, astray, unreached = refine.refine_and_check(point, b.detach(), c.detach(), settings.mode,
                                                            settings.refine_steps)
    accurate = (kkt <= refine.SOLVED_TOL) & ~astray
    status = torch.where(returned & accurate, int(ConeStatus.SOLVED), status)
    return point, torch.where(returned & ~accurate, int(ConeStatus.INACCURATE), status), \
        returned & accurate & ((kkt > refine.UNREFINED_KKT) | unreached)


_FORWARD_OUTCOME = threading.local()
"""``ConeProgram.forward``'s word to the ``setup_context`` that follows it in the same thread: the
``InexactDerivativeWarning`` that its derivatives give (``_unrefined_message``), or None."""


def _unrefined_message(unrefined: torch.Tensor) -> str:
    """The warning for the SOLVED elements ``unrefined`` (B,) whose refinement did not reach round-off."""
    return (f"the derivative at elements {listed_elements(unrefined.nonzero().tolist())} is inexact: their solution "
            f"was not refined to round-off (a relative KKT residual above {refine.UNREFINED_KKT:g}, within the "
            f"{refine.SOLVED_TOL:g} that SOLVED asks, or a residual map the refinement left above {refine.UNREACHED:g} "
            "times its target: the Newton refinement stalled, also from the second solves at a tighter tolerance "
            "that follow a refinement of the default refine_steps or more, or refine_steps=0), so that the solution "
            "and its derivative are accurate only to about that residual; another solver, a tighter tolerance "
            "(solver_options) or more refine_steps may give the refinement a closer start.")


def _clarabel_available() -> bool:
    return importlib.util.find_spec("clarabel") is not None


def _fall_back(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, settings: Settings,
               point: derivative.Point, status: torch.Tensor,
               unrefined: torch.Tensor) -> tuple[derivative.Point, torch.Tensor, torch.Tensor]:
    """Solve the elements the batched interior point method left unsolved with Clarabel (which
    also certifies infeasibility) and take Clarabel's answer where it is SOLVED or where the
    interior point method returned nothing, with its ``unrefined`` flag (``_solve_and_refine``).
    Without the clarabel package (the ``cone`` extra) the interior point method's statuses stand."""
    if not _clarabel_available():
        return point, status, unrefined
    index = (status != ConeStatus.SOLVED).nonzero().squeeze(-1)
    clarabel = dataclasses.replace(settings, solver="clarabel", options={}, warm_starts=None)
    return _solved_again(A, b, c, P, clarabel, point, status, unrefined, index,
                         lambda sub_status, _: (sub_status == ConeStatus.SOLVED) | (status[index] != ConeStatus.INACCURATE))


_NO_CERTIFICATE = (ConeStatus.MAX_ITER, ConeStatus.NUMERICAL_ERROR, ConeStatus.INACCURATE)
"""The statuses of an element returned without a solution and without an infeasibility certificate."""


def _method_fall_back(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, settings: Settings,
                      point: derivative.Point, status: torch.Tensor,
                      unrefined: torch.Tensor) -> tuple[derivative.Point, torch.Tensor, torch.Tensor]:
    """Where ``solver="auto"`` chose Clarabel: solve the elements Clarabel left without a solution and
    without a certificate (``_NO_CERTIFICATE``) with the batched interior point method (eagerly), and
    take its answer where it is SOLVED, with its ``unrefined`` flag: the mirror of ``_fall_back``, which
    hands the method's failures to Clarabel. An infeasibility certificate stands. Clarabel at its
    defaults ended INACCURATE on min ½‖x‖² − βx₀ + x₁, |x₁| ≤ 0.5 at β = 1e4 and 1e10, which the method
    solves (docs/cone.md, "A refinement that cannot start")."""
    index = torch.isin(status, torch.tensor(_NO_CERTIFICATE, device=status.device)).nonzero().squeeze(-1)
    if index.numel() == 0:
        return point, status, unrefined
    method = dataclasses.replace(settings, solver="ipm", options={}, warm_starts=None, compile=False)
    return _solved_again(A, b, c, P, method, point, status, unrefined, index,
                         lambda sub_status, _: sub_status == ConeStatus.SOLVED)


RETRY_TOLERANCES = {"ipm": {"tol": 1e-10}, "clarabel": {"tol_gap_abs": 1e-10, "tol_gap_rel": 1e-10, "tol_feas": 1e-10},
                    "scs": {"eps_abs": 1e-10, "eps_rel": 1e-10}}
"""The tolerances (each solver's own settings) at which ``_tightened`` solves again the SOLVED elements
whose refinement stalled; a tighter tolerance given in ``solver_options`` is kept. The stalls seen
come from an active row whose multiplier is small beside the others' (1e-2 against 0.1-1): at the
default 1e-8 the interior point method and Clarabel leave that row's y and s of one size, and Newton's
steps on the residual map then take it for inactive and stop 1e-3 away from the solution (1-3 of 128
random QPs whose inactive rows' slacks spread over 10^0-10^6, SOLVED with both solvers); at 1e-10 y
and s are apart and every one of them refines to round-off (``benchmarks/scale_accuracy.py``, the
cone table of spread sides)."""


def _retries(solver: str) -> list[tuple[str, bool]]:
    """The solves, one after the other, of the elements whose refinement ``solver``'s answers stalled, as
    (solver, tightened): at ``RETRY_TOLERANCES`` (tightened) the same solver, then Clarabel, then Clarabel
    at its own defaults, where the clarabel package is installed; SCS's by Clarabel alone (both ways).
    SCS at 1e-9 left one of docs/cone.md's example programs where its default had (a dual 1.1 off, x
    2.6e-5 off; only 1e-11, with many more iterations, did better). On the two-variable program of
    docs/cone.md ("A refinement that cannot start") Clarabel at 1e-10 solved β = 1e8, where the interior
    point method at 1e-10 did not, and Clarabel at its defaults β = 1e6, where both at 1e-10 did not
    (their relative tests settle the small variable's row sooner or later, at other points): each rung
    takes only answers refined to round-off, so a rung that does not help changes nothing. Clarabel's
    own answers are not solved again at its defaults (they would be the same)."""
    if not _clarabel_available():
        return [(solver, True)]
    if solver == "clarabel":
        return [("clarabel", True)]
    return ([] if solver == "scs" else [(solver, True)]) + [("clarabel", True), ("clarabel", False)]


def _tightened(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, settings: Settings,
               point: derivative.Point, status: torch.Tensor,
               unrefined: torch.Tensor) -> tuple[derivative.Point, torch.Tensor, torch.Tensor]:
    """The SOLVED elements whose refinement stalled (``unrefined``) solved again at ``RETRY_TOLERANCES``
    and at last at Clarabel's defaults (``_retries``, each taking those the one before left; the interior point method eagerly,
    from its own start: compiled, it would compile again for their count), and refined; a new answer is
    taken where it is SOLVED and refined to round-off, and the others keep theirs (and their flag). The
    forward calls it with the default ``refine_steps`` (or more) only: fewer steps are a user's choice
    of a shorter refinement, which a second solve at a tighter tolerance would more than undo. Each solve
    reads the host as a solve does, and the loop once more per solver after the first."""
    for count, (solver, tightened) in enumerate(_retries(settings.solver)):
        if count and not bool(unrefined.any()):
            break
        given = settings.options if solver == settings.solver else {}
        tighter = {name: min(value, given.get(name, value)) for name, value in RETRY_TOLERANCES[solver].items()}
        retry = dataclasses.replace(settings, solver=solver, options={**given, **tighter} if tightened else given,
                                    warm_starts=None, compile=False)
        point, status, unrefined = _solved_again(
            A, b, c, P, retry, point, status, unrefined, unrefined.nonzero().squeeze(-1),
            lambda sub_status, sub_unrefined: (sub_status == ConeStatus.SOLVED) & ~sub_unrefined)
    return point, status, unrefined


def _solved_again(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, settings: Settings,
                  point: derivative.Point, status: torch.Tensor, unrefined: torch.Tensor, index: torch.Tensor,
                  takes: Any) -> tuple[derivative.Point, torch.Tensor, torch.Tensor]:
    """The elements ``index`` solved and refined again under ``settings`` (``_solve_and_refine``), their
    answers (x, y, s, status, ``unrefined`` flag, the refinement's factorization, w and roots) put in
    place of the first ones where ``takes(sub_status, sub_unrefined)`` (a mask over ``index``) holds."""
    sub, sub_status, sub_unrefined = _solve_and_refine(A if A.dim() == 2 else A[index], b[index], c[index],
                                                       P if P is None or P.dim() == 2 else P[index], settings)
    better = takes(sub_status, sub_unrefined)
    index, sub_status = index[better], sub_status[better]
    unrefined = unrefined.clone()
    unrefined[index] = sub_unrefined[better]
    merged = []
    for whole, part in ((point.x, sub.x), (point.y, sub.y), (point.s, sub.s)):
        whole = whole.clone()
        whole[index] = part[better]
        merged.append(whole)
    status = status.clone()
    status[index] = sub_status
    factorization = None
    if point.factorization is not None and sub.factorization is not None:  # written over: this forward's own
        lu, pivots = point.factorization.lu, point.factorization.pivots
        lu[index], pivots[index] = sub.factorization.lu[better], sub.factorization.pivots[better]
        factorization = linsolve.DenseFactorization(lu, pivots)  # its small pivots no longer known
    w, roots = _merged_w(settings.spec, point, sub, index, better)
    point = dataclasses.replace(point, x=merged[0], y=merged[1], s=merged[2], factorization=factorization, w=w,
                                roots=roots)
    return point, status, unrefined


def _merged_w(spec: ConeSpec, point: derivative.Point, sub: derivative.Point, index: torch.Tensor,
              better: torch.Tensor) -> tuple[torch.Tensor | None, list | None]:
    """``point``'s w and its projection's roots (``derivative.Point``) with the elements ``index`` taken
    from ``sub``'s elements ``better``: the fallback's refined w and roots, or where its refinement
    did not keep them, its y - s and the roots of that projection (solved for those elements
    alone). None where ``point`` has none (the derivatives then take y - s for every element)."""
    if point.w is None:
        return None, None
    if sub.w is None:
        cleaned = sub.cleaned()  # Clarabel's infeasible elements hold NaN, which the projection's eigh refuses
        sub_w = cleaned.y - cleaned.s
        sub_roots = product.project_with_roots(spec, sub_w, dual=True)[1]
    else:
        sub_w, sub_roots = sub.w, sub.roots
    w = point.w.clone()
    w[index] = sub_w[better]
    roots = []
    for whole, part in zip(point.roots, sub_roots):
        if whole is not None:
            whole = whole.clone()
            whole[index] = part[better]
        roots.append(whole)
    return w, roots


def _sym(P: torch.Tensor | None) -> torch.Tensor | None:
    return None if P is None else (P + P.transpose(-1, -2)) / 2


def _threads_for(A: torch.Tensor, rows: torch.Tensor) -> contextlib.AbstractContextManager:
    """The threads a solve or derivative of programs with constraint matrix ``A`` ((B, m, n) or
    shared (m, n)) and a (B, m) ``rows`` tensor runs with (``threads.small_work_threads``, counting
    the (m + n)² entries of each program's residual map)."""
    m, n = A.shape[-2:]
    return threads.small_work_threads(rows.shape[0] * (m + n) ** 2, A.device)


@applied_as_given
class ConeProgram(torch.autograd.Function):
    """(A, b, c, P) -> (x, y, s, status, lu, pivots, w); A (B, m, n) or shared (m, n), b (B, m), c (B, n).

    lu, pivots: the factorization of the residual map's derivative made while refining (empty in
    lsqr/lsmr mode), reused by backward and jvp; w: the refined point's w with the exponential
    cones' roots and the PSD cones' eigendecompositions of its projection (``_pack_w``; empty where
    not known), at which backward and jvp take the projection's derivative without solving for them again.
    """

    @staticmethod
    def forward(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None,
                settings: Settings) -> tuple[torch.Tensor, ...]:
        check_finite({"A": A, "b": b, "c": c, "P": P})
        check_semidefinite(P)
        with _threads_for(A, b):
            point, status, unrefined = _solve_and_refine(A, b, c, P, settings)
            # one host sync, also spares the policy's
            all_solved, any_unrefined = host_read(torch.stack([(status == ConeStatus.SOLVED).all(), unrefined.any()]))
            if settings.solver == "ipm" and not all_solved:
                point, status, unrefined = _fall_back(A, b, c, P, settings, point, status, unrefined)
                all_solved, any_unrefined = False, bool(unrefined.any())  # the fallback's statuses: the policy's to read
            elif settings.solver == "clarabel" and settings.automatic and not all_solved:
                point, status, unrefined = _method_fall_back(A, b, c, P, settings, point, status, unrefined)
                all_solved, any_unrefined = False, bool(unrefined.any())
            if any_unrefined and settings.refine_steps >= refine.MAX_STEPS:  # a refinement stalled: a closer start
                point, status, unrefined = _tightened(A, b, c, P, settings, point, status, unrefined)
                any_unrefined = bool(unrefined.any())
        # for setup_context: the derivatives warn where a SOLVED element was not refined to round-off
        _FORWARD_OUTCOME.message = _unrefined_message(unrefined) if any_unrefined else None
        x = point.x
        solved = (status == ConeStatus.SOLVED).unsqueeze(-1)
        nan = lambda t: torch.where(solved, t, constant(math.nan, t))  # noqa: E731
        if point.factorization is None:  # lsqr/lsmr: nothing to reuse; empty tensors keep the outputs uniform
            lu, pivots = x.new_empty(0), torch.empty(0, dtype=torch.int32, device=x.device)
        else:
            lu, pivots = point.factorization.lu, point.factorization.pivots
        if settings.policy is not None and not all_solved:
            settings.policy.apply(status)
        return nan(point.x), nan(point.y), nan(point.s), status, lu, pivots, _pack_w(point)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        A, _, _, P, settings = inputs
        x, y, s, status, lu, pivots, w = output
        ctx.mark_non_differentiable(status, lu, pivots, w)
        # the outputs without a cotangent reach backward as None, not as zeros: the factorization's
        # zero cotangent alone would be a (B, n + m, n + m) tensor written on every backward
        ctx.set_materialize_grads(False)
        ctx.settings = settings
        ctx.unrefined_message = getattr(_FORWARD_OUTCOME, "message", None)  # read, not consumed (torch.func: twice)
        ctx.save_for_backward(A, P, x, y, s, status, lu, pivots, w)
        ctx.save_for_forward(A, P, x, y, s, status, lu, pivots, w)

    @staticmethod
    @refuses_batched_gradients("The cone layer")
    def backward(ctx: Any, vx: torch.Tensor | None, vy: torch.Tensor | None, vs: torch.Tensor | None,
                 *_non_differentiable: Any) -> tuple:
        A, P, x, y, s, status, lu, pivots, w = ctx.saved_tensors
        warn_inexact_derivative(ctx.unrefined_message)
        needs = tuple(ctx.needs_input_grad[:4])
        # an output without a cotangent passes None (zero): with none for y and s, D^T is not applied
        with _threads_for(A, y):
            grads = _VJP.apply(ctx.settings, needs, True, A, P, x, y, s, status, lu, pivots, w, vx, vy, vs)
        return (*(g if need else None for g, need in zip(grads, needs)), None)

    @staticmethod
    @refuses_batched_gradients("The cone layer")
    def jvp(ctx: Any, dA: torch.Tensor | None, db: torch.Tensor | None, dc: torch.Tensor | None,
            dP: torch.Tensor | None, _settings: Any) -> tuple:
        A, P, x, y, s, status, lu, pivots, w = ctx.saved_tensors
        warn_inexact_derivative(ctx.unrefined_message)
        with _threads_for(A, y):
            dx, dy, ds = _JVP.apply(ctx.settings, A, P, x, y, s, status, lu, pivots, w, dA, db, dc, dP)
        return dx, dy, ds, None, None, None, None

    @staticmethod
    def vmap(info: Any, in_dims: tuple, A: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
             P: torch.Tensor | None, settings: Settings) -> tuple[tuple[torch.Tensor, ...], tuple[int, ...]]:
        """``torch.func.vmap`` rule: the vmapped dimension (V) joins the batch (B) of b and c, and
        the solver runs once on V·B programs; an unbatched shared A or P stays shared."""
        flat = _Flat(info.batch_size, b, in_dims[1])
        if settings.warm_starts is not None:
            settings = dataclasses.replace(settings, warm_starts=tuple(settings.warm_starts) * flat.size)
        out = ConeProgram.apply(flat.matrix(A, in_dims[0]), flat.rows(b, in_dims[1]), flat.rows(c, in_dims[2]),
                                flat.matrix(P, in_dims[3]), settings)
        return tuple(o.reshape(flat.size, o.shape[0] // flat.size, *o.shape[1:]) for o in out), (0,) * len(out)


def _pack_w(point: derivative.Point) -> torch.Tensor:
    """The point's w and its projection's exponential roots and PSD eigendecompositions side by side,
    (B, m + the blocks' ``product.state_width``), for the derivatives (``derivative.Point.w``); an
    empty tensor where they are not known."""
    if point.w is None:
        return point.x.new_empty(0)
    return torch.cat([point.w, *(r for r in point.roots if r is not None)], -1)


def _unpack_w(spec: ConeSpec, packed: torch.Tensor) -> tuple[torch.Tensor | None, list | None]:
    """``_pack_w``'s w and roots (one entry per block of spec, None for the blocks without any)."""
    if packed.numel() == 0:
        return None, None
    roots, start = [], spec.size
    for block in spec.blocks():
        width = product.state_width(block)
        roots.append(packed[:, start:start + width] if width else None)
        start += width
    return packed[:, :spec.size], roots


def _point(settings: Settings, A: torch.Tensor, P: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor,
           s: torch.Tensor, status: torch.Tensor, lu: torch.Tensor, pivots: torch.Tensor,
           packed_w: torch.Tensor) -> derivative.Point:
    factorization = linsolve.DenseFactorization(lu, pivots) if lu.numel() else None
    w, roots = _unpack_w(settings.spec, packed_w)
    point = derivative.Point(settings.spec, A, _sym(P), x, y, s, status == ConeStatus.SOLVED, factorization, w, roots)
    return point.cleaned()  # a failed element's NaN x, y must not reach the A and P cotangents


class _Flat:
    """Moves a ``torch.func.vmap`` dimension of size V into the batch (B) of per-element tensors;
    ``reference`` is a (B, ·) tensor and ``dim`` its vmapped dimension."""

    def __init__(self, size: int, reference: torch.Tensor, dim: int | None):
        self.size = size
        self.batch = self.leading(reference, dim).shape[1]

    def leading(self, t: torch.Tensor, dim: int | None) -> torch.Tensor:
        return t.movedim(dim, 0) if dim is not None else t.expand(self.size, *t.shape)

    def rows(self, t: torch.Tensor | None, dim: int | None) -> torch.Tensor | None:
        """A (B, ·) tensor as (V·B, ·)."""
        if t is None:
            return None
        t = self.leading(t, dim)
        return t.reshape(self.size * self.batch, *t.shape[2:])

    def matrix(self, t: torch.Tensor | None, dim: int | None) -> torch.Tensor | None:
        """A shared (·, ·) or batched (B, ·, ·) matrix as (V·B, ·, ·); an unbatched shared one
        (dense or sparse) stays as it is."""
        if t is None or (dim is None and t.dim() == 2):
            return t
        t = self.leading(t, dim)
        if t.dim() == 3:  # one matrix per vmapped element, shared by its batch
            t = t.unsqueeze(1).expand(self.size, self.batch, *t.shape[1:])
        return t.reshape(self.size * self.batch, *t.shape[2:])

    def split(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.reshape(self.size, self.batch, *t.shape[1:])


def _flat_point(flat: _Flat, in_dims: tuple, A: torch.Tensor, P: torch.Tensor | None, x: torch.Tensor,
                y: torch.Tensor, s: torch.Tensor, status: torch.Tensor, lu: torch.Tensor,
                pivots: torch.Tensor, w: torch.Tensor) -> tuple:
    """The saved point of ``ConeProgram`` (A, P, x, y, s, status, lu, pivots, w) as V·B elements."""
    rows = [flat.rows(t, d) for t, d in zip((x, y, s, status), in_dims[2:6])]
    if lu.numel() == 0:  # lsqr/lsmr: no factorization
        factor = [lu.new_empty(0), pivots.new_empty(0)]
    else:
        factor = [flat.rows(t, d) for t, d in zip((lu, pivots), in_dims[6:8])]
    w = w.new_empty(0) if w.numel() == 0 else flat.rows(w, in_dims[8])  # empty: not known
    return (flat.matrix(A, in_dims[0]), flat.matrix(P, in_dims[1]), *rows, *factor, w)


class _FirstOrderOnly(torch.autograd.Function):
    """A derivative rule of ``ConeProgram`` (its vjp or jvp) as a Function of its own: its linear
    solves then run on plain tensors under torch.func, and differentiating it again is refused."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
        pass

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> tuple:
        raise NotImplementedError(SECOND_ORDER)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple:
        raise NotImplementedError(SECOND_ORDER)


@applied_as_given
class _VJP(_FirstOrderOnly):
    """(settings, needs, sum_shared, A, P, x, y, s, status, lu, pivots, w, vx, vy, vs) -> the cotangents
    of (A, b, c, P), None where ``needs`` says so (vx, vy, vs: None is zero); a shared A's or P's summed over the batch when
    ``sum_shared``. ``ConeProgram``'s backward, as a Function of its own so that it runs on plain
    tensors (its linear solves take data-dependent branches) and so that differentiating it raises."""

    @staticmethod
    def forward(settings: Settings, needs: tuple[bool, ...], sum_shared: bool, A: torch.Tensor,
                P: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, status: torch.Tensor,
                lu: torch.Tensor, pivots: torch.Tensor, w: torch.Tensor, vx: torch.Tensor | None,
                vy: torch.Tensor | None, vs: torch.Tensor | None) -> tuple:
        point = _point(settings, A, P, x, y, s, status, lu, pivots, w)
        r = derivative.vjp(point, settings.mode, vx, vy, vs)
        need_A, need_b, need_c, need_P = needs
        n = x.shape[-1]
        grad_A = grad_P = None
        if need_A and A.layout != torch.strided:
            grad_A = _grad_sparse(A, point, r)
        elif need_A:
            grad_A = embedding.adjoint_A(point.x, point.y, r, shared=sum_shared and A.dim() == 2)
        if need_P:
            grad_P = embedding.adjoint_P(point.x, r, shared=sum_shared and P.dim() == 2)
        return grad_A, -r[:, n:] if need_b else None, -r[:, :n] if need_c else None, grad_P

    @staticmethod
    def vmap(info: Any, in_dims: tuple, settings: Settings, needs: tuple[bool, ...], sum_shared: bool,
             A: torch.Tensor, P: torch.Tensor | None, *rest: torch.Tensor) -> tuple:
        flat = _Flat(info.batch_size, rest[0], in_dims[5])
        if needs[0] and A.layout != torch.strided:
            raise NotImplementedError("the gradient of a sparse A under torch.func.vmap (or jacrev) is not "
                                      "supported; pass A as a dense tensor")
        point = _flat_point(flat, in_dims[3:12], A, P, *rest[:7])
        vectors = [flat.rows(t, d) for t, d in zip(rest[7:], in_dims[12:])]
        out = [flat.split(g) for g in _VJP.apply(settings, needs, False, *point, *vectors)]
        for index, matrix, dim in ((0, A, in_dims[3]), (3, P, in_dims[4])):
            shared = matrix is not None and matrix.dim() - (dim is not None) == 2
            if out[index] is not None and shared and sum_shared:  # its gradient is the sum over the batch
                out[index] = out[index].sum(1)
        return tuple(out), tuple(None if g is None else 0 for g in out)


@applied_as_given
class _JVP(_FirstOrderOnly):
    """(settings, A, P, x, y, s, status, lu, pivots, w, dA, db, dc, dP) -> (dx, dy, ds): ``ConeProgram``'s
    jvp, a Function of its own for the reasons of ``_VJP``."""

    @staticmethod
    def forward(settings: Settings, A: torch.Tensor, P: torch.Tensor | None, x: torch.Tensor, y: torch.Tensor,
                s: torch.Tensor, status: torch.Tensor, lu: torch.Tensor, pivots: torch.Tensor, w: torch.Tensor,
                dA: torch.Tensor | None, db: torch.Tensor | None, dc: torch.Tensor | None,
                dP: torch.Tensor | None) -> tuple:
        point = _point(settings, A, P, x, y, s, status, lu, pivots, w)
        # scipy's LSQR cannot read the tensors torch.func hands a jvp rule: forward mode is dense
        return derivative.jvp(point, "dense", dA, db, dc, _sym(dP))

    @staticmethod
    def vmap(info: Any, in_dims: tuple, settings: Settings, A: torch.Tensor, P: torch.Tensor | None,
             *rest: torch.Tensor | None) -> tuple:
        flat = _Flat(info.batch_size, rest[0], in_dims[3])
        point = _flat_point(flat, in_dims[1:10], A, P, *rest[:7])
        dA, db, dc, dP = rest[7:]
        dims = in_dims[10:]
        tangents = (flat.matrix(dA, dims[0]), flat.rows(db, dims[1]), flat.rows(dc, dims[2]), flat.matrix(dP, dims[3]))
        out = _JVP.apply(settings, *point, *tangents)
        return tuple(flat.split(t) for t in out), (0, 0, 0)


def _grad_sparse(A: torch.Tensor, point: derivative.Point, r: torch.Tensor) -> torch.Tensor:
    """The A cotangent of a shared sparse A, on A's sparsity pattern and in its layout."""
    if A.layout == torch.sparse_csr:
        crow, col = A.crow_indices(), A.col_indices()
        rows = torch.repeat_interleave(torch.arange(A.shape[0], device=A.device), crow.diff())
        values = embedding.grad_A_entries(point.x, point.y, r, rows, col)
        return torch.sparse_csr_tensor(crow, col, values, size=A.shape, check_invariants=False)  # A's own pattern
    A = A.coalesce()
    rows, cols = A.indices()
    values = embedding.grad_A_entries(point.x, point.y, r, rows, cols)
    return torch.sparse_coo_tensor(A.indices(), values, size=A.shape, check_invariants=False, is_coalesced=True)
