"""The QP solve as a ``torch.autograd.Function``: forward runs the interior point method
(``qp/forward.py``), backward (VJP) and jvp differentiate the KKT conditions with the factorisation at the solution —
built by the forward when gradients were possible (by the compiled backward, chunk by chunk, where a
compiled forward solved the batch in chunks: ``forward.Outcome.factor_left``), otherwise on demand.

Inputs are flat batches (B, ·) as produced by ``problem.prepare_qp``; broadcasting of shared
arguments happens before, with ``expand``, so autograd sums their gradients over the batch.

The derivative rules are written in differentiable operations (``derivatives.KKTSolve``), so
that second and higher derivatives are exact: when a rule runs under a graph (double backward,
``torch.func.hessian``, ``jacrev`` of ``jacfwd``), the solution it uses is connected to this
Function's outputs, and the data to its inputs. Forward over forward mode, which torch.func
cannot differentiate through a jvp rule, raises (``higher_order.no_forward_over_forward``).
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd import forward_ad

from optlayers import threads
from optlayers.compiling import compiled
from optlayers.engine.batch import map_chunks_joined
from optlayers.engine.constants import constant
from optlayers.engine.graphed import graphs_calls
from optlayers.engine.kkt import KKTFactor
from optlayers.engine.step import QPData
from optlayers.functions import applied_as_given, refuses_batched_gradients
from optlayers.higher_order import no_forward_over_forward
from optlayers.host import host_read
from optlayers.qp.derivative_checks import inexact_derivatives, inexact_message, warn_inexact
from optlayers.qp.derivatives import (
    FORWARD_OVER_FORWARD,
    KKTPoint,
    data_cotangent,
    factor_from,
    factor_tensors,
    flat_vmap,
    plain_solution_vjp,
    solution_jvp,
    solution_vjp,
)
from optlayers.qp.forward import N_PUBLIC, Saved, keep_solved
from optlayers.qp.forward import outputs as forward_outputs
from optlayers.qp.ipm import COMPUTE_DTYPE, IPMSettings, derivative_factor, solve_part
from optlayers.qp.parallel import compiled_slices
from optlayers.qp.scaling import (
    Scaling,
    scale_data_tangent,
    scale_solution_cotangent,
    unscale_adjoint,
    unscale_solution,
)
from optlayers.qp.status import FailurePolicy, QPStatus, apply_failure_policy
from optlayers.status import warn_inexact_derivative

_STATUS_AT = 7  # where the status is among the saved tensors (``setup_context``), after the data and solution
_FACTOR_AT = _STATUS_AT + 1 + len(Saved._fields)  # where the factor's tensors begin


_FORWARD_OUTCOME = threading.local()
"""``QPSolveFn.forward``'s word to the ``setup_context`` that follows it in the same thread: the
``InexactDerivativeWarning`` that its derivatives give, where some solved element's derivative is
inexact (``forward.Outcome.inexact``, read with the statuses; the elements named then, in the
forward, whose tensors are plain under every ``torch.func`` transform), and whether the forward left
the derivatives' factorisation to the backward (``forward.Outcome.factor_left``)."""


def _inexact_message_at(saved: tuple[Tensor, ...], batch_shape: tuple[int, ...], settings: IPMSettings | None = None,
                        factor_left: bool | None = None) -> str | None:
    """``derivative_checks.inexact_message`` at the scaled solution among the tensors ``setup_context``
    saves (``saved``: from the status on, as ``setup_context`` lays them out after the data and
    solution), with the derivatives' factorisation where the forward kept it; made here where it
    did not, with ``settings`` (``_left_factor``: the batch's structure ``factor_left`` where the
    forward left the factorisation to the backward, else a dense factor); else without (the
    amplification is not tested)."""
    status, *rest = saved[:_FACTOR_AT - _STATUS_AT]
    point = Saved(*rest)
    factor = None
    if len(saved) > _FACTOR_AT - _STATUS_AT:
        factor = factor_from(saved[_FACTOR_AT - _STATUS_AT:], point.A.shape[-2])
    elif settings is not None:
        factor = _left_factor(point, settings, bool(factor_left))
    return inexact_message(status, point.lam, point.s, factor, batch_shape)


def _left_factor(point: Saved, settings: IPMSettings, diagonal: bool) -> KKTFactor:
    """The derivatives' factorisation at the saved scaled solution ``point``, with the retries of
    a forward that makes it (``ipm.iterate``), where the forward left it to the backward
    (``forward.Outcome.factor_left``, the batch's structure ``diagonal``); eager, untracked."""
    with torch.no_grad():
        Q, A, G, lam, s = (t.detach() for t in (point.Q, point.A, point.G, point.lam, point.s))
        return derivative_factor(Q, A, G, lam, s, settings, diagonal=diagonal)


def _fill(on_failure: str | FailurePolicy) -> float:
    """What failed elements hold: the policy's fill (NaN where only an action is given)."""
    return on_failure.fill if isinstance(on_failure, FailurePolicy) else math.nan


def _attach(value: Tensor, t: Tensor) -> Tensor:
    """``value``, with the derivatives of ``t`` (whose value it is, up to rounding)."""
    return value + (t - t.detach())


def _differentiated(saved: tuple[Tensor, ...]) -> bool:
    """Whether a derivative rule's result may itself be differentiated: under a graph (create_graph,
    torch.func), or with forward AD around it (a saved tensor carries a tangent)."""
    return torch.is_grad_enabled() or any(forward_ad.unpack_dual(t).tangent is not None for t in saved)


def _point(saved: tuple[Tensor, ...]) -> tuple[KKTPoint, Scaling, Tensor, torch.dtype]:
    """The scaled solution and data at which to differentiate, the scaling, the solved mask and
    the data's dtype. When the rule may be differentiated (``_differentiated``) the point is
    differentiable: its values are the saved float64 ones, its derivatives those of the outputs
    and inputs of ``forward``. Then, and when the factorisation is still to be built there,
    failed elements read x = ν = 0, λ = s = 1 (their derivatives are zero; no NaN can leak);
    otherwise they keep whatever the solver left (``KKTSolve`` gives them zero solutions).
    ``saved``: ``ctx.saved_tensors``, which the rule reads once (``torch.utils.checkpoint``
    recomputes them and lets each be unpacked only once)."""
    Qi, Ai, Gi, z, lam, nu, s, status, *rest = saved
    sv = Saved(*rest[: len(Saved._fields)])
    factor = tuple(rest[len(Saved._fields):])
    solved = status == int(QPStatus.SOLVED)
    sc = Scaling(sv.d, sv.e, sv.f, sv.c)
    fill = lambda t, v: keep_solved(solved, t, v)  # noqa: E731
    differentiated = _differentiated((Qi, Ai, Gi, z, lam, nu, s))
    if factor and not differentiated:  # the raw point: nothing differentiates or factorises at it
        return KKTPoint(sv.Q, sv.A, sv.G, sv.x, sv.nu, sv.lam, sv.s, solved, factor), sc, solved, Qi.dtype
    x, nu_s, lam_s, s_s = fill(sv.x, 0.0), fill(sv.nu, 0.0), fill(sv.lam, 1.0), fill(sv.s, 1.0)
    Q, A, G = sv.Q, sv.A, sv.G
    if differentiated:
        c = sc.c.unsqueeze(-1)
        wide = lambda t, v: fill(t, v).to(COMPUTE_DTYPE)  # noqa: E731
        x = _attach(x, wide(z, 0.0) / sc.d)
        nu_s = _attach(nu_s, wide(nu, 0.0) * c / sc.e)
        lam_s = _attach(lam_s, wide(lam, 1.0) * c / sc.f)
        s_s = _attach(s_s, wide(s, 1.0) * sc.f)
        dQ, dA, dG = (t.to(COMPUTE_DTYPE) - t.detach().to(COMPUTE_DTYPE) for t in (Qi, Ai, Gi))
        col = sc.d.unsqueeze(-2)
        Q = Q + (c * sc.d).unsqueeze(-1) * (0.5 * (dQ + dQ.transpose(-2, -1))) * col
        A = A + sc.e.unsqueeze(-1) * dA * col
        G = G + sc.f.unsqueeze(-1) * dG * col
    return KKTPoint(Q, A, G, x, nu_s, lam_s, s_s, solved, factor), sc, solved, Qi.dtype


def _vjp(pt: KKTPoint, sc: Scaling, solved: Tensor, dtype: torch.dtype, grads: tuple[Tensor | None, ...],
         needs: tuple[bool, ...], settings: IPMSettings, adjoint: Callable[..., tuple[Tensor, Tensor, Tensor]]
         ) -> tuple[Tensor | None, ...]:
    """The data's cotangents (Q, p, G, h, A, b; None where ``needs`` is False) from the cotangents
    ``grads`` of (z, ν, λ, s) (None: zero), at the point of ``_point``; ``adjoint`` solves for the
    adjoint (``solution_vjp``, or ``plain_solution_vjp`` in a compiled first-order backward)."""
    # a failed element's cotangent may be anything (NaN): the solve gives it a zero adjoint
    g = scale_solution_cotangent(sc, *(None if t is None else t.to(COMPUTE_DTYPE) for t in grads))
    w = adjoint(pt, *g, settings)
    # The data's cotangent is formed in the original problem from the adjoint and the solution
    # mapped back, so that vectors are scaled rather than matrices; and only the factors of
    # the cotangents wanted. The solution's failed elements are zeroed (times w = 0 there).
    Q, p, G, h, A, b = needs
    primal = Q or G or A
    wx, wnu, wlam = unscale_adjoint(sc, *(t if need else None for t, need in zip(w, (primal or p, A or b, G or h))))
    failed = ~solved.unsqueeze(-1) if primal else None
    x, nu, lam, _ = (None if t is None else t.masked_fill_(failed, 0.0) for t in unscale_solution(
        sc, pt.x if primal else None, pt.nu if A else None, pt.lam if G else None, None))
    ct = data_cotangent(needs, wx=wx, wnu=wnu, wlam=wlam, x=x, nu=nu, lam=lam)
    return tuple(None if t is None else t.to(dtype) for t in ct)


def _plain(saved: tuple[Tensor, ...]) -> bool:
    """Whether a backward with these saved tensors (``setup_context``'s) is a first-order one: no
    graph is recorded (``_differentiated``) and no ``torch.func`` transform is active."""
    return not torch._C._are_functorch_transforms_active() and not _differentiated(saved[:_STATUS_AT])


def _first_order(saved: tuple[Tensor, ...]) -> bool:
    """Whether a backward with these saved tensors is a first-order one (``_plain``) at a
    factorised point (the factor was saved). Then ``_compiled_vjp`` may run it."""
    return len(saved) > _FACTOR_AT and _plain(saved)


def _compiled_vjp(point: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], needs: tuple[bool, ...],
                  settings: IPMSettings, dtype: torch.dtype) -> tuple[Tensor | None, ...]:
    """A first-order backward (``_first_order``) as one function of plain tensors, to compile:
    ``_vjp`` at ``_point``'s raw point, its adjoint solved by ``plain_solution_vjp`` (the solve
    that ``KKTSolve`` runs). ``point``: the saved tensors from the status on (``setup_context``;
    the data and solution before it are not read); ``dtype``: the data's."""
    status, *rest = point
    sv = Saved(*rest[: len(Saved._fields)])
    solved = status == int(QPStatus.SOLVED)
    pt = KKTPoint(sv.Q, sv.A, sv.G, sv.x, sv.nu, sv.lam, sv.s, solved, tuple(rest[len(Saved._fields):]))
    return _vjp(pt, Scaling(sv.d, sv.e, sv.f, sv.c), solved, dtype, grads, needs, settings, plain_solution_vjp)


def _factorising_vjp(point: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], needs: tuple[bool, ...],
                     settings: IPMSettings, dtype: torch.dtype, diagonal: bool) -> tuple[tuple[Tensor | None, ...], Tensor]:
    """``_compiled_vjp`` at a point without its factor (the forward left it to the backward:
    ``forward.Outcome.factor_left``, the batch's structure ``diagonal``), which is made first,
    unretried, as the forward would have made it (``fused.whole``); and (2,) bool: whether some
    factorisation failed, whether some solved problem's derivative is inexact
    (``derivative_checks.inexact_derivatives``)."""
    status, *rest = point
    sv = Saved(*rest[: len(Saved._fields)])
    f = derivative_factor(sv.Q, sv.A, sv.G, sv.lam, sv.s, settings, retries=0, diagonal=diagonal)
    ct = _compiled_vjp((*point, *factor_tensors(f)), grads, needs, settings, dtype)
    return ct, torch.stack([~f.ok.all(), inexact_derivatives(status, sv.lam, sv.s, f).any()])


def _in_chunks(fn: Callable[..., tuple[tuple[Tensor | None, ...], Any]], point: tuple[Tensor, ...],
               grads: tuple[Tensor | None, ...], *args: Any) -> tuple[tuple[Tensor | None, ...], list[Any]]:
    """``fn(point, grads, *args)``, which gives the cotangents and one more result, in the
    forward's slices and chunks (``compiled_slices``): the chunks' cotangents joined as they come
    (``batch.map_chunks_joined``), and the other results in batch order."""
    batch = point[0].shape[0]
    n = Saved(*point[1: 1 + len(Saved._fields)]).x.shape[-1]
    count, chunk = compiled_slices(batch, n, point[0].device)
    if chunk == batch:
        ct, other = fn(point, grads, *args)
        return ct, [other]
    return map_chunks_joined(lambda part: fn(tuple(t[part] for t in point), tuple(None if g is None else g[part] for g in grads),
                                             *args), batch, count, chunk)


def _sliced_compiled_vjp(point: tuple[Tensor, ...], grads: tuple[Tensor | None, ...], needs: tuple[bool, ...],
                         settings: IPMSettings, dtype: torch.dtype) -> tuple[Tensor | None, ...]:
    """``_compiled_vjp`` compiled, in the forward's slices and chunks (``_in_chunks``)."""
    vjp = compiled(_compiled_vjp, point[0].device.type, batched=True)
    return _in_chunks(lambda *args: (vjp(*args), None), point, grads, needs, settings, dtype)[0]


def _sliced_factorising_vjp(ctx: Any, point: tuple[Tensor, ...], grads: tuple[Tensor | None, ...],
                            needs: tuple[bool, ...], dtype: torch.dtype) -> tuple[Tensor | None, ...]:
    """The first-order backward of a forward that left the derivatives' factorisation to it
    (``ctx.factor_left``): ``_factorising_vjp`` compiled, in the forward's slices and chunks
    (``_in_chunks``; one host read per chunk). Where some solved problem's derivative is inexact,
    or some factorisation failed, the whole batch's is made again with retries (``_left_factor``),
    as the forward's would have been (``ipm.iterate``): the warning names the problems
    (``warn_inexact``), and where one failed the backward runs with it."""
    vjp = compiled(_factorising_vjp, point[0].device.type, batched=True)
    ct, flags = _in_chunks(vjp, point, grads, needs, ctx.settings, dtype, ctx.factor_left)
    unfactored, inexact = (any(column) for column in zip(*(host_read(f) for f in flags)))
    if unfactored or inexact:
        status, *rest = point
        sv = Saved(*rest)
        f = _left_factor(sv, ctx.settings, ctx.factor_left)
        warn_inexact(status, sv.lam, sv.s, f, ctx.batch_shape)
        if unfactored:
            ct = _compiled_vjp((*point, *factor_tensors(f)), grads, needs, ctx.settings, dtype)
    return ct


def _threads_for(p: Tensor) -> contextlib.AbstractContextManager:
    """The threads a solve or derivative of the flat batch whose p is ``p`` (B, n) runs with
    (``threads.small_work_threads``)."""
    batch, n = p.shape
    return threads.small_work_threads(batch * n * n, p.device)


def _backward(ctx: Any, saved: tuple[Tensor, ...], needs: tuple[bool, ...], grads: tuple[Tensor | None, ...]
              ) -> tuple[Tensor | None, ...]:
    """``QPSolveFn.backward`` for the cotangents ``grads`` of (z, ν, λ, s), the tensors ``saved`` by
    ``setup_context`` and the inputs' ``needs``."""
    graphs = graphs_calls(saved[0].device, ctx.settings.compiled)
    factorising = ctx.factor_left is not None and _plain(saved)
    if factorising or ((ctx.settings.compiled or graphs) and _first_order(saved)):
        # contiguous: the compiled function is specialised to its inputs' strides, and a loss's
        # cotangent may come expanded (z.sum()) or not (z.square().sum()): one compilation for both
        grads = tuple(None if g is None else g.contiguous() for g in grads)
        if factorising:  # the forward left the derivatives' factorisation to the backward
            ct = _sliced_factorising_vjp(ctx, saved[_STATUS_AT:], grads, needs, saved[0].dtype)
        elif graphs:  # one CUDA graph replay, compiled or not
            vjp = solve_part(_compiled_vjp, ctx.settings, saved[0].device)
            ct = vjp(saved[_STATUS_AT:], grads, needs, ctx.settings, saved[0].dtype)
        else:
            ct = _sliced_compiled_vjp(saved[_STATUS_AT:], grads, needs, ctx.settings, saved[0].dtype)
    else:
        if ctx.factor_left is not None:  # the forward did not look (``setup_context``)
            warn_inexact_derivative(_inexact_message_at(saved[_STATUS_AT:], ctx.batch_shape, ctx.settings, ctx.factor_left))
        pt, sc, solved, dtype = _point(saved)
        ct = _vjp(pt, sc, solved, dtype, grads, needs, ctx.settings, solution_vjp)
    return (*ct, None, None, None, None)


@applied_as_given
class QPSolveFn(torch.autograd.Function):
    """(Q, p, G, h, A, b, settings, keep_factor, on_failure, batch_shape) -> (z, λ, ν, s, status,
    iterations, residuals..., saved...). The failure policy is applied here, on plain tensors, so
    that it also holds under ``torch.func`` transforms; failed elements of z, λ, ν, s hold its fill
    (NaN for an action alone; their tangents and cotangents are zero); ``batch_shape`` names failed elements.
    ``keep_factor``: factorise for the derivatives now (gradients are possible) rather than later."""

    @staticmethod
    def forward(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, settings: IPMSettings,
                keep_factor: bool, on_failure: str | FailurePolicy, batch_shape: tuple[int, ...]) -> tuple[Tensor, ...]:
        with _threads_for(p):
            outputs, outcome = forward_outputs(Q, p, G, h, A, b, settings, keep_factor, constant(_fill(on_failure), p))
        if not outcome.all_solved:  # the primal residual and its bound name the possibly infeasible elements
            apply_failure_policy(outputs[4].reshape(batch_shape), on_failure,
                                 primal=(outputs[6].reshape(batch_shape), outputs[9].reshape(batch_shape)))
        # for setup_context: the backward and forward-mode derivatives warn (the elements named here, in
        # plain tensors), and make the factorisation the forward left them
        _FORWARD_OUTCOME.message = (_inexact_message_at((outputs[4], *outputs[N_PUBLIC:]), batch_shape)
                                    if outcome.inexact else None)
        _FORWARD_OUTCOME.factor_left = outcome.factor_left
        return outputs

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.settings, ctx.fill, ctx.n_outputs, ctx.batch_shape = inputs[6], _fill(inputs[8]), len(output), inputs[9]
        # read, not consumed: under torch.func a forward's context is set up twice (its transform's level
        # and the level below), and the backward runs with the second; each forward sets both anew
        ctx.inexact_message = getattr(_FORWARD_OUTCOME, "message", None)
        ctx.factor_left = getattr(_FORWARD_OUTCOME, "factor_left", None)
        ctx.set_materialize_grads(False)  # no zero tensors for the outputs nobody differentiates
        Q, _, G, _, A, _ = inputs[:6]
        saved = (Q, A, G, *output[:5], *output[N_PUBLIC:])  # data, (z, λ, ν, s, status), _Saved, factor
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(*output[4:])

    @staticmethod
    @refuses_batched_gradients("The QP layer")
    def backward(ctx: Any, gz: Tensor | None, glam: Tensor | None, gnu: Tensor | None, gs: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        needs, grads = tuple(ctx.needs_input_grad[:6]), (gz, gnu, glam, gs)
        saved = ctx.saved_tensors
        warn_inexact_derivative(ctx.inexact_message)  # named by the forward
        with _threads_for(saved[3]):  # z, (B, n)
            return _backward(ctx, saved, needs, grads)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """``torch.func.vmap`` rule: the vmapped dimension joins the batch the solver already has."""
        def apply(*flat: Any) -> tuple[Tensor, ...]:
            return QPSolveFn.apply(*flat[:9], (info.batch_size, *args[9]))  # failures named by (vmapped, inner) index
        return flat_vmap(apply, info.batch_size, in_dims, args)

    @staticmethod
    def jvp(ctx: Any, dQ: Tensor | None, dp: Tensor | None, dG: Tensor | None, dh: Tensor | None,
            dA: Tensor | None, db: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors  # read once: torch.utils.checkpoint lets each saved tensor be unpacked once
        pt, sc, solved, _ = _point(saved)
        dtype = next(t.dtype for t in (dQ, dp, dG, dh, dA, db) if t is not None)
        if ctx.inexact_message is not None:
            warn_inexact_derivative(ctx.inexact_message)
        elif len(saved) == _FACTOR_AT:  # without a factor kept the forward did not look: the test here
            warn_inexact_derivative(_inexact_message_at(saved[_STATUS_AT:], ctx.batch_shape, ctx.settings, ctx.factor_left))

        def tangent(t: Tensor | None, like: Tensor) -> Tensor:
            return torch.zeros_like(like) if t is None else t.to(COMPUTE_DTYPE)
        dQ = tangent(dQ, pt.Q)
        t = QPData(Q=0.5 * (dQ + dQ.transpose(-1, -2)), p=tangent(dp, pt.x), A=tangent(dA, pt.A),
                   b=tangent(db, pt.nu), G=tangent(dG, pt.G), h=tangent(dh, pt.lam))
        with _threads_for(pt.x):
            dx, dnu, dlam, ds = solution_jvp(pt, scale_data_tangent(sc, t), ctx.settings)
        point = saved[:7]  # the data and solution as saved (not computed here: see no_forward_over_forward)
        dz, dnu, dlam, ds = (no_forward_over_forward(FORWARD_OVER_FORWARD, keep_solved(solved, v, 0.0).to(dtype), *point)
                             for v in unscale_solution(sc, dx, dnu, dlam, ds))
        return (dz, dlam, dnu, ds, *([None] * (ctx.n_outputs - 4)))
