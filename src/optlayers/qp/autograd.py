"""The QP solve as a ``torch.autograd.Function``: forward runs the interior point method,
backward (VJP) and jvp differentiate the KKT conditions with the factorisation at the solution —
built by the forward when gradients were possible, otherwise on demand.

Inputs are flat batches (B, ·) as produced by ``problem.prepare_qp``; broadcasting of shared
arguments happens before, with ``expand``, so autograd sums their gradients over the batch.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from optlayers.qp.derivatives import solution_jvp, solution_vjp
from optlayers.qp.ipm import COMPUTE_DTYPE, IPMSettings, derivative_factor
from optlayers.qp.kkt import KKTFactor
from optlayers.qp.parallel import solve_scaled_parallel
from optlayers.qp.problem import check_values, qp_data
from optlayers.qp.scaling import (
    QPData,
    Scaling,
    equilibrate,
    scale_data_tangent,
    scale_solution_cotangent,
    unscale_data_cotangent,
    unscale_solution,
)
from optlayers.qp.status import QPStatus, apply_failure_policy

_N_PUBLIC = 9  # z, lam, nu, s, status, iterations, primal, dual, gap


class _Saved(NamedTuple):
    """What the derivatives need, in the scaled space; the trailing outputs of ``forward``. The
    KKT factorisation at the solution is kept from the forward pass when gradients were possible
    then; otherwise its fields are empty and ``factor`` rebuilds it (a ``jvp`` asked later)."""

    Q: Tensor
    A: Tensor
    G: Tensor
    x: Tensor
    nu: Tensor
    lam: Tensor
    s: Tensor
    d: Tensor
    e: Tensor
    f: Tensor
    c: Tensor
    C: Tensor
    d0: Tensor
    H: Tensor
    w_inv: Tensor
    w_inv_soft: Tensor
    chol_h: Tensor
    chol_s: Tensor
    status: Tensor

    def factor(self, settings: IPMSettings) -> KKTFactor:
        if self.chol_h.dim() != 3:
            return derivative_factor(self.Q, self.A, self.G, self.lam, self.s, settings)
        return KKTFactor(self.H, self.G, self.C, self.d0, self.w_inv, self.w_inv_soft, self.chol_h, self.chol_s,
                         self.solved(), self.nu.shape[-1])

    def scaling(self) -> Scaling:
        return Scaling(self.d, self.e, self.f, self.c)

    def solved(self) -> Tensor:
        return self.status == int(QPStatus.SOLVED)


_FACTOR_FIELDS = ("C", "d0", "H", "w_inv", "w_inv_soft", "chol_h", "chol_s")  # as in _Saved


def _factor_fields(fac: KKTFactor | None, like: Tensor) -> tuple[Tensor, ...]:
    """The factorisation's tensors for ``_Saved``, or empty placeholders without one."""
    if fac is None:
        return tuple(like.new_empty(0) for _ in _FACTOR_FIELDS)
    return tuple(getattr(fac, name) for name in _FACTOR_FIELDS)


def _rows(mask: Tensor, t: Tensor) -> Tensor:
    return mask.view(-1, *([1] * (t.dim() - 1)))


def _keep_solved(mask: Tensor, t: Tensor, fill: float) -> Tensor:
    return torch.where(_rows(mask, t), t, torch.tensor(fill, dtype=t.dtype, device=t.device))


class QPSolveFn(torch.autograd.Function):
    """(Q, p, G, h, A, b, settings, keep_factor, on_failure, batch_shape) -> (z, λ, ν, s, status,
    iterations, residuals..., saved...). The failure policy is applied here, on plain tensors, so
    that it also holds under ``torch.func`` transforms; ``batch_shape`` names failed elements.
    ``keep_factor``: factorise for the derivatives now (gradients are possible) rather than later."""

    @staticmethod
    def forward(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, settings: IPMSettings,
                keep_factor: bool, on_failure: str, batch_shape: tuple[int, ...]) -> tuple[Tensor, ...]:
        check_values(Q, p, G, h, A, b)
        dtype = p.dtype
        scaled, sc = equilibrate(qp_data(*(t.to(COMPUTE_DTYPE) for t in (Q, p, G, h, A, b))))
        result = solve_scaled_parallel(scaled, sc, settings, with_factor=keep_factor)
        st, res = result.state, result.residuals
        solved = st.status == int(QPStatus.SOLVED)
        x, nu, lam, s = (_keep_solved(solved, v, float("nan")).to(dtype) for v in unscale_solution(sc, st.x, st.nu, st.lam, st.s))
        apply_failure_policy(st.status.reshape(batch_shape), on_failure)
        saved = _Saved(scaled.Q, scaled.A, scaled.G, st.x, st.nu, st.lam, st.s, sc.d, sc.e, sc.f, sc.c,
                       *_factor_fields(result.factor, st.x), st.status)
        return (x, lam, nu, s, st.status, st.iterations, res.primal.to(dtype), res.dual.to(dtype), res.gap.to(dtype), *saved[:-1])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.settings = inputs[6]
        saved = (*output[_N_PUBLIC:], output[4])
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)
        ctx.mark_non_differentiable(*output[4:])

    @staticmethod
    def backward(ctx: Any, gz: Tensor | None, glam: Tensor | None, gnu: Tensor | None, gs: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        sv = _Saved(*ctx.saved_tensors)
        solved, sc = sv.solved(), sv.scaling()
        dtype = next(g.dtype for g in (gz, glam, gnu, gs) if g is not None)
        cot = [torch.zeros_like(ref) if g is None else _keep_solved(solved, g.to(COMPUTE_DTYPE), 0.0) for g, ref in ((gz, sv.x), (gnu, sv.nu), (glam, sv.lam), (gs, sv.s))]
        gx, gnu_s, glam_s, gs_s = scale_solution_cotangent(sc, *cot)
        ct = unscale_data_cotangent(sc, solution_vjp(sv.factor(ctx.settings), sv.x, sv.nu, sv.lam, sv.s, gx, gnu_s, glam_s, gs_s, ctx.settings.derivative_refine_steps))
        grads = [_keep_solved(solved, t, 0.0).to(dtype) for t in (ct.Q, ct.p, ct.G, ct.h, ct.A, ct.b)]
        return (*(g if need else None for g, need in zip(grads, ctx.needs_input_grad[:6])), None, None, None, None)

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        """``torch.func.vmap`` rule: the vmapped dimension joins the batch the solver already has."""
        tensors, (settings, keep_factor, on_failure, _) = args[:6], args[6:]
        size = info.batch_size
        moved = [t.movedim(d, 0) if d is not None else t.expand(size, *t.shape) for t, d in zip(tensors, in_dims)]
        flat = [t.reshape(-1, *t.shape[2:]) for t in moved]
        out = QPSolveFn.apply(*flat, settings, keep_factor, on_failure, (flat[0].shape[0],))
        return tuple(o.reshape(size, -1, *o.shape[1:]) for o in out), (0,) * len(out)

    @staticmethod
    def jvp(ctx: Any, dQ: Tensor | None, dp: Tensor | None, dG: Tensor | None, dh: Tensor | None,
            dA: Tensor | None, db: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        sv = _Saved(*ctx.saved_tensors)
        solved, sc = sv.solved(), sv.scaling()
        dtype = next(t.dtype for t in (dQ, dp, dG, dh, dA, db) if t is not None)

        def tangent(t: Tensor | None, like: Tensor) -> Tensor:
            return torch.zeros_like(like) if t is None else t.to(COMPUTE_DTYPE)
        dQ = tangent(dQ, sv.Q)
        t = QPData(Q=0.5 * (dQ + dQ.transpose(-1, -2)), p=tangent(dp, sv.x), A=tangent(dA, sv.A),
                   b=tangent(db, sv.nu), G=tangent(dG, sv.G), h=tangent(dh, sv.lam))
        dx, dnu, dlam, ds = solution_jvp(sv.factor(ctx.settings), sv.x, sv.nu, sv.lam, sv.s, scale_data_tangent(sc, t), ctx.settings.derivative_refine_steps)
        dz, dnu, dlam, ds = (_keep_solved(solved, v, float("nan")).to(dtype) for v in unscale_solution(sc, dx, dnu, dlam, ds))
        return (dz, dlam, dnu, ds, *([None] * (_N_PUBLIC - 4 + len(_Saved._fields) - 1)))
