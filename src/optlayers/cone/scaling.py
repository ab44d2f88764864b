"""Scalings of a cone program that ``solve_cone`` solves in its place, each exact (powers of two)
and a constant of the reparametrisation (detached), so that derivatives through them are exact:

- ``equilibration``: the variables and rows at comparable sizes (Ruiz), where they are far apart;
- ``far_row_scales``: nonnegative rows whose sides stand far above the others' at their size;
- ``unit_scales``: the whole program at unit size.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from optlayers.cone.spec import ConeSpec
from optlayers.cone import nonneg, soc, zero
from optlayers.host import host_read
from optlayers.linalg import power_of_two_above
from optlayers.qp.scaling import RUIZ_ITERATIONS, column_max, inverse_sqrt_norm


UNIT_RANGE = 6
"""Data whose size (``unit_scales``) lies within [2^-6, 2^6) are solved as given; outside, scaled.
Solvers' defaults are tuned on data of about unit size: SCS's answers (eps 1e-4) to the example
programs of docs/cone.md (sizes 2-5) came out worse scaled to sizes in [1/2, 1), one of 64 beyond
the refinement's reach."""


FAR_ROW = 2.0 ** UNIT_RANGE
"""A nonnegative row's side is far (``far_rows``) above this times 1 + the program's smallest
nonzero side."""


def far_rows(sides: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k) the far sides of the nonnegative rows' sides ``sides``: the positive ones above
    ``FAR_ROW`` times 1 + the smallest nonzero |side| (none where all are zero), and (B,) the largest
    |side| that is not far.

    A side that large sets the program's unit (``unit_scales``) and leaves the others within the
    solvers' tests' absolute part (1 + the largest term), unsolved. Taken as the QP layer takes its
    far sides (``sides.far_sides``: from a gap of 1e3 times 1 + the next side up), a box of 1e3 to
    1e4 about random QPs with two equalities (never active) was no far row on some of them, and 2 to
    7 of 32 came out SOLVED up to 20 % off, or INACCURATE; and with no gap at all, 24 inactive rows
    whose slacks were 10^U(0, 4) left 5 of 32 SOLVED up to 30 % off and 2 INACCURATE (with the
    interior point method and Clarabel alike; ``tests/cone/test_cone_scaling.py``). A side far below
    the others (negative) is never far: it holds only where the variables are as large. A side of
    +inf (an absent bound, ``sides.without_absent``) is neither far nor counted."""
    size = sides.abs()
    finite = torch.isfinite(sides)
    smallest = size.masked_fill((size == 0) | ~finite, torch.inf).amin(-1, keepdim=True)
    far = (sides > FAR_ROW * (1 + smallest)) & finite
    return far, size.masked_fill(far | ~finite, 0).amax(-1)


def looks_at_sides(A: torch.Tensor, cones: ConeSpec) -> bool:
    """Whether ``far_row_scales`` looks at a program's sides: a dense A, and two or more nonnegative rows
    and second-order cones (one side cannot be far from the others)."""
    return A.layout == torch.strided and cones.nonneg + len(cones.soc) >= 2


class FarRows(NamedTuple):
    """``far_row_scales``' outcome: the ``scales`` (B, m), or None; and whether a nonnegative row has a
    side of +inf (an absent bound, which ``solve_cone`` takes out), read by the host in the same
    synchronisation as whether a side is far: True or False where it was read, None where it was not
    (the sides not looked at, or under torch.func's transforms)."""

    scales: torch.Tensor | None
    absent: bool | None


def far_row_scales(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None,
                   cones: ConeSpec) -> FarRows:
    """(B, m) powers of two r that scale each program's far nonnegative rows and far balls to the size
    of its largest side that is not far, 1 elsewhere: the sides of the nonnegative rows and the radii
    of the second-order cones (a ball ‖u‖ ≤ R: its first row's side, where no side of its other rows
    is larger), far by ``far_rows`` (bounds of 1e12 that stand for absent ones, a box of 1e3 about
    variables of unit size, the loosest of rows whose sides spread over orders, a ball of 1e4); a
    ball's rows by one number (1 on a nonnegative row of side +inf, an absent bound, which ``solve_cone``
    takes out); with them, whether there are absent bounds (``FarRows``). No scales for a sparse A and for
    fewer than two nonnegative rows and second-order cones (not looked at: ``solve_cone`` looks for
    absent bounds there itself), and where no program has a far side (read by the host, with the
    absent bounds in the same read; under torch.func's transforms, which cannot read, always the
    scales, but none for a shared A, which scaled rows would copy into every program, taking a
    batched solve's path where the plain call takes the shared one's).

    (rA)x + s' = rb, s' ∈ K is the same program where r scales nonnegative rows, or a cone's rows
    by one number (s' = rs, y' = y/r), exactly (powers of two), and r is a constant of it (detached),
    so that the derivatives through it are exact. Unscaled, a far side set the size of the program's
    data (``unit_scales``) and of the solvers' relative tests: with −1e4 ≤ x ≤ 1e4 added to random
    programs, one of 8 came out SOLVED at an objective 17 % above the optimum, and with 1e12 five of
    8 SOLVED and infeasible by up to 0.47; with ‖x‖ ≤ R added to 32 random QPs with two equalities,
    at R = 1e4 four to seven SOLVED up to 90 % off, at 1e6 to 1e12 19 to 25 SOLVED up to 40 times
    off; with the method and with Clarabel alike. With P, a side within ``FAR_ROW`` times (1 + |c| / |P|, the
    size of the unconstrained minimum) is not taken for far: the objective may push the variables
    onto it (x₀ ≤ 1e12 with c₀ = −1e14: scaled, its multiplier grew as large as the scale is small,
    and the solve ended INACCURATE). A sparse A is solved as given."""
    transformed = torch._C._are_functorch_transforms_active()
    if not looks_at_sides(A, cones) or (transformed and A.dim() == 2):
        return FarRows(None, None)
    balls = [block for block in cones.blocks() if block.module is soc]
    b = b.detach()
    sides, radii = b[:, cones.zero:cones.zero + cones.nonneg], []
    for block in balls:  # a ball's side: its radius, where no entry of its centre is larger
        cone_sides = b[:, block.start:block.stop].reshape(-1, block.count, block.size)
        radius = cone_sides[..., 0]
        centre = cone_sides[..., 1:].abs().amax(-1) if block.size > 1 else torch.zeros_like(radius)
        radii.append(torch.where(radius >= centre, radius, -radius.abs()))
    every = torch.cat([sides, *radii], -1)
    far, typical = far_rows(every)
    if P is not None:  # the unconstrained minimum's size, |c| / |P| (0 for P = 0: a linear objective)
        reach = c.detach().abs().amax(-1, keepdim=True) / P.detach().abs().amax((-2, -1)).reshape(-1, 1)
        far = far & (every > FAR_ROW * (1 + torch.nan_to_num(reach, nan=0.0, posinf=0.0)))
    absent = None
    if not transformed:  # one read: whether any side is far, and whether a nonnegative row's is +inf (an absent bound)
        flags = torch.stack([far.any(), torch.isposinf(sides).any()])
        any_far, absent = (bool(flag) for flag in host_read(flags))
        if not any_far:
            return FarRows(None, absent)
    target = torch.where(typical > 0, power_of_two_above(typical), 1.0).unsqueeze(-1)
    scales = torch.where(far, target / power_of_two_above(every.abs()), 1.0)
    ones = torch.ones_like(b)
    pieces, start = [ones[:, :cones.zero], scales[:, :cones.nonneg]], cones.nonneg
    for block in balls:  # one number per cone (the balls follow the nonnegative rows, SCS order): a
        # positive multiple of a point of a cone is in it
        pieces.append(scales[:, start:start + block.count].repeat_interleave(block.size, -1))
        start += block.count
    stop = balls[-1].stop if balls else cones.zero + cones.nonneg
    return FarRows(torch.cat([*pieces, ones[:, stop:]], -1), absent)


def unit_scales(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
                P: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Powers of two α, β and γ ((B, 1), or (1, 1) for α of a shared A) near the sizes of each
    program's matrix, primal and dual data, or 1 where that size is within ``UNIT_RANGE`` of 1 (or
    0): α near the largest |A| (dense A; 1 for a sparse one), β near the largest |b|, γ near the
    largest of |c|/α and β|P|/α² (the objective's gradient at an x of size β/α), so that the program
    solved is of unit size:

        min ½x̃ᵀ(β/(γα²))Px̃ + (c/(αγ))ᵀx̃ s.t. (A/α)x̃ + s̃ = b/β, s̃ ∈ K,

    whose solution gives x = (β/α)x̃, s = βs̃, y = γỹ (K is a cone), exactly: powers of two round
    nothing.

    The solvers' tolerances, the refinement's target and the SOLVED test are partly absolute (over
    1 + the largest term, as SCS's): on data of scale 1e-4 and below an answer met them while its y
    and s were accurate only to about that, both ~1e-5 on inactive rows, so that the Newton
    refinement from it failed and the derivative took the wrong active set: gradients 30 % to 30
    times off with the status SOLVED and no warning; with A of scale 1e4 one of 8 programs' gradients
    was 100 % off (with a warning), and with A of scale 1e-3 and P (x of 5e6) dx/db was 12 times the
    central differences', SOLVED, with no warning. Scaled, the program is solved, refined and checked
    as one of unit size; the scales are constants of the reparametrisation (detached), so that the
    derivatives through them are exact."""
    def size(t: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        largest = t.detach().abs().amax(dims).reshape(-1, 1)  # (1, 1) for a shared A or P
        return torch.where(torch.isfinite(largest), largest, 0.0)  # non-finite data are refused inside the solve

    def power(largest: torch.Tensor) -> torch.Tensor:
        scale = power_of_two_above(largest)  # 1 for 0
        return torch.where((scale >= 2.0 ** (1 - UNIT_RANGE)) & (scale <= 2.0 ** UNIT_RANGE), 1.0, scale)
    # a sparse A (whose division torch's CSR tensors do not differentiate) is solved as given
    matrix = power(size(A, (-2, -1))) if A.layout == torch.strided else torch.ones_like(b[:1, :1])
    primal = power(size(b, (-1,)))
    gradient = size(c, (-1,)) / matrix
    if P is not None:
        gradient = torch.maximum(gradient, primal * size(P, (-2, -1)) / (matrix * matrix))
    return matrix, primal, power(gradient)


def equilibration(A: torch.Tensor, P: torch.Tensor | None, cones: ConeSpec) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Powers of two d ((B, n), or (1, n) where A and P are shared) and e ((B or 1, m)) that bring the
    program's variables and rows to comparable sizes (Ruiz equilibration of [[P, Aᵀ], [A, 0]]):

        min ½x̄ᵀ(DPD)x̄ + (Dc)ᵀx̄ s.t. (EAD)x̄ + s̄ = Eb, s̄ ∈ K,

    with x = Dx̄, y = Eȳ, s = s̄/E, exactly. e is one number per cone on the rows of the
    second-order, PSD and exponential cones (which a positive number maps onto themselves), one per
    row on the zero and nonnegative rows. None (read by the host) where no program's rows or
    columns spread over more than 2^``UNIT_RANGE`` (their largest entries), and d and e are 1 for
    each program whose scalings stay within that spread: such programs are solved as given. A sparse
    A is solved as given.

    Unequilibrated, the solvers' tests (relative to the program's largest terms) passed answers
    whose small variables or rows were far from solved: random QPs as cone programs with their
    variables scaled by 10^±2 came out SOLVED up to 1e-4 off, by 10^±6 a fifth SOLVED up to 200 %
    off and a fifth not solved; their rows scaled by 10^±4, 17 of 128 SOLVED up to 6 % off
    (``tests/cone/test_cone_equilibration.py``), with the interior point method and Clarabel alike."""
    if A.layout != torch.strided or not A.shape[-1] or not A.shape[-2]:
        return None
    transformed = torch._C._are_functorch_transforms_active()
    a = A.detach().abs()
    a = a if a.dim() == 3 else a.unsqueeze(0)
    p = None
    if P is not None:
        p = P.detach().abs()
        p = p if p.dim() == 3 else p.unsqueeze(0)
        if a.shape[0] == 1:  # a shared A keeps one scaling: the programs' P at their largest
            p = p.amax(0, keepdim=True)
    if not transformed and not bool(_spread(_columns(a, p), -1).gt(2.0 ** UNIT_RANGE).any()
                                    | _spread(a.amax(-1), -1).gt(2.0 ** UNIT_RANGE).any()):
        return None
    d = a.new_ones(max(a.shape[0], 1 if p is None else p.shape[0]), a.shape[-1])
    e = a.new_ones(a.shape[0], a.shape[-2])
    for _ in range(RUIZ_ITERATIONS):
        scaled = a * e.unsqueeze(-1) * d.unsqueeze(-2)
        columns = _columns(scaled, None if p is None else p * d.unsqueeze(-1) * d.unsqueeze(-2))
        d = d * inverse_sqrt_norm(columns)
        e = e * inverse_sqrt_norm(_by_cone(scaled.amax(-1), cones))
    d, e = torch.exp2(torch.round(torch.log2(d))), torch.exp2(torch.round(torch.log2(e)))
    far = (_spread(d, -1) > 2.0 ** UNIT_RANGE) | (_spread(e, -1) > 2.0 ** UNIT_RANGE)  # (B, 1)
    d, e = torch.where(far, d, 1.0), torch.where(far, e, 1.0)
    if not transformed and not bool(far.any()):
        return None
    return d, e


def _columns(a: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """The largest entry of each column of [P; A] (a and p: their absolute values, (B, ·, n))."""
    return column_max(a) if p is None else torch.maximum(column_max(a), column_max(p))


def _spread(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The ratio of the largest to the smallest positive entry along ``dim`` (kept), 1 where none is positive."""
    positive = t > 0
    largest = t.masked_fill(~positive, 0.0).amax(dim, keepdim=True)
    smallest = t.masked_fill(~positive, torch.inf).amin(dim, keepdim=True)
    return torch.where(positive.any(dim, keepdim=True), largest / smallest, 1.0)


def _by_cone(rows: torch.Tensor, cones: ConeSpec) -> torch.Tensor:
    """(B, m) rows' norms, each cone other than the zero and nonnegative ones given its rows' largest."""
    parts = []
    for block in cones.blocks():
        piece = rows[:, block.start:block.stop]
        if block.module not in (zero, nonneg):
            piece = piece.reshape(-1, block.count, block.size).amax(-1, keepdim=True).expand(-1, -1, block.size)
            piece = piece.reshape(-1, block.count * block.size)
        parts.append(piece)
    return torch.cat(parts, -1) if parts else rows
