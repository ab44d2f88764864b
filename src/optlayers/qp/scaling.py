"""Ruiz equilibration of a batch of QPs, and the maps between scaled and original quantities.

The scaled problem has Q̂ = c·DQD, p̂ = c·Dp, Â = EAD, b̂ = Eb, Ĝ = FGD, ĥ = Fh with positive
diagonal D, E, F and a cost scale c. Its solution maps back by x = Dx̂, ν = Eν̂/c, λ = Fλ̂/c,
s = ŝ/F. The solution map does not depend on the choice of scaling, so derivatives are taken
in the scaled space and carried back with the same diagonal maps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from torch import while_loop

from optlayers.engine.batch import concat, take
from optlayers.engine.constants import constant
from optlayers.engine.step import QPData
from optlayers.host import cpu_schedule
from optlayers.sides import far_sides

# Ruiz iterations: each halves the log-spread of row/column norms; ten is the usual choice
# (OSQP, PIQP) and equilibrates to within a few percent.
RUIZ_ITERATIONS = 10
# Norms outside this range are treated as this range, so empty or tiny rows and columns are
# not blown up (the same guard as OSQP's MIN_SCALING / MAX_SCALING).
_MIN_NORM = 1e-4
_MAX_NORM = 1e4


@dataclass(frozen=True)
class Scaling:
    """Diagonal scalings d (B, n), e (B, m), f (B, k) and cost scale c (B,); ``objective`` (B,), the
    objective's size ω that the default tolerance follows (``objective_size``), kept by the forward's
    scalings and None in those the backward rebuilds (no tolerance is tested there)."""

    d: Tensor
    e: Tensor
    f: Tensor
    c: Tensor
    objective: Tensor | None = None


def column_max(M: Tensor) -> Tensor:
    """Column maxima of a nonnegative (B, r, c) (its column infinity norms), zeros when r = 0."""
    if M.shape[-2] == 0:
        return M.new_zeros(M.shape[0], M.shape[-1])
    return M.amax(-2)


def row_max(M: Tensor) -> Tensor:
    """Row maxima of a nonnegative (B, r, c) (its row infinity norms), zeros when c = 0."""
    if M.shape[-1] == 0:
        return M.new_zeros(M.shape[:-1])
    return M.amax(-1)


def inverse_sqrt_norm(norm: Tensor) -> Tensor:
    """One Ruiz factor per row or column: 1/√(its largest entry), that taken within [_MIN_NORM, _MAX_NORM];
    1 for an empty one."""
    return torch.where(norm > 0, norm.clamp(_MIN_NORM, _MAX_NORM).rsqrt(), constant(1.0, norm))  # 1.0: a tensor per call


# On the CPU with one intra-op thread a large batch is equilibrated in slices whose Q and [A; G] (in
# the problem's dtype) take about this many bytes, so that the passes of the Ruiz iterations (three
# each) and of the scaling read them from the core's cache rather than from memory (at batch 128, n
# = 100 the batch's matrices are 20 MB; 60-68 -> 47-51 ms). With more threads every small kernel of
# a slice would fork and join the thread team, which a loaded machine turned into a loss (214-224 ->
# 287-299 ms with two threads at load 4.4), so there the batch is equilibrated whole.
_SLICE_BYTES = 1 << 20


def equilibrate(data: QPData, iterations: int = RUIZ_ITERATIONS) -> tuple[QPData, Scaling]:
    """Scale rows and columns of the KKT matrix [[Q, Aᵀ, Gᵀ], [A, 0, 0], [G, 0, 0]] to unit norm.

    The constraint rows [A; G] are scaled together and the scalings [d, e, f] live in one
    tensor, so that an iteration is a few operations whatever blocks the problem has. On the CPU
    with one thread (on its own schedule, ``host.cpu_schedule``, and not under compilation) large
    batches are equilibrated in slices (``_SLICE_BYTES``); each problem's scaling is the same
    either way."""
    batch, n = data.p.shape
    size = batch
    if not torch.compiler.is_compiling() and cpu_schedule(data.p.device) and torch.get_num_threads() == 1:
        size = max(1, _SLICE_BYTES // max((n + data.b.shape[-1] + data.h.shape[-1]) * n * data.Q.element_size(), 1))
    if size >= batch:
        return _equilibrate(data, iterations)
    parts = [_equilibrate(take(data, slice(i, i + size)), iterations) for i in range(0, batch, size)]
    return concat([scaled for scaled, _ in parts]), concat([sc for _, sc in parts])


def _power_of_two(t: Tensor) -> Tensor:
    """The nearest powers of two of positive ``t``: scalings by them are exact in floating point, so
    that the scaled problem is the original one and the solution maps back without rounding (a gap
    whose terms of 1e8 cancel to 1e-8 is then the returned point's gap, not a perturbed one)."""
    return torch.exp2(torch.round(torch.log2(t)))


def _looped(step: Callable[[Tensor], Tensor], x: Tensor, iterations: int) -> Tensor:
    """``step`` applied ``iterations`` times to ``x``, as one compiled loop (a ``while_loop``) rather
    than written out: inductor fuses the written-out Ruiz iterations of a small problem into one
    kernel of every iteration's code (about half of a compiled solve's C++ at n = 10, and of its
    compilation time). Each turn of the loop reads its condition on the host, hence only where
    that is free (the CPU)."""
    def go_on(i: Tensor, x: Tensor) -> Tensor:
        return i < iterations

    def turn(i: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return i + 1, step(x)

    return while_loop(go_on, turn, (torch.zeros((), dtype=torch.int64, device=x.device), x.clone()))[1]


def _equilibrate(data: QPData, iterations: int) -> tuple[QPData, Scaling]:
    n = data.p.shape[-1]
    absQ, absC = data.Q.abs(), torch.cat([data.A, data.G], dim=-2).abs()
    scales = torch.ones(data.p.shape[0], n + absC.shape[-2], dtype=data.p.dtype, device=data.p.device)  # [d, e, f]

    def ruiz(scales: Tensor) -> Tensor:
        # Norms of the currently scaled matrices, without forming them: |d_i M_ij d_j| etc.
        d, ef = scales.split([n, absC.shape[-2]], -1)
        col = torch.maximum(column_max(absQ * d.unsqueeze(-1)), column_max(absC * ef.unsqueeze(-1))) * d
        rows = row_max(absC * d.unsqueeze(-2)) * ef
        return scales * inverse_sqrt_norm(torch.cat([col, rows], dim=-1))

    if torch.compiler.is_compiling() and data.p.device.type == "cpu":
        scales = _looped(ruiz, scales, iterations)
    else:
        for _ in range(iterations):
            scales = ruiz(scales)
    scales = _power_of_two(scales)  # exact scaling: the scaled problem is the original one (see ``_power_of_two``)
    d, e, f = scales.split([n, data.b.shape[-1], data.h.shape[-1]], dim=-1)
    Q = d.unsqueeze(-1) * data.Q * d.unsqueeze(-2)
    A = e.unsqueeze(-1) * data.A * d.unsqueeze(-2)
    G = f.unsqueeze(-1) * data.G * d.unsqueeze(-2)
    p, b, h = d * data.p, e * data.b, f * data.h
    t, c = _sizes(Q, p, b, h)
    t_col = t[:, None]
    scaled = QPData(Q=c[:, None, None] * Q, p=c[:, None] * p / t_col, A=A, b=b / t_col, G=G, h=h / t_col)
    return scaled, Scaling(d=d * t_col, e=e / t_col, f=f / t_col, c=c / (t * t), objective=objective_size(c))


SMALL_DATA = 2.0 ** -6
"""Sizes below this are small: the variables' scale where the right-hand sides (or p against Q) are
small, and the objective's where Q and p are small beside the constraints. Scaled, such problems are
solved at unit size (``_sizes``); in the original units, the default tolerance follows them
(``ipm.absolute_tolerance``)."""
LARGE_DATA = 2.0 ** 16
"""Variables whose size is above this are large: scaled, such problems are solved at unit size
(``_sizes``). Random QPs with p, b and h of 1e7 (unit matrices) were certified infeasible unscaled,
those of 1e6 solved. Unscaled variables of 1e4 to 1e6 can leave the dual residual at a rounding of
ε·|Q||x| above the default relative tolerance where Q's product cancels (a singular Q): QPs with a
rank-three Q and every variable fixed by two opposite bounds, with Q and p scaled by 1e-5 to 1,
ended INACCURATE or MAX_ITER at 2^20 in 2 of 40 solves at x ≈ 1e5, 1 at 3e4 and 1 at 1e4, a fuzzed
one with x ≈ 6e5 at four of six scales; at 2^16 only the one at 1e4 (BENCHMARKS.md, "Variables of
2^16 to 2^20"). 2^12 solved that one too but cost Maros–Meszaros QPCBOEI1, and 2^6, the bound of
small data, QPCBOEI1 and QSCAGR25; at 2^16 the set's iteration counts are those of 2^20 but
QPCBOEI2's (48 and 49 against 33 and 31, one and two threads)."""
_SMALLEST_SCALE = 2.0 ** -40  # t, 1 / t, ω and their squares stay far inside float32's range


def _sizes(Q: Tensor, p: Tensor, b: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) each, for the equilibrated Q, p, b and h: a variables' scale t and a cost
    scale c, powers of two, that bring the scaled problem's objective and its right-hand sides to
    unit size together. t is the size the solution's variables take where that is below
    ``SMALL_DATA`` (max(|[b, h]|, |p| / q), q the size of Q as the mean of its columns' largest
    entries; at least 2^-40) or above ``LARGE_DATA`` (|[b, h]| without h's far sides,
    ``sides.far_sides``, or |p| / q where there are no constraints' sides; at most 2^40), else 1;
    c is 1 / max(q, |p| / t) (within [1e-4, 2^40]; 1
    where Q and p are zero). The scaled problem's Q̂ = c·Q, p̂ = c·p / t, b̂ = b / t and ĥ = h / t
    then have at most unit size (b̂ and ĥ, where they are far from it), and one of Q̂ and p̂ unit size.

    A QP is homogeneous in (p, h, b) and in (Q, p): at (αp, αh, αb) its solution is αx, αν, αλ, αs,
    and at (ωQ, ωp) it is x, s with ων, ωλ. t and c undo both: t enters the scaling as d·t, e/t, f/t
    and c/t², which leaves Q̂, Â and Ĝ as c·DQD, EAD and FGD, so that every map between scaled and
    original quantities holds as it is. Left at the data's size (p, b and h of 1e-6 beside unit
    matrices, or Q and p of 1e-8 beside unit constraints), the interior point method's absolute
    terms (its regularisation among them) are of the size of the data, and its answers 1e-4 off in
    relative terms; p, b and h of 1e7 had feasible problems certified infeasible. A linear program's
    variables follow b and h alone (q = 0)."""
    q = column_max(Q.abs()).mean(-1) if Q.shape[-1] else p.new_zeros(p.shape[0])
    linear = p.abs().amax(-1) if p.shape[-1] else p.new_zeros(p.shape[0])
    sides = torch.cat([b, h], -1)
    rhs = sides.abs().amax(-1) if sides.shape[-1] else sides.new_zeros(sides.shape[0])
    unconstrained = torch.where(q > 0, linear / q.clamp_min(_SMALLEST_SCALE), constant(0.0, q))  # |Q⁻¹p|'s size
    small = torch.maximum(rhs, unconstrained)
    # every equality holds at the solution, but an inequality far above the others (``far_sides``) need not
    # be active: the largest of the other sides
    equalities = b.abs().amax(-1) if b.shape[-1] else b.new_zeros(b.shape[0])
    typical = torch.maximum(equalities, far_sides(h)[1]) if h.shape[-1] else equalities
    large = torch.where(rhs > 0, typical, unconstrained)  # bounded by the constraints where there are any
    size = torch.where(small < SMALL_DATA, small, large)
    far = (size > 0) & ((size < SMALL_DATA) | (size > LARGE_DATA))
    t = torch.where(far, _power_of_two(size.clamp(_SMALLEST_SCALE, 1.0 / _SMALLEST_SCALE)), constant(1.0, size))
    cost = torch.maximum(q, linear / t)
    c = _power_of_two(torch.where(cost > 0, 1.0 / cost.clamp(_SMALLEST_SCALE, _MAX_NORM), constant(1.0, cost)))
    return t, c


def objective_size(c: Tensor) -> Tensor:
    """(B,): the objective's size ω of the equilibrated problems whose cost scale (before the
    variables' scale) is ``c`` (``_sizes``): 1 / c where that is below ``SMALL_DATA``, else 1. Where
    no ``tol`` is given, the tolerances of the dual residual and the gap follow it
    (``ipm.absolute_tolerance``)."""
    return torch.where(c > 1.0 / SMALL_DATA, 1.0 / c, constant(1.0, c))


def unscale_solution(sc: Scaling, x: Tensor | None, nu: Tensor | None, lam: Tensor | None,
                     s: Tensor | None) -> tuple[Tensor | None, ...]:
    """Map a scaled primal-dual point (or a tangent of one) to the original problem; a part
    given as None stays None."""
    c = sc.c.unsqueeze(-1)
    return (None if x is None else sc.d * x, None if nu is None else sc.e * nu / c,
            None if lam is None else sc.f * lam / c, None if s is None else s / sc.f)


def scale_solution_cotangent(sc: Scaling, gx: Tensor | None, gnu: Tensor | None, glam: Tensor | None,
                             gs: Tensor | None) -> tuple[Tensor | None, ...]:
    """Adjoint of ``unscale_solution``: cotangents of (x, ν, λ, s) to the scaled variables; a
    cotangent given as None (zero) stays None."""
    c = sc.c.unsqueeze(-1)
    return (None if gx is None else sc.d * gx, None if gnu is None else sc.e * gnu / c,
            None if glam is None else sc.f * glam / c, None if gs is None else gs / sc.f)


def unscale_adjoint(sc: Scaling, wx: Tensor | None, wnu: Tensor | None, wlam: Tensor | None) -> tuple[Tensor | None, ...]:
    """Map multipliers of the scaled problem's KKT residuals (stationarity, equalities,
    inequalities) to the original problem's: the scaled residuals are the original ones times
    c·D, E and F, so w = (c·D ŵ_x, E ŵ_ν, F ŵ_λ). A part given as None stays None."""
    return (None if wx is None else sc.c.unsqueeze(-1) * sc.d * wx, None if wnu is None else sc.e * wnu,
            None if wlam is None else sc.f * wlam)


def scale_data_tangent(sc: Scaling, t: QPData) -> QPData:
    """Map a tangent of the original data to the scaled data (the scaling is held fixed)."""
    c, col = sc.c, sc.d.unsqueeze(-2)
    # one new (B, ·, ·) tensor per matrix, scaled in place
    return QPData(
        Q=(t.Q * col).mul_((c.unsqueeze(-1) * sc.d).unsqueeze(-1)),
        p=c[:, None] * sc.d * t.p,
        A=(t.A * col).mul_(sc.e.unsqueeze(-1)),
        b=sc.e * t.b,
        G=(t.G * col).mul_(sc.f.unsqueeze(-1)),
        h=sc.f * t.h,
    )
