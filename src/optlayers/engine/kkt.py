"""Linear algebra of the interior point KKT systems: factorise once, solve many right-hand sides.

The Newton system of the (regularised) KKT conditions of

    minimize ½ xᵀQx + pᵀx   subject to   A x = b,   G x + s = h,   s ≥ 0

is, with W = diag(s/λ + δᵢ),

    (Q + ρI) dx + Aᵀ dν + Gᵀ dλ = b1
    A dx − δₑ dν               = b2
    G dx + ds − δᵢ dλ          = b3
    λ∘ds + s∘dλ                = b4

Eliminating ds and dλ leaves H dx + Aᵀ dν = rx, A dx − δₑ dν = re with the symmetric positive
definite H = Q + ρI + Gᵀ W⁻¹ G, and a Schur complement S = A H⁻¹ Aᵀ + δₑ I for the equalities.
Both are factorised by Cholesky. The primal and equality regularisations ρ and δₑ are removed
again by iterative refinement against the unregularised reduced system, so they perturb
neither the step nor the derivatives.

Where Q is diagonal and every row of G has at most one nonzero (bounds, z ≥ 0: ``diagonal_h``),
H is diagonal too: it is kept as its (B, n) diagonal, and its "factorisation" and solves are
elementwise, so that only the equality rows' Schur complement is factorised densely.

Under compilation, the Cholesky factors of order at most ``INVERTED_MAX_N`` (on CUDA, eager
too, ``CUDA_INVERTED_MAX_N``) are also inverted once (one triangular solve with the identity; on the
CPU's route of ``engine.lapack``, LAPACK's ``potf2`` and ``trti2`` in one operator call, which
factorises and inverts: ``_factor_inverted``), and every solve with them is a batched product with
the inverse (at these orders written elementwise, ``linalg.elementwise``, and fused with the
operations around it). Compiled, a triangular solve is a library call without a C entry point of its own
(on the CPU, a dispatch through the operator registry, copies into LAPACK's layout and a LAPACK
call per matrix of the batch), where a batched product is one direct call: at n = 10 each solve
costs its calls, not its arithmetic. The inverse of a triangular factor is computed as
accurately as a substitution (its residual |XL − I| is bounded by the unit roundoff times
|X||L|, and row or column scalings of L leave that bound unchanged), and the solves of the
interior point iterations and of the derivatives are refined against the unregularised system
as before.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from optlayers.engine import lapack
from optlayers.engine.constants import constant, made_once
from optlayers.host import host_read, reads_are_free
from optlayers.linalg import add_mtv, add_mv, add_product, add_product_, mtv, mv, product


INVERTED_MAX_N = 12
"""The largest order of a factor inverted under compilation (see the module docstring). Compiled,
float64, one thread, a Cholesky factorisation and five pairs of solves took, with the inverse
against triangular solves: batch 128, n = 10: 257 against 461 µs; n = 12: 282 against 487 µs;
n = 16: 900 against 601 µs (the batched product of order 16 is slower than of order 12); batch 1,
n = 10: 92 against 116 µs."""

CUDA_INVERTED_MAX_N = 128
"""On CUDA, factors of order up to this are inverted, eager or compiled. A GPU's batched
triangular solve of a small system is latency-bound where a batched product is not: on an H200
(``benchmarks/cuda_variants.py``, float64, batch 128, n = 100, compiled, forward + backward,
2026-12-04, 420e505) inverting took 18.0 ms against 28.4 with cuBLAS's batched triangular solves,
whose ~340 calls per forward had taken 9.7 of its 16.4 ms of device time
(``benchmarks/cuda_launches.py``), with the same iterations and solutions (5e-10 from the eager
solve's either way). The eager step, replayed from a CUDA graph (``engine.graphed.EAGER_GRAPHS``),
runs the same library kernels (its forward's device time was 21.1 ms, the same 9.7 of it in the
triangular solves), so it inverts too: not yet timed on a GPU (``cuda_variants.py``'s
``eager-graphs`` against ``eager-graphs-inverted``). Orders between 12 and 100 and above 100 were
not measured on a GPU. Accuracy does not stand in the way: the Maros–Meszaros set with every
factor inverted at every order (CPU, eager, tol 1e-7, one thread, 2026-12-04) solved the same 61
of 62 in 1,195 iterations against 1,168, five problems' counts changed (QBEACONF 21 → 42). 0
inverts only under compilation, up to ``INVERTED_MAX_N``."""

AUGMENT = 1.0
"""σ of the factorisation of H + σAᵀA in place of H (``factor_kkt``'s ``augment``), for the
scaled (equilibrated) problem, whose rows of A and whose H have entries of about one: large enough
that a direction held only by equality rows gets curvature far above H's rounding, small enough
to leave H's conditioning where it was. On the Maros–Meszaros set (tol 1e-8, one thread) the same
61 of 62 are solved in 968 iterations against 988 (QCAPRI 35 against 58), QFORPLAN failing either
way (its factorisations no longer fail: 200 steps against 115)."""

# Each failed Cholesky factorisation is retried with its regularisation multiplied by this.
_REG_GROWTH = 100.0
MAX_FACTOR_RETRIES = 4


@dataclass(frozen=True)
class KKTFactor:
    """Cholesky factors of the regularised reduced KKT system of a batch of B problems.

    Inequalities split into *soft* rows, folded into H, and *stiff* rows (s/λ small, i.e.
    active at the solution), kept beside the equalities as rows of C with their W on the
    diagonal: H stays well-conditioned however close the stiff rows are to active.

        H = Q + G_softᵀ W_soft⁻¹ G_soft              (B, n, n), ``chol_h`` factors H + ρI
        S = C (H + ρI)⁻¹ Cᵀ + diag(d0 + δₑ on eq.)   (B, r, r), factor ``chol_s``
        C = [A; G ⊙ stiff]  (r = m, or m + k when a stiff mask is given; non-stiff rows are
        zero with d0 = 1, so they decouple).

    Attributes:
        H: (B, n, n) the unregularised Q + G_softᵀ W_soft⁻¹ G_soft; (B, n), its diagonal, where H
            is diagonal (``diagonal``).
        G: (B, k, n). C: (B, r, n). d0: (B, r) unregularised diagonal block.
        Y: (B, n, r) L⁻¹ Cᵀ for the factor L of H + ρI, so that S = YᵀY + diag(…).
        w_inv: (B, k) W⁻¹ of every inequality; w_inv_soft: (B, k) the part folded into H.
        m: number of equality rows, the leading rows of C.
        ok: (B,) whether both factorisations succeeded with finite entries.
        chol_h: (B, n, n) the lower Cholesky factor of H + ρI; (B, n), its diagonal √(H + ρ), where
            H is diagonal.
        inv_h, inv_s: (B, n, n), (B, r, r) the inverses of ``chol_h`` and ``chol_s`` where they are
            inverted (under compilation, order at most ``INVERTED_MAX_N``); (B, 0, 0) elsewhere.
            Solves use the inverse where there is one.
        augment: (B, 1), ``AUGMENT``, where ``chol_h`` factors H + σAᵀA + ρI (``factor_kkt``'s
            ``augment``); (B, 0) where it factors H + ρI (a tensor, so that the factor's tensors
            carry it: ``qp.derivatives.factor_tensors``).
    """

    H: Tensor
    G: Tensor
    C: Tensor
    d0: Tensor
    Y: Tensor
    w_inv: Tensor
    w_inv_soft: Tensor
    chol_h: Tensor
    chol_s: Tensor
    ok: Tensor
    inv_h: Tensor
    inv_s: Tensor
    augment: Tensor
    m: int

    @property
    def diagonal(self) -> bool:
        """Whether H is diagonal and held as its diagonal (see ``diagonal_h``)."""
        return self.chol_h.dim() == 2


FACTOR_TENSORS = tuple(name for name in KKTFactor.__dataclass_fields__ if name != "m")
"""The names of ``KKTFactor``'s tensors, in its order."""


def _finite(t: Tensor) -> Tensor:
    """Elementwise: t is neither NaN nor ±inf (t − t is NaN exactly then); two kernels."""
    return (t - t) == 0


def cholesky(M: Tensor, check_finite: bool = True, active: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factor and whether it succeeded: LAPACK's report and, with ``check_finite``,
    whether the diagonal is finite (some GPU libraries let NaN through). ``active``: a (B,) mask
    of the matrices to factorise, for a batch that ``lapack.skips_inactive`` (the caller decides:
    ``factor_kkt``); the others' factor is the identity (succeeded).

    On the CPU the factor is taken as the transpose of the upper one, U = Lᵀ of M's upper
    triangle (M is symmetric): torch copies a row-major M's upper triangle into LAPACK's
    column-major layout faster than its lower one (B = 64, n = 100, float64, one thread: 1.5-1.6
    against 1.85-1.95 ms), and L = Uᵀ is then a row-major matrix, which the triangular solves
    read as fast. Mid-sized CPU factors are LAPACK's ``potf2`` from scipy where torch's MKL is
    slow (``lapack.used_for``), in the same layout."""
    if lapack.used_for(M):
        chol, info = lapack.factor_lower(M) if active is None else lapack.factor_lower(M, active)
    elif M.device.type == "cpu":
        chol, info = torch.linalg.cholesky_ex(M, upper=True)
        chol = chol.transpose(-2, -1)
    else:
        chol, info = torch.linalg.cholesky_ex(M)
    return chol, _factored(chol, info, check_finite)


def _factored(chol: Tensor, info: Tensor, check_finite: bool) -> Tensor:
    """Whether each factorisation succeeded: LAPACK's report ``info`` and, with ``check_finite``,
    whether the factor's diagonal is finite (see ``cholesky``)."""
    if not check_finite:
        return info == 0
    return (info == 0) & _finite(chol.diagonal(dim1=-2, dim2=-1).sum(-1))


def _factor_inverted(M: Tensor, check_finite: bool, empty: Tensor, active: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``cholesky`` of ``M``, whether it succeeded, and ``_inverse`` of its factor (``empty`` where it
    is not inverted); where the factor is inverted on the CPU's compiled route
    (``lapack.factors_inverted``), the factorisation and the inversion in one operator call."""
    if active is None and inverts(M.shape[-1], M.device) and lapack.factors_inverted(M):
        chol, inverse, info = lapack.factor_inverse_lower(M)
        return chol, _factored(chol, info, check_finite), inverse
    chol, ok = cholesky(M, check_finite, active)
    return chol, ok, _inverse(chol, empty)


def inverts(n: int, device: torch.device) -> bool:
    """Whether a factor of order ``n`` on ``device`` is inverted: on CUDA 0 < n ≤
    ``CUDA_INVERTED_MAX_N``, eager or compiled; elsewhere (and on CUDA too) under compilation 0 < n
    ≤ ``INVERTED_MAX_N``."""
    if n <= 0:
        return False
    if device.type == "cuda" and n <= CUDA_INVERTED_MAX_N:
        return True
    return n <= INVERTED_MAX_N and torch.compiler.is_compiling()


def _inverse(chol: Tensor, empty: Tensor) -> Tensor:
    """L⁻¹ for a (B, n, n) lower triangular factor L where it pays to invert it (``inverts``);
    elsewhere ``empty``, a (B, 0, 0) tensor."""
    n = chol.shape[-1]
    if not inverts(n, chol.device):
        return empty
    eye = torch.eye(n, dtype=chol.dtype, device=chol.device).expand(chol.shape)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


def _lower_solve(L: Tensor, inverse: Tensor, R: Tensor, transposed: bool = False) -> Tensor:
    """L⁻¹R (``transposed``: L⁻ᵀR) for a lower triangular (B, n, n) L, its ``inverse`` (B, n, n), or
    (B, 0, 0) where it has none, and (B, n, c) R: with the inverse, a batched product."""
    if inverse.shape[-1] == 0:
        if lapack.solves_with(L, R):
            return lapack.solve_lower(L, R, forward=not transposed, backward=transposed)
        return torch.linalg.solve_triangular(L.transpose(-2, -1) if transposed else L, R, upper=transposed)
    return product(inverse.transpose(-2, -1) if transposed else inverse, R)


def diagonal_h(Q: Tensor, G: Tensor) -> Tensor:
    """Whether every H = Q + Gᵀ W G of the batch is diagonal: Q is diagonal (``diagonal_q``) and no
    row of G has two nonzeros (``rows_touch_one_variable``); one 0-d bool tensor for the batch."""
    return diagonal_q(Q) & rows_touch_one_variable(G)


def diagonal_q(Q: Tensor) -> Tensor:
    """Whether every Q of the batch is diagonal, one 0-d bool tensor. Q's nonzeros off the diagonal
    are counted as all its nonzeros less its diagonal's: one pass over Q (NaN counts as nonzero),
    where masking the diagonal with a boolean identity took 6.8 times as long compiled (batch 8,
    n = 100, one thread, ``diagonal_h``: 564 against 83 µs)."""
    off_diagonal = (Q != 0).sum((-2, -1)) - (Q.diagonal(dim1=-2, dim2=-1) != 0).sum(-1)
    return (off_diagonal == 0).all()


def rows_touch_one_variable(G: Tensor) -> Tensor:
    """Whether no row of any G of the batch has two nonzeros (no two variables share a constraint),
    one 0-d bool tensor."""
    return ((G != 0).sum(-1) <= 1).all()


def factor_kkt(
    Q: Tensor, A: Tensor, G: Tensor, w_inv: Tensor, rho: Tensor, delta: Tensor, stiff: Tensor | None = None,
    unit_weights: bool = False, retries: int = MAX_FACTOR_RETRIES, diagonal: bool = False, check_finite: bool = True,
    overwrite_q: bool = False, augment: bool = False, active: Tensor | None = None,
) -> KKTFactor:
    """Factorise H and S for every problem of the batch.

    Args:
        Q, A, G: (B, n, n), (B, m, n), (B, k, n).
        w_inv: (B, k) positive diagonal of W⁻¹.
        rho, delta: (B,) primal and equality regularisation. Where a factorisation fails, both
            are raised (by ``_REG_GROWTH``, at most ``retries`` times) for that problem alone;
            problems that still fail are marked in ``ok``. Each retry costs the host a look at
            ``ok`` (a synchronisation); with ``retries=0`` there is none, and the caller retries.
        stiff: optional (B, k) mask of inequalities to keep out of H (see ``KKTFactor``).
        unit_weights: the caller promises w_inv == 1 and no stiff rows (the cone solver scales G
            itself), so that H = Q + GᵀG skips the (B, n, k) weighting.
        diagonal: the caller promises that H is diagonal (``diagonal_h(Q, G)``): H and its factor
            are kept as (B, n) diagonals.
        active: optional (B,) mask of the problems whose factors are read (the running ones of a
            compiled solve, whose batch keeps its finished problems). Where ``lapack.skips_inactive``,
            the others' H is Q (the product G_softᵀW⁻¹G_soft left out: ``lapack.add_product_where``)
            and their factor of H the identity; their factors are then meaningless but finite, and
            every factor that is read is the same bits as without the mask. Elsewhere ignored.
        check_finite: ``ok`` also requires finite factors (four kernels per factor). Without it a
            factor with NaN can be reported ok; a caller that tests its solutions' finiteness
            anyway (the QP's iteration) saves the kernels.
        overwrite_q: the caller hands Q over (a matrix it made for this factorisation and reads no
            more, as the cone step's H): H is accumulated into it in place instead of into a copy
            (the same values). Never for a Q the caller keeps, such as a program's own.
        augment: factorise H + σAᵀA (σ = ``AUGMENT``) in place of H, where there are equality rows
            and H is not diagonal: the same Newton system, whose first block row gains σAᵀ times the
            equality rows (``_solve_regularised`` adds σAᵀ rc to its right-hand side; refinement
            measures residuals against H itself), but an H that is positive definite wherever the
            KKT matrix is nonsingular: a direction without curvature in Q and without an
            inequality row, held only by equality rows, makes H singular but for ρ, and a
            factorisation of H + ρI then leaves refinement too little to work with.
    """
    m = A.shape[-2]
    # the mask is taken where H is a dense product of the step's own, factorised by potf2
    skipped = active if active is not None and not (diagonal or overwrite_q) and lapack.skips_inactive(Q) else None
    if unit_weights and stiff is not None:
        raise ValueError("factor_kkt: unit_weights=True needs stiff=None (stiff rows carry their own weights)")
    if stiff is None:
        d0 = _zeros(A.shape[:-1], A)
        C, w_inv_soft, eq_rows = A, w_inv, None
    else:
        C = torch.cat([A, G * stiff.unsqueeze(-1)], dim=-2)
        d0 = torch.cat([_zeros(A.shape[:-1], A), torch.where(stiff, 1.0 / w_inv, constant(1.0, w_inv))], dim=-1)
        w_inv_soft = w_inv.masked_fill(stiff, 0.0)
        eq_rows = _equality_rows(C.shape[-2], m, Q.dtype, Q.device)
    if diagonal:
        # a row of G has at most one nonzero, gₖ = (G1)ₖ (a sum of zeros and one term: exact), so
        # diag(GᵀW⁻¹G) = Gᵀ(W⁻¹g): two reading passes over G, where G∘G would write one more
        H = torch.diagonal(Q, dim1=-2, dim2=-1) + mtv(G, w_inv_soft * G.sum(-1))
    else:
        Gt = G.transpose(-2, -1)
        weighted = Gt if unit_weights else Gt * w_inv_soft.unsqueeze(-2)  # scaling Gᵀ's columns: the faster broadcast
        if overwrite_q:
            H = add_product_(Q, weighted, G)
        elif skipped is not None:
            H = lapack.add_product_where(Q, weighted, G, skipped)
        else:
            H = add_product(Q, weighted, G)
        H_diagonal = H.diagonal(dim1=-2, dim2=-1)
    rows = C.shape[-2]
    order = None if stiff is None else _coupled_rows(stiff, m)
    # under compilation every row of C stays (no host read counts the stiff ones): the operator
    # leaves the uncoupled (zero) rows out where it takes the factorisation
    coupled = None
    if stiff is not None and order is None and not diagonal and lapack.factors_coupled_rows(Q, C):
        coupled = torch.cat([torch.ones(stiff.shape[:-1] + (m,), dtype=torch.bool, device=stiff.device), stiff], dim=-1)
    augmented = augment and m > 0 and not diagonal
    # the matrix factorised: H + σAᵀA (a copy; H stays for refinement), or H, shifted by ρ and back
    H_factored = add_product(H, A.transpose(-2, -1), A, alpha=AUGMENT) if augmented else H
    if augmented:
        H_diagonal = H_factored.diagonal(dim1=-2, dim2=-1)

    def attempt(rho: Tensor, delta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        empty = (H.unsqueeze(-1) if diagonal else H)[:, :0, :0]
        shift_h = rho.unsqueeze(-1)
        if diagonal:
            chol_h, inv_h = (H + shift_h).sqrt(), empty
            ok = _finite(chol_h.sum(-1)) & (chol_h.amin(-1) > 0)
        else:
            H_diagonal.add_(shift_h)
            chol_h, ok, inv_h = _factor_inverted(H_factored, check_finite, empty, skipped)
        y, chol_s, inv_s = C.transpose(-2, -1), empty, empty  # empty: there is no Schur complement
        if rows:
            shift = delta.unsqueeze(-1) if eq_rows is None else torch.addcmul(d0, delta.unsqueeze(-1), eq_rows)
        if rows and coupled is not None:  # the coupled rows alone, in one operator (compiled, potf2's route)
            y, chol_s, info = lapack.coupled_schur(chol_h, C, coupled, shift)
            ok = ok & _factored(chol_s, info, check_finite)
        elif rows:
            kept = C if order is None else C.gather(-2, order.unsqueeze(-1).expand(-1, -1, C.shape[-1]))
            kept_t = kept.transpose(-2, -1)
            y = kept_t / chol_h.unsqueeze(-1) if diagonal else _lower_solve(chol_h, inv_h, kept_t)
            S = product(y.transpose(-2, -1), y)
            S.diagonal(dim1=-2, dim2=-1).add_(shift if order is None else shift.gather(-1, order))
            if order is None:
                chol_s, ok_s, inv_s = _factor_inverted(S, check_finite, empty)
            else:  # the eager solve: no inverse (``inverts``)
                chol_s, ok_s = cholesky(S, check_finite)
                y, chol_s = _expand_rows(y, chol_s, order, rows)
                inv_s = _inverse(chol_s, empty)
            ok = ok & ok_s
        if not diagonal:
            H_diagonal.sub_(shift_h)
        return chol_h, chol_s, y, ok, inv_h, inv_s

    chol_h, chol_s, y, ok, inv_h, inv_s = attempt(rho, delta)
    for _ in range(retries):
        if bool(ok.all()):
            break
        rho, delta = torch.where(ok, rho, rho * _REG_GROWTH), torch.where(ok, delta, delta * _REG_GROWTH)
        retry_h, retry_s, retry_y, retry_ok, retry_inv_h, retry_inv_s = attempt(rho, delta)
        new = (retry_ok & ~ok)[:, None, None]
        new_h = new[:, :, 0] if diagonal else new
        chol_h, chol_s, ok = torch.where(new_h, retry_h, chol_h), torch.where(new, retry_s, chol_s), ok | retry_ok
        y, inv_h, inv_s = torch.where(new, retry_y, y), torch.where(new, retry_inv_h, inv_h), torch.where(new, retry_inv_s, inv_s)
    # σ where augmented; else an empty view (no kernel; a constant here would be a graph constant, which
    # inductor's C++ wrapper leaves undeclared inside the compiled loop's body)
    sigma = A.new_full((A.shape[0], 1), AUGMENT) if augmented else w_inv[:, :0]
    return KKTFactor(H=H, G=G, C=C, d0=d0, Y=y, w_inv=w_inv, w_inv_soft=w_inv_soft, chol_h=chol_h, chol_s=chol_s,
                     ok=ok, inv_h=inv_h, inv_s=inv_s, augment=sigma, m=m)


def _zeros(shape: torch.Size, like: Tensor) -> Tensor:
    """Zeros of ``shape`` as one constant expanded, not a tensor filled at every call (the
    iterations factorise and solve at every step)."""
    return constant(0.0, like).expand(shape)


@made_once
def _equality_rows(rows: int, m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(rows,) 1 on the first ``m`` rows of C (the equalities), 0 on its stiff inequalities."""
    return (torch.arange(rows, device=device) < m).to(dtype)


# A host look that saves arithmetic (the early stop of refinement, the Schur complement over its
# coupled rows) is made only for factors of at least this many entries (B·n² + B·r²): below, the
# look's ten or so small kernels cost more than the arithmetic it saves (a refinement step is a
# pass over H and two over its factor).
_LOOK_MIN_ENTRIES = 100_000
# Where the host reads for free, S is factorised over its coupled rows only (the equalities and
# the stiff inequalities) when they are at most this fraction of its rows.
_COMPACT_S_FRACTION = 0.9


def _coupled_rows(stiff: Tensor, m: int) -> Tensor | None:
    """The rows of C that S couples, (B, r): the m equalities, then each problem's stiff rows in
    their order, padded with its first uncoupled ones (rows of C that are zero, with d0 = 1, so
    that S is the identity there); r = m + the largest stiff count of the batch (one host read).
    None (factorise all rows) where the host read is not free, under compilation, for S of fewer
    than ``_LOOK_MIN_ENTRIES`` entries, or where the coupled rows are more than
    ``_COMPACT_S_FRACTION`` of all."""
    k = stiff.shape[-1]
    if torch.compiler.is_compiling() or stiff.shape[0] * (m + k) ** 2 < _LOOK_MIN_ENTRIES or not reads_are_free(stiff.device):
        return None
    coupled = m + int(host_read(stiff.sum(-1).amax().reshape(1))[0])
    if coupled > _COMPACT_S_FRACTION * (m + k):
        return None
    inequalities = torch.argsort((~stiff).to(torch.uint8), dim=-1, stable=True)[:, : coupled - m] + m
    return torch.cat([torch.arange(m, device=stiff.device).expand(stiff.shape[0], -1), inequalities], dim=-1)


def _expand_rows(y: Tensor, chol: Tensor, order: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """Y (B, n, rows) and the factor of S (B, rows, rows) from those over the coupled rows ``order``
    (B, r) (see ``_coupled_rows``): zero columns of Y and identity rows of the factor elsewhere.
    The coupled rows keep their order, so the factor stays lower triangular."""
    B, r = order.shape
    full_y = y.new_zeros(B, y.shape[-2], rows).scatter_(-1, order.unsqueeze(-2).expand(-1, y.shape[-2], -1), y)
    full = torch.eye(rows, dtype=chol.dtype, device=chol.device).repeat(B, 1, 1)
    flat = (order.unsqueeze(-1) * rows + order.unsqueeze(-2)).reshape(B, r * r)
    full.view(B, rows * rows).scatter_(-1, flat, chol.reshape(B, r * r))
    return full_y, full


def next_regularisation(reg: Tensor, base: float, running: Tensor, factored: Tensor,
                        advanced: Tensor) -> tuple[Tensor, Tensor]:
    """The regularisation each problem's next factorisation gets, when the loop retries failed
    factorisations itself (``factor_kkt(..., retries=0)``) rather than behind a host look.

    A running problem whose factorisation failed retries in its next iteration with ``reg``
    multiplied by ``_REG_GROWTH``, at most ``MAX_FACTOR_RETRIES`` times in a row; after each
    step it took (``advanced``) a raised ``reg`` falls back by the same factor, down to ``base``.

    Returns whether the problem retries (B,) (it is a numerical failure where it failed and
    does not), and the new ``reg`` (B,)."""
    retry = running & (raisable(reg, base) > factored)  # running, failed, raisable
    return retry, regularisation_after(reg, base, retry, advanced)


def raise_limit(base: float) -> float:
    """The regularisation below which a failed factorisation may retry with more (``raisable``)."""
    return base * _REG_GROWTH ** MAX_FACTOR_RETRIES / 1.5


def raisable(reg: Tensor, base: float) -> Tensor:
    """(B,) whether a failed factorisation at ``reg`` may retry with more (``next_regularisation``)."""
    return reg < raise_limit(base)


def regularisation_after(reg: Tensor, base: float, retry: Tensor, advanced: Tensor) -> Tensor:
    """``next_regularisation``'s new ``reg``, given which problems retry and which took a step."""
    # a retry multiplies by _REG_GROWTH, a step divides by it (the two exclude each other: a step needs its factorisation)
    one, up, down = constant(1.0, reg), constant(_REG_GROWTH, reg), constant(1 / _REG_GROWTH, reg)
    return (reg * torch.where(retry, up, torch.where(advanced, down, one))).clamp_(min=base)


def _chol_solve(chol: Tensor, inverse: Tensor, r: Tensor) -> Tensor:
    """M⁻¹ r for M = LLᵀ, by two triangular solves or products with L's ``inverse`` (see
    ``_lower_solve``; on the CPU, ``torch.cholesky_solve`` copies the factor on every call and
    costs three times as much)."""
    R = r.unsqueeze(-1)
    if inverse.shape[-1] == 0 and lapack.solves_with(chol, R):
        return lapack.solve_lower(chol, R, forward=True, backward=True).squeeze(-1)
    return _lower_solve(chol, inverse, _lower_solve(chol, inverse, R), transposed=True).squeeze(-1)


def _l_solve(f: KKTFactor, r: Tensor, transposed: bool = False) -> Tensor:
    """L⁻¹ r (``transposed``: L⁻ᵀ r) for the factor L of H + ρI and (B, n) r."""
    if f.diagonal:
        return r / f.chol_h
    return _lower_solve(f.chol_h, f.inv_h, r.unsqueeze(-1), transposed).squeeze(-1)


def _h_solve(f: KKTFactor, r: Tensor) -> Tensor:
    """(H + ρI)⁻¹ r for (B, n) r."""
    if f.diagonal:
        return r / f.chol_h.square()
    return _chol_solve(f.chol_h, f.inv_h, r)


def _minus_mv(r: Tensor, M: Tensor, v: Tensor) -> Tensor:
    """r − M v for (B, r) r, (B, r, c) M and (B, c) v, in one kernel."""
    return add_mv(r, M, v, alpha=-1)


def _minus_mtv(r: Tensor, M: Tensor, v: Tensor) -> Tensor:
    """r − Mᵀ v for (B, c) r, (B, r, c) M and (B, r) v, in one kernel."""
    return add_mtv(r, M, v, alpha=-1)


def _solve_regularised(f: KKTFactor, rx: Tensor, rc: Tensor | None, use_y: bool) -> tuple[Tensor, Tensor]:
    """Solve H dx + Cᵀ ω = rx, C dx − (d0 + δₑ) ω = rc with the regularised factors (rc None: zero).
    With ``use_y``: through the stored Y = L⁻¹Cᵀ, four triangular solves instead of six. Where the
    factor is of H + σAᵀA (``KKTFactor.augment``), rx gains σAᵀ times the equality rows' rc (the
    first block row plus σAᵀ times the equality rows; their −δₑω is left to refinement)."""
    if f.augment.shape[-1] and rc is not None:
        equalities_only = f.C.shape[-2] == f.m
        rx = add_mtv(rx, f.C if equalities_only else f.C[:, : f.m], rc if equalities_only else rc[:, : f.m], alpha=AUGMENT)
    if use_y:
        t = _l_solve(f, rx)
        if f.C.shape[-2]:
            # ω = S⁻¹(Yᵀt − rc), dx = L⁻ᵀ(t − Y ω)
            Yt = mtv(f.Y, t) if rc is None else add_mtv(rc, f.Y, t, beta=-1)
            omega = _chol_solve(f.chol_s, f.inv_s, Yt)
            t = _minus_mv(t, f.Y, omega)
        else:
            omega = rx[..., :0] if rc is None else rc  # (B, 0): no rows, nothing to solve
        return _l_solve(f, t, transposed=True), omega
    t = _h_solve(f, rx)
    if f.C.shape[-2] == 0:
        return t, rx[..., :0] if rc is None else rc
    Ct = mv(f.C, t) if rc is None else add_mv(rc, f.C, t, beta=-1)
    omega = _chol_solve(f.chol_s, f.inv_s, Ct)
    return _h_solve(f, _minus_mtv(rx, f.C, omega)), omega


def _extended_residual(f: KKTFactor, rx: Tensor, rc: Tensor | None, dx: Tensor, omega: Tensor) -> tuple[Tensor, Tensor]:
    """Residual of the unregularised extended system, rx − (H dx + Cᵀ ω) and rc − (C dx − d0 ω)."""
    ex = rx - f.H * dx if f.diagonal else _minus_mv(rx, f.H, dx)
    if f.C.shape[-2] == 0:
        return ex, omega
    if f.C.shape[-2] == f.m and rc is not None:  # no stiff rows: d0 = 0
        d0_omega = rc
    else:
        d0_omega = f.d0 * omega if rc is None else torch.addcmul(rc, f.d0, omega)
    return _minus_mtv(ex, f.C, omega), _minus_mv(d0_omega, f.C, dx)


# Iterative refinement stops early (where ``adaptive_refinement``) once the residual of every
# equation is within this many units of roundoff of the equation's terms: a componentwise backward
# error at the level of the arithmetic, below which further steps only move the solution by the
# rounding of the residual itself (LAPACK's ``xPORFS`` stops at one unit).
_REFINED_ROUNDOFFS = 1.0


def adaptive_refinement(f: KKTFactor) -> bool:
    """Whether ``solve_reduced`` stops refining with ``f`` once the residual is negligible (see
    ``_REFINED_ROUNDOFFS``) in every problem, a problem whose residual is negligible keeping its
    solution in the steps that the others take: where reading a flag on the host is free (``host.reads_are_free``),
    the solve is not being traced for compilation and the factor is large enough
    (``_LOOK_MIN_ENTRIES``). Elsewhere it takes every step it is given, with no host
    synchronisation."""
    return (not torch.compiler.is_compiling() and f.chol_h.numel() + f.chol_s.numel() >= _LOOK_MIN_ENTRIES
            and reads_are_free(f.chol_h.device))


def _root_diagonal(f: KKTFactor) -> Tensor | None:
    """√hᵢ for the diagonal h of H (None where H is diagonal): for positive semidefinite H,
    |Hᵢⱼ| ≤ √(hᵢhⱼ), so that |H||dx| ≤ √h (√hᵀ|dx|), a bound that costs no pass over H."""
    return None if f.diagonal else f.H.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()


def _negligible(f: KKTFactor, root: Tensor | None, rx: Tensor, rc: Tensor | None, dx: Tensor, omega: Tensor,
                ex: Tensor, eo: Tensor) -> Tensor:
    """(B,) bool: whether the residuals (ex, eo) of the extended system at (dx, ω) are negligible in
    every equation of each problem: |ex| ≤ ``_REFINED_ROUNDOFFS``·ε·(|rx| + |H||dx| + |Cᵀ||ω|) and
    |eo| ≤ ``_REFINED_ROUNDOFFS``·ε·(|rc| + |C||dx| + |d0 ω|), with |H||dx| bounded as in
    ``_root_diagonal`` (``root``)."""
    tol = _REFINED_ROUNDOFFS * torch.finfo(dx.dtype).eps
    abs_dx = dx.abs()
    h_dx = (f.H * dx).abs() if root is None else root * (root * abs_dx).sum(-1, keepdim=True)
    terms_x = h_dx + rx.abs()
    checks = []
    if f.C.shape[-2]:
        abs_c = f.C.abs()
        terms_x = terms_x + mtv(abs_c, omega.abs())
        terms_c = mv(abs_c, abs_dx) + (f.d0 * omega).abs()
        checks.append(eo.abs() <= tol * (terms_c if rc is None else terms_c + rc.abs()))
    return torch.cat([ex.abs() <= tol * terms_x, *checks], dim=-1).all(-1)


def refines_on_device(f: KKTFactor, refine_steps: int) -> bool:
    """Whether ``solve_reduced`` takes the refinement steps after its first one only for the
    problems whose residual after that one is not negligible, and computes them only where there
    is such a problem, decided on the device (``torch.cond``): where the solve is being traced for
    compilation, more than one step is asked for and the factor is on the CPU, whose compiled code
    reads the flag where it is (on an accelerator the condition would be a synchronisation, and no
    CUDA graph could hold it). One step removes the regularisation from
    the solves of a well-conditioned system to the level of roundoff (the residual of the
    regularised solve is about ρ|dx|, and one step leaves about ρ² of it), so the others are mostly
    skipped. One condition after the first step, not one before each: with one before each, a
    compiled forward + backward at (1, 100) took 1.12-1.28 of the time of every step taken; with
    this one, 0.96-0.98, and 0.84-1.00 at (128, 100) and (64, 100) (two threads; docs/qp.md)."""
    return refine_steps > 1 and torch.compiler.is_compiling() and f.chol_h.device.type == "cpu"


_REFINEMENT_READS = ("H", "C", "d0", "Y", "chol_h", "chol_s", "inv_h", "inv_s", "augment")
"""The tensors of a ``KKTFactor`` that a refinement step reads (``_extended_residual``, ``_solve_regularised``)."""


def _corrected(f: KKTFactor, dx: Tensor, omega: Tensor, ex: Tensor, eo: Tensor, use_y: bool) -> tuple[Tensor, Tensor]:
    """(dx, ω) plus the regularised solve of the residual (ex, eo): one refinement step."""
    cx, co = _solve_regularised(f, ex, eo, use_y)
    return dx + cx, (omega + co if omega.shape[-1] else omega)


def _refined_on_device(f: KKTFactor, rx: Tensor, rc: Tensor | None, dx: Tensor, omega: Tensor, refine_steps: int,
                       use_y: bool) -> tuple[Tensor, Tensor]:
    """``refine_steps`` refinement steps of (dx, ω) (see ``refines_on_device``): the first, then the
    others for the problems whose residual after the first is not negligible (``_negligible``), in
    the branch of a ``torch.cond`` taken only where there is one. Which steps a problem takes
    depends on its own residual alone: a batch, its slices and its chunks give it the same answer
    to the bit.

    A branch may read no two tensors that share memory (``torch.cond`` refuses them), and the factor's
    tensors do (C is A where there are no stiff rows, the empty ones are views of one tensor): the
    branch reads the factor's nonempty tensors, each once, as operands of its own, and makes its
    empty ones afresh."""
    dx, omega = _corrected(f, dx, omega, *_extended_residual(f, rx, rc, dx, omega), use_y)
    ex, eo = _extended_residual(f, rx, rc, dx, omega)
    negligible = _negligible(f, _root_diagonal(f), rx, rc, dx, omega, ex, eo)
    fields = [name for name in _REFINEMENT_READS if getattr(f, name).numel()]
    held: list[Tensor] = []  # each tensor once (one may be two fields); by identity, which tracing decides without a guard on ids
    where = []
    for name in fields:
        tensor = getattr(f, name)
        index = next((i for i, t in enumerate(held) if t is tensor), len(held))
        if index == len(held):
            held.append(tensor)
        where.append(index)
    empty = {name: (tuple(getattr(f, name).shape), getattr(f, name).dtype) for name in _REFINEMENT_READS if name not in fields}
    unread = {name: getattr(f, name) for name in FACTOR_TENSORS if name not in _REFINEMENT_READS}
    rows = omega.shape[-1] > 0  # without rows of C, ω (B, 0), and eo with it, is no branch's operand or output
    rc_given = rc is not None and rc.numel() > 0  # an empty rc is made afresh in the branch too
    rc_shape = None if rc is None else tuple(rc.shape)
    given = (negligible, dx, ex, rx, *((omega, eo) if rows else ()), *((rc,) if rc_given else ()))

    def rest(*operands: Tensor) -> tuple[Tensor, ...]:
        negligible, dx, ex, rx, *more = operands[: len(given)]
        tensors = [t.view(t.shape) for t in operands[len(given):]]  # views made here: their .mT too (else traced outside)
        g = KKTFactor(**{name: tensors[index] for name, index in zip(fields, where)},
                      **{name: torch.empty(shape, dtype=dtype, device=dx.device) for name, (shape, dtype) in empty.items()},
                      **unread, m=f.m)
        omega, eo = (more[0], more[1]) if rows else (dx.new_empty(dx.shape[0], 0),) * 2
        rc = more[-1] if rc_given else None if rc_shape is None else dx.new_empty(rc_shape)
        refined = dx, omega
        for step in range(refine_steps - 1):  # the first from the residual (ex, eo) already at hand
            refined = _corrected(g, *refined, *((ex, eo) if step == 0 else _extended_residual(g, rx, rc, *refined)), use_y)
        out = tuple(torch.where(negligible.unsqueeze(-1), first, later) for first, later in zip((dx, omega), refined))
        return out if rows else out[:1]

    def kept(*operands: Tensor) -> tuple[Tensor, ...]:
        return (operands[1].clone(), operands[4].clone()) if rows else (operands[1].clone(),)

    out = torch.cond(negligible.all(), kept, rest, (*given, *held))
    return (out[0], out[1]) if rows else (out[0], omega)


def solve_reduced(f: KKTFactor, rx: Tensor, re: Tensor | None, v: Tensor | None,
                  refine_steps: int, use_y: bool = False, negated_rx: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Solve Q dx + Aᵀ dν + Gᵀ dλ = rx, A dx = re, G dx − W dλ = −v, refining away ρ and δₑ.

    Soft rows are eliminated, dλ = W⁻¹(G dx + v); stiff rows stay in the Schur complement, so
    that dλ is never a vanishing G dx + v multiplied by a huge W⁻¹.

    Args:
        rx: (B, n); re: (B, m) or None (zero); v: (B, k) or None (zero). A zero block given as
            None costs no arithmetic (the derivatives' right-hand sides often have them).
        refine_steps: iterative refinement steps against the unregularised system, at most: where
            ``adaptive_refinement``, a problem stops once its residual is at the level of roundoff
            (and the steps once every problem's is); where
            ``refines_on_device``, those after the first are taken only for the problems whose
            residual after the first is not at that level.
        use_y: solve through the factor's Y = L⁻¹Cᵀ (four triangular solves per solve instead
            of six; the same answer up to rounding). The derivatives use it; the interior point
            iterations do not (their rounding decides some Maros–Meszaros problems).
        negated_rx: ``rx`` is given as −rx (the Newton step's −r_d): the negation is folded into
            the first product with G (the same values; one kernel fewer where v is given).
    Returns:
        dx (B, n), dν (B, m), dλ (B, k).
    """
    stiff_rows = f.C.shape[-2] > f.m
    if v is not None:
        rx = add_mtv(rx, f.G, f.w_inv_soft * v, beta=-1 if negated_rx else 1, alpha=-1)  # (−)rx − Gᵀ(W⁻¹v)
    elif negated_rx:
        rx = rx.neg()
    rc = re
    if stiff_rows and v is not None:
        re = _zeros(rx.shape[:-1] + (f.m,), rx) if re is None else re
        rc = torch.cat([re, v.neg().masked_fill(f.w_inv_soft > 0, 0.0)], dim=-1)
    elif stiff_rows and re is not None:
        rc = torch.cat([re, _zeros(re.shape[:-1] + (f.C.shape[-2] - f.m,), re)], dim=-1)
    dx, omega = _solve_regularised(f, rx, rc, use_y)
    adaptive = refine_steps > 0 and adaptive_refinement(f)
    root = _root_diagonal(f) if adaptive else None
    if refines_on_device(f, refine_steps):
        dx, omega = _refined_on_device(f, rx, rc, dx, omega, refine_steps, use_y)
        refine_steps = 0
    for _ in range(refine_steps):
        residual = _extended_residual(f, rx, rc, dx, omega)
        negligible = _negligible(f, root, rx, rc, dx, omega, *residual) if adaptive else None
        if negligible is not None and bool(host_read(negligible.all().reshape(1))[0]):
            break
        stepped = _corrected(f, dx, omega, *residual, use_y)
        if negligible is None:
            dx, omega = stepped
        else:  # a problem whose residual is at roundoff keeps its solution: its steps are its own
            dx, omega = (torch.where(negligible.unsqueeze(-1), kept, new) for kept, new in zip((dx, omega), stepped))
    dlam = mv(f.G, dx) if v is None else add_mv(v, f.G, dx)
    dlam = f.w_inv_soft * dlam
    # ω's parts as views only where they are parts: a slice over all of ω is an alias, for which
    # torch's batched gradients (``is_grads_batched``, ``jacobian(vectorize=True)``) have no rule
    if stiff_rows:
        dlam = torch.where(f.w_inv_soft > 0, dlam, omega[:, f.m :] if f.m else omega)
    return dx, omega[:, : f.m] if f.m < omega.shape[-1] else omega, dlam
