"""Implicit differentiation of the QP solution map through its KKT conditions.

At a solution, F(x, ν, λ, s; θ) = (Qx + p + Aᵀν + Gᵀλ, Ax − b, Gx + s − h, λ∘s) = 0. Its Jacobian
in (x, ν, λ, s) is

    J = [[Q, Aᵀ, Gᵀ, 0], [A, 0, 0, 0], [G, 0, 0, I], [0, 0, diag(s), diag(λ)]];

forward mode (JVP) solves J d = −∂F/∂θ·t, reverse mode (VJP) Jᵀ w = g. Both reduce to the reduced
KKT system that the interior point method factorised at its last iterate, so a derivative costs
one more solve. Everything here acts on the scaled problem (see ``scaling``).

``KKTSolve`` is that solve as a ``torch.autograd.Function`` whose own derivatives — reverse,
forward and ``torch.func.vmap`` — are again solves with J or Jᵀ through the same factorisation.
It returns the first three blocks of the solution; ``solve`` adds the fourth by ordinary tensor
operations, which the VJP, not needing it, leaves out.
``solution_vjp`` and ``solution_jvp`` are ordinary tensor operations around it, so the QP layer's
derivative rules are themselves differentiable, to any order (double backward,
``torch.func.hessian``, ``jacfwd`` of ``jacrev``), and exact to the accuracy of the first derivative.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from optlayers.compiling import compiled
from optlayers.engine.kkt import KKTFactor, solve_reduced
from optlayers.engine.step import QPData
from optlayers.functions import applied_as_given
from optlayers.higher_order import no_forward_over_forward
from optlayers.linalg import add_product, mtv, mv
from optlayers.qp.ipm import IPMSettings, derivative_factor

# The tensor fields of ``KKTFactor``, in order; its other fields (the equality count m) are
# read again from the data when the factor is rebuilt from these.
FACTOR_FIELDS = tuple(f.name for f in dataclasses.fields(KKTFactor) if f.type in ("Tensor", Tensor))


def factor_tensors(f: KKTFactor) -> tuple[Tensor, ...]:
    """The tensors of ``f``, in the order of ``FACTOR_FIELDS``."""
    return tuple(getattr(f, name) for name in FACTOR_FIELDS)


def factor_from(tensors: Sequence[Tensor], m: int) -> KKTFactor:
    """The ``KKTFactor`` of ``factor_tensors`` ``tensors``, with ``m`` equality rows."""
    return KKTFactor(**dict(zip(FACTOR_FIELDS, tensors)), m=m)


def flat_vmap(apply: Callable[..., tuple[Tensor, ...]], size: int, in_dims: Sequence[int | None],
              args: Sequence[Any]) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
    """A ``torch.func.vmap`` rule for Functions over flat batches (B, ·): the vmapped dimension
    (of ``size``) joins the batch dimension, ``apply`` runs once on (size·B, ·) tensors, and its
    outputs are split again. Non-tensor arguments pass through; unbatched tensors are expanded."""
    inner = []  # the flat batch B inside, which the outputs split off again (size may be 0)

    def flat(t: Any, d: int | None) -> Any:
        if not isinstance(t, Tensor):
            return t
        t = t.movedim(d, 0) if d is not None else t.expand(size, *t.shape)
        inner.append(t.shape[1])
        return t.reshape(size * t.shape[1], *t.shape[2:])  # explicit sizes: the tensor may be empty

    out = apply(*(flat(t, d) for t, d in zip(args, in_dims)))
    return tuple(o.reshape(size, inner[0], *o.shape[1:]) for o in out), (0,) * len(out)


FORWARD_OVER_FORWARD = (
    "forward mode over forward mode (jacfwd of jacfwd, nested torch.func.jvp) through the QP layer is not "
    "supported: torch.func does not differentiate a custom Function's jvp rule at outer forward levels. Take "
    "second derivatives with torch.func.hessian (forward over reverse), jacrev(jacrev(f)) or jacrev(jacfwd(f)).")


def _outer(u: Tensor, v: Tensor) -> Tensor:
    return u.unsqueeze(-1) * v.unsqueeze(-2)


def _outer_sum(u1: Tensor, v1: Tensor, u2: Tensor, v2: Tensor, scale: float = 1.0) -> Tensor:
    """scale·(u1 v1ᵀ + u2 v2ᵀ) for (B, r) u's and (B, c) v's, in two kernels (under compilation
    elementwise: ``linalg.add_product``)."""
    return add_product(_outer(u1, v1), u2.unsqueeze(-1), v2.unsqueeze(-2), beta=scale, alpha=scale)


def _masked(ok: Tensor, ts: Sequence[Tensor]) -> list[Tensor]:
    failed = ~ok.unsqueeze(-1)
    return [t.masked_fill(failed, 0.0) for t in ts]


def _minus(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """a − b, where None stands for zero (and both None gives None)."""
    if b is None:
        return a
    return -b if a is None else a - b


def _solve(f: KKTFactor, lam: Tensor, s: Tensor, r: Sequence[Tensor | None], transpose: bool,
           refine_steps: int) -> tuple[Tensor, Tensor, Tensor]:
    """The first three blocks of y = J⁻¹ r (or J⁻ᵀ r), by the reduced system; a block of r given
    as None is zero. ``_last_block`` gives the fourth."""
    r1, r2, r3, r4 = r
    r1 = f.G.new_zeros(f.G.shape[0], f.G.shape[-1]) if r1 is None else r1
    scaled_r4 = None if r4 is None else (s / lam) * r4 if transpose else r4 / lam
    return solve_reduced(f, r1, r2, _minus(scaled_r4, r3), refine_steps, use_y=True)


def _last_block(G: Tensor, lam: Tensor, s: Tensor, ok: Tensor, y1: Tensor, y3: Tensor, r3: Tensor | None,
                r4: Tensor | None, transpose: bool) -> Tensor:
    """The fourth block of y = J⁻¹ r (or J⁻ᵀ r) from its first and third: from the
    complementarity row where λ ≥ s and from the primal row elsewhere, so that it never divides
    by a vanishing multiplier or slack; zero where ``ok`` is False. Ordinary tensor operations:
    differentiated as such."""
    primal = lam >= s
    if transpose:  # rows: … ; G y1 + s∘y4 = r3 ; y3 + λ∘y4 = r4
        y4 = torch.where(primal, _minus(r4, y3) / lam, _minus(r3, mv(G, y1)) / s)
    else:  # rows: … ; G y1 + y4 = r3 ; s∘y3 + λ∘y4 = r4
        y4 = torch.where(primal, _minus(r4, s * y3) / lam, _minus(r3, mv(G, y1)))
    return y4.masked_fill(~ok.unsqueeze(-1), 0.0)


def _bilinear_grad(u: Sequence[Tensor], v: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradient of uᵀ J v in (Q, A, G, λ, s)."""
    u1, u2, u3, u4 = u
    v1, v2, v3, v4 = v
    return _outer(u1, v1), _outer_sum(v2, u1, u2, v1), _outer_sum(v3, u1, u3, v1), u4 * v4, u4 * v3


def _apply_dJ(dQ: Tensor, dA: Tensor, dG: Tensor, dlam: Tensor, ds: Tensor, y: Sequence[Tensor],
              transpose: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dJ y (or dJᵀ y) for a tangent (dQ, dA, dG, dλ, ds) of J."""
    y1, y2, y3, y4 = y
    first = (mtv(dQ, y1) if transpose else mv(dQ, y1)) + mtv(dA, y2) + mtv(dG, y3)
    if transpose:
        return first, mv(dA, y1), mv(dG, y1) + ds * y4, dlam * y4
    return first, mv(dA, y1), mv(dG, y1), ds * y3 + dlam * y4


@applied_as_given
class KKTSolve(torch.autograd.Function):
    """(transpose, settings, Q, A, G, λ, s, ok, r1, r2, r3, r4, *factor) -> (y1, y2, y3, *factor):
    the first three blocks of y = J⁻¹ r, or J⁻ᵀ r with ``transpose``, for the J of the module
    docstring at (Q, A, G, λ, s); ``solve`` adds the fourth, which a reverse-mode derivative of
    the data does not need.

    ``factor``: the tensors (``FACTOR_FIELDS``) of the reduced system's factorisation at this
    point, or nothing, and it is built here; either way it is returned (not differentiable) for
    the next solve. Elements with ``ok`` False (B,) get zeros, whatever their data (NaN
    included). A block of r may be None: zero, at no cost.
    """

    @staticmethod
    def forward(transpose: bool, settings: IPMSettings, Q: Tensor, A: Tensor, G: Tensor, lam: Tensor, s: Tensor,
                ok: Tensor, r1: Tensor | None, r2: Tensor | None, r3: Tensor | None, r4: Tensor | None,
                *factor: Tensor) -> tuple[Tensor, ...]:
        f = factor_from(factor, A.shape[-2]) if factor else derivative_factor(Q, A, G, lam, s, settings)
        solve_fn = _solve
        if settings.compiled and not torch._C._are_functorch_transforms_active():
            solve_fn = compiled(_solve, Q.device.type)  # its input tensors are plain here (no graph, no transform)
        y = solve_fn(f, lam, s, (r1, r2, r3, r4), transpose, settings.derivative_refine_steps)
        # views: the factor may hold inputs (G, or A as C), and autograd wants no input returned as-is
        return (*_masked(ok, y), *(t.view_as(t) for t in factor_tensors(f)))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        ctx.transpose, ctx.settings = inputs[:2]
        ctx.factor_inputs = len(inputs) - 12
        ctx.set_materialize_grads(False)  # no zero tensors for the factor outputs
        ctx.mark_non_differentiable(*output[3:])
        saved = (*inputs[2:8], *inputs[10:12], *output)  # Q, A, G, λ, s, ok, r3, r4, y1..y3, factor
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved)

    @staticmethod
    def _unpack(ctx: Any) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The point (Q, A, G, λ, s, ok), the whole solution y (its last block recomputed) and the factor."""
        saved = ctx.saved_tensors
        point, (r3, r4), (y1, y2, y3), factor = saved[:6], saved[6:8], saved[8:11], saved[11:]
        _, _, G, lam, s, ok = point
        return point, (y1, y2, y3, _last_block(G, lam, s, ok, y1, y3, r3, r4, ctx.transpose)), factor

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        point, y, factor = KKTSolve._unpack(ctx)
        rbar = solve(not ctx.transpose, ctx.settings, point, (*grads[:3], None), factor)
        u, v = (y, rbar) if ctx.transpose else (rbar, y)
        gQ, gA, gG, glam, gs = (-t for t in _bilinear_grad(u, v))
        rbar = (g if need else None for g, need in zip(rbar, ctx.needs_input_grad[8:12]))  # None for a None block
        return (None, None, gQ, gA, gG, glam, gs, None, *rbar, *([None] * ctx.factor_inputs))

    @staticmethod
    def jvp(ctx: Any, _transpose: Any, _settings: Any, dQ: Tensor | None, dA: Tensor | None, dG: Tensor | None,
            dlam: Tensor | None, ds: Tensor | None, _ok: Any, *dr: Tensor | None) -> tuple[Tensor | None, ...]:
        point, y, factor = KKTSolve._unpack(ctx)
        Q, A, G, lam, s, ok = point
        zero = lambda t, like: torch.zeros_like(like) if t is None else t  # noqa: E731
        dJy = _apply_dJ(zero(dQ, Q), zero(dA, A), zero(dG, G), zero(dlam, lam), zero(ds, s), y, ctx.transpose)
        rhs = [_minus(d, j) for d, j in zip(dr[:4], dJy)]
        dy = KKTSolve.apply(ctx.transpose, ctx.settings, *point, *rhs, *factor)[:3]
        return (*(no_forward_over_forward(FORWARD_OVER_FORWARD, t, Q, A, G, lam, s) for t in dy), *([None] * len(factor)))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], *args: Any) -> tuple[tuple[Tensor, ...], tuple[int, ...]]:
        return flat_vmap(KKTSolve.apply, info.batch_size, in_dims, args)


def solve(transpose: bool, settings: IPMSettings, point: Sequence[Tensor], r: Sequence[Tensor | None],
          factor: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole y = J⁻¹ r (or J⁻ᵀ r) at ``point`` = (Q, A, G, λ, s, ok): ``KKTSolve``'s three
    blocks and ``_last_block``; differentiable to any order."""
    y1, y2, y3 = KKTSolve.apply(transpose, settings, *point, *r, *factor)[:3]
    _, _, G, lam, s, ok = point
    return y1, y2, y3, _last_block(G, lam, s, ok, y1, y3, r[2], r[3], transpose)


@dataclasses.dataclass(frozen=True)
class KKTPoint:
    """A solution of the scaled problem and the data of J there, all (B, ·); ``ok`` (B,) marks
    the elements whose derivatives are wanted (the others may hold anything, NaN included);
    ``factor`` as in ``KKTSolve``."""

    Q: Tensor
    A: Tensor
    G: Tensor
    x: Tensor
    nu: Tensor
    lam: Tensor
    s: Tensor
    ok: Tensor
    factor: tuple[Tensor, ...]


def solution_vjp(pt: KKTPoint, gx: Tensor | None, gnu: Tensor | None, glam: Tensor | None, gs: Tensor | None,
                 settings: IPMSettings) -> tuple[Tensor, Tensor, Tensor]:
    """The adjoint (w_x, w_ν, w_λ) of Jᵀ w = g for cotangents g of (x, ν, λ, s), all (B, ·); a
    cotangent given as None is zero. ``data_cotangent`` turns it into the data's cotangent (w's
    last block does not enter there)."""
    return KKTSolve.apply(True, settings, pt.Q, pt.A, pt.G, pt.lam, pt.s, pt.ok, gx, gnu, glam, gs, *pt.factor)[:3]


def plain_solution_vjp(pt: KKTPoint, gx: Tensor | None, gnu: Tensor | None, glam: Tensor | None, gs: Tensor | None,
                       settings: IPMSettings) -> tuple[Tensor, Tensor, Tensor]:
    """``solution_vjp``'s value at a point whose factor is given, by the same solve without
    ``KKTSolve``: plain tensor operations, not differentiable, for a first-order backward traced
    whole for compilation (``autograd.QPSolveFn.backward`` with ``compile=True``)."""
    f = factor_from(pt.factor, pt.A.shape[-2])
    wx, wnu, wlam = _masked(pt.ok, _solve(f, pt.lam, pt.s, (gx, gnu, glam, gs), True, settings.derivative_refine_steps))
    return wx, wnu, wlam


def data_cotangent(needs: Sequence[bool], wx: Tensor | None = None, wnu: Tensor | None = None,
                   wlam: Tensor | None = None, x: Tensor | None = None, nu: Tensor | None = None,
                   lam: Tensor | None = None) -> tuple[Tensor | None, ...]:
    """Cotangents −(∂F/∂θ)ᵀ w of the data θ = (Q, p, G, h, A, b), from the adjoint w of
    ``solution_vjp`` at the solution (x, ν, λ), all (B, ·). Only the cotangents ``needs`` names
    are formed (the others are None), and only their factors must be given: Q from (w_x, x), p
    from w_x, G from (w_x, w_λ, x, λ), h from w_λ, A from (w_x, w_ν, x, ν), b from w_ν. The
    formula is the same in every consistent scaling of the problem, so the factors may be those
    of the scaled or of the original one. Q enters symmetrised."""
    Q, p, G, h, A, b = needs
    return (
        _outer_sum(wx, x, x, wx, -0.5) if Q else None,
        -wx if p else None,
        _outer_sum(lam, wx, wlam, x, -1.0) if G else None,
        wlam if h else None,
        _outer_sum(nu, wx, wnu, x, -1.0) if A else None,
        wnu if b else None,
    )


def solution_jvp(pt: KKTPoint, t: QPData, settings: IPMSettings) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Tangents (dx, dν, dλ, ds) of the solution, −J⁻¹ ∂F/∂θ·t, from a tangent ``t`` of the data."""
    r1 = mv(t.Q, pt.x) + t.p + mtv(t.A, pt.nu) + mtv(t.G, pt.lam)
    r2 = mv(t.A, pt.x) - t.b
    r3 = mv(t.G, pt.x) - t.h
    dx, dnu, dlam, ds = solve(False, settings, (pt.Q, pt.A, pt.G, pt.lam, pt.s, pt.ok), (-r1, -r2, -r3, None), pt.factor)
    return dx, dnu, dlam, ds
