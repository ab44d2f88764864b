"""Batched primal-dual interior point method for cone programs (Mehrotra predictor-corrector).

    minimize c^T x + 1/2 x^T P x   subject to   A x + s = b,  s in K

with K of zero, nonnegative, second-order, PSD and exponential cones (spec.py). Zero-cone rows
are equality constraints; the others are eliminated through a per-cone scaling: Nesterov–Todd
for the symmetric cones (symmetric.py), the dual barrier's Hessian for the exponential cones
(exponential.py, whose dual cones are first mapped to primal ones). The reduced system is the
QP solver's (qp/kkt.py) with the scaled cone rows V A as its inequality rows.

The method starts from x = 0 and the cones' central points without a feasibility phase and
has no infeasibility certificates: an element that does not converge within ``max_iter`` is
reported MAX_ITER (NUMERICAL_ERROR if its linear algebra broke down), so that the caller can
hand it to Clarabel. Converged elements stop and leave the working batch.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from optlayers import threads
from optlayers.cone import exp as exp_module
from optlayers.cone import nonneg, psd, soc
from optlayers.cone.interior import exponential, symmetric
from optlayers.cone.spec import ConeSpec
from optlayers.cone.status import ConeStatus
from optlayers.linalg import mtv, mv
from optlayers.qp.kkt import factor_kkt, solve_reduced


# A CPU slice should hold at least this many matrix entries (batch x (m + n) x n), as in the QP solver.
_MIN_SLICE_ENTRIES = 300_000


@dataclasses.dataclass(frozen=True)
class IPMSettings:
    """Hyperparameters (immutable).

    Attributes:
        tol: relative primal, dual and gap residual at which an element stops (the Newton
            refinement after the solver takes it to round-off).
        inaccurate_tol: an element that stalls (on an exponential cone the membership test
            loses its digits near the boundary) or runs out of iterations with a residual below
            this is returned INACCURATE, for the refinement to finish; above, it is a failure.
        max_iter: iteration limit.
        step_fraction: fraction of the step to the cone boundary that is taken.
        backtrack: factor by which a step that leaves an exponential cone is shortened.
        max_backtracks: steps tried (1, backtrack, backtrack^2, ...; all at once) before an
            element is declared a numerical failure.
        reg: regularisation of the reduced system; ``refine_steps`` of iterative refinement remove
            it (none by default: at 1e-10 it moves the steps far less than the tolerance).
    """

    tol: float = 1e-6
    inaccurate_tol: float = 1e-5
    max_iter: int = 60
    step_fraction: float = 0.99
    backtrack: float = 0.8
    max_backtracks: int = 40
    reg: float = 1e-10
    refine_steps: int = 0


@dataclasses.dataclass(frozen=True)
class _Part:
    """``count`` cones of one kind, ``size`` rows each, at ``start`` among the cone (non-zero) rows."""

    kind: str
    start: int
    count: int
    size: int
    degree: int

    @property
    def stop(self) -> int:
        return self.start + self.count * self.size


def _parts(spec: ConeSpec) -> list[_Part]:
    parts = []
    for block in spec.blocks():
        if block.module is nonneg:
            kind, degree = "nonneg", 1
        elif block.module is soc:
            kind, degree = "soc", 1
        elif block.module is psd:
            kind, degree = "psd", psd.order(block.size)
        elif block.module is exp_module:
            kind, degree = "exp", exponential.DEGREE
        else:
            continue
        parts.append(_Part(kind, block.start - spec.zero, block.count, block.size, degree))
    return parts


def _piece(v: torch.Tensor, part: _Part) -> torch.Tensor:
    """The rows of ``part`` of v (B, m_K, ...) as (B, count, size, ...)."""
    return v[:, part.start:part.stop].reshape(v.shape[0], part.count, part.size, *v.shape[2:])


def _join(pieces: list[torch.Tensor], batch: int) -> torch.Tensor:
    return torch.cat([p.reshape(batch, -1, *p.shape[3:]) for p in pieces], 1)


def _central_point(parts: list[_Part], batch: int, like: torch.Tensor) -> torch.Tensor:
    pieces = []
    for part in parts:
        shape = (batch, part.count, part.size)
        if part.kind == "exp":
            piece = like.new_tensor(exponential.CENTRAL_POINT).expand(shape)
        else:
            algebra = {"nonneg": symmetric.NONNEG, "soc": symmetric.SOC, "psd": symmetric.PSD}[part.kind]
            piece = algebra.unit(like.new_zeros(shape))
        pieces.append(piece)
    return _join(pieces, batch) if pieces else like.new_zeros(batch, 0)


def _scaling(part: _Part, s: torch.Tensor, y: torch.Tensor, mu: torch.Tensor):
    if part.kind == "nonneg":
        return symmetric.nonneg_scaling(s, y)
    if part.kind == "soc":
        return symmetric.soc_scaling(s, y)
    if part.kind == "psd":
        return symmetric.psd_scaling(s, y)
    return exponential.exp_scaling(s, y, mu)


def _times(M: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """M (B, count, k, k) @ X (B, count, k, c); for k = 1 a broadcast product (far cheaper than
    B * count one-by-one matrix products)."""
    return M * X if M.shape[-1] == 1 else M @ X


def _apply_blocks(mats: list[torch.Tensor], v: torch.Tensor, parts: list[_Part], transpose: bool) -> torch.Tensor:
    """Block-diagonal (B, m_K, m_K) matrix (one (B, count, k, k) tensor per part) times v (B, m_K)."""
    pieces = [_times(M.mT if transpose else M, _piece(v, part).unsqueeze(-1)).squeeze(-1) for M, part in zip(mats, parts)]
    return _join(pieces, v.shape[0])


@dataclasses.dataclass(frozen=True)
class _Problem:
    """The data of the working batch: equality rows (A_z, b_z), cone rows (A_k, b_k), c, P (B, n, n)."""

    A_z: torch.Tensor
    b_z: torch.Tensor
    A_k: torch.Tensor
    b_k: torch.Tensor
    c: torch.Tensor
    P: torch.Tensor

    def take(self, index: torch.Tensor) -> _Problem:
        return _Problem(*(t[index] for t in dataclasses.astuple(self)))


@dataclasses.dataclass(frozen=True)
class _Iterate:
    x: torch.Tensor
    nu: torch.Tensor
    s: torch.Tensor
    y: torch.Tensor

    def take(self, index: torch.Tensor) -> _Iterate:
        return _Iterate(*(t[index] for t in dataclasses.astuple(self)))


def _inf_norm(v: torch.Tensor) -> torch.Tensor:
    return v.abs().amax(-1) if v.shape[-1] else v.new_zeros(v.shape[0])


def _residuals(prob: _Problem, it: _Iterate) -> tuple[torch.Tensor, ...]:
    """r_d = P x + A^T y + c, r_z = A_z x - b_z, r_p = A_k x + s - b_k and the relative error (B,)."""
    px = mv(prob.P, it.x)
    aty = mtv(prob.A_z, it.nu) + mtv(prob.A_k, it.y)
    ax_z, ax_k = mv(prob.A_z, it.x), mv(prob.A_k, it.x)
    r_d, r_z, r_p = px + aty + prob.c, ax_z - prob.b_z, ax_k + it.s - prob.b_k
    primal = torch.maximum(_inf_norm(r_z), _inf_norm(r_p)) / (
        1 + torch.stack([_inf_norm(prob.b_z), _inf_norm(prob.b_k), _inf_norm(ax_z), _inf_norm(ax_k), _inf_norm(it.s)]).amax(0))
    dual = _inf_norm(r_d) / (1 + torch.stack([_inf_norm(prob.c), _inf_norm(aty), _inf_norm(px)]).amax(0))
    cx, by = (prob.c * it.x).sum(-1), (prob.b_z * it.nu).sum(-1) + (prob.b_k * it.y).sum(-1)
    gap = (it.s * it.y).sum(-1) / (1 + torch.maximum((cx + (it.x * px).sum(-1)).abs(), by.abs()))
    return r_d, r_z, r_p, torch.stack([primal, dual, gap.abs()]).amax(0)


def _exp_rows(v: torch.Tensor, parts: list[_Part]) -> torch.Tensor:
    """The exponential cones' rows of v (..., m_K) as (..., cones, 3)."""
    pieces = [v[..., part.start:part.stop].reshape(*v.shape[:-1], part.count, 3) for part in parts if part.kind == "exp"]
    return torch.cat(pieces, -2)


def _exp_step(parts: list[_Part], s: torch.Tensor, y: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor,
              alpha: torch.Tensor, settings: IPMSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest of alpha * backtrack^k (k < max_backtracks) keeping every exponential cone's
    s and y strictly inside, all k tried at once (the feasible steps along a ray form an
    interval); and whether one was found (B,)."""
    factors = settings.backtrack ** torch.arange(settings.max_backtracks, dtype=s.dtype, device=s.device)
    trials = (alpha.unsqueeze(0) * factors.unsqueeze(-1))[..., None, None]  # (K, B, 1, 1)
    s_e, y_e, ds_e, dy_e = (_exp_rows(t, parts) for t in (s, y, ds, dy))
    inside = (exponential.in_primal(s_e + trials * ds_e) & exponential.in_dual(y_e + trials * dy_e)).all(-1)
    found = inside.any(0)
    first = inside.to(torch.int8).argmax(0)
    step = alpha * factors[first]
    return torch.where(found, step, torch.zeros_like(step)), found


def _newton_step(prob: _Problem, it: _Iterate, residuals: tuple[torch.Tensor, ...], parts: list[_Part], degree: int,
                 settings: IPMSettings) -> tuple[_Iterate, torch.Tensor]:
    """One predictor-corrector step from ``it`` with its residuals (r_d, r_z, r_p); returns the
    new iterate and whether its linear algebra held (B,)."""
    batch = it.x.shape[0]
    r_d, r_z, r_p = residuals
    mu = (it.s * it.y).sum(-1) / degree
    scalings = [_scaling(part, _piece(it.s, part), _piece(it.y, part), mu.unsqueeze(-1).expand(batch, part.count))
                for part in parts]
    V = [sc.V for sc in scalings]
    G = _join([_times(v, _piece(prob.A_k, part)) for v, part in zip(V, parts)], batch)
    reg = torch.full((batch,), settings.reg, dtype=it.x.dtype, device=it.x.device)
    factor = factor_kkt(prob.P, prob.A_z, G, torch.ones_like(it.s), reg, reg, unit_weights=True)

    def direction(rhs: Callable) -> tuple[torch.Tensor, ...]:
        q = _join([rhs(sc, part) for sc, part in zip(scalings, parts)], batch)
        v = _apply_blocks(V, r_p + q, parts, transpose=False)
        dx, dnu, dlam = solve_reduced(factor, -r_d, -r_z, v, settings.refine_steps)
        dy = _apply_blocks(V, dlam, parts, transpose=True)
        return dx, dnu, -r_p - mv(prob.A_k, dx), dy

    def step_length(ds: torch.Tensor, dy: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """fraction of the step to the boundary of the symmetric cones (at most 1), shortened
        until s, y are inside the exponential cones; and whether that succeeded (B,)."""
        step = torch.ones(batch, dtype=it.x.dtype, device=it.x.device) / fraction
        for sc, part in zip(scalings, parts):
            pieces = (_piece(t, part) for t in (it.s, it.y, ds, dy))
            step = torch.minimum(step, sc.max_step(*pieces).amin(-1))
        alpha = (fraction * step).clamp(max=1)
        if not has_exp:
            return alpha, torch.ones_like(alpha, dtype=torch.bool)
        return _exp_step(parts, it.s, it.y, ds, dy, alpha, settings)

    has_exp = any(part.kind == "exp" for part in parts)
    affine = direction(lambda sc, part: sc.affine_rhs(_piece(it.s, part)))
    alpha, _ = step_length(affine[2], affine[3], 1.0)
    sigma = (1 - alpha) ** 3
    sigma_mu = (sigma * mu)[:, None, None]
    dx, dnu, ds, dy = direction(lambda sc, part: sc.combined_rhs(
        sigma_mu, _piece(affine[2], part), _piece(affine[3], part), _piece(it.s, part), _piece(it.y, part)))
    finite = factor.ok & torch.stack([t.isfinite().all(-1) for t in (dx, ds, dy)]).all(0)
    if dnu.shape[-1]:
        finite = finite & dnu.isfinite().all(-1)
    dx, dnu, ds, dy = (torch.where(finite.unsqueeze(-1), t, torch.zeros_like(t)) for t in (dx, dnu, ds, dy))
    alpha, inside = step_length(ds, dy, settings.step_fraction)
    finite = finite & inside
    a = alpha.unsqueeze(-1)
    return _Iterate(it.x + a * dx, it.nu + a * dnu, it.s + a * ds, it.y + a * dy), finite


def solve(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, spec: ConeSpec,
          settings: IPMSettings = IPMSettings()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve a batch: A (B, m, n), b (B, m), c (B, n), P (B, n, n) or None, all float64.

    Returns x (B, n), y (B, m), s (B, m) and status (B,) int64 (ConeStatus: SOLVED, INACCURATE,
    MAX_ITER or NUMERICAL_ERROR); every element holds its last iterate. A large CPU batch is
    solved in slices on parallel threads (threads.py), with the same result.
    """
    batch, m, n = A.shape
    count = threads.slice_count(batch, (m + n) * n, A.device, _MIN_SLICE_ENTRIES)
    parts = threads.map_slices(
        lambda part: _solve(A[part], b[part], c[part], None if P is None else P[part], spec, settings), batch, count)
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


def _solve(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, spec: ConeSpec,
           settings: IPMSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, m, n = A.shape
    z = spec.zero
    parts = _parts(spec)
    degree = max(sum(part.count * part.degree for part in parts), 1)
    T = _dual_exp_map(spec, A)
    A_k, b_k = A[:, z:], b[:, z:]
    if T is not None:
        A_k, b_k = T @ A_k, mv(T, b_k)
    P = A.new_zeros(batch, n, n) if P is None else P.expand(batch, n, n)
    prob = _Problem(A[:, :z], b[:, :z], A_k, b_k, c, P)
    start = _central_point(parts, batch, A)
    it = _Iterate(A.new_zeros(batch, n), A.new_zeros(batch, z), start, start.clone())
    result = it
    status = torch.full((batch,), int(ConeStatus.MAX_ITER), dtype=torch.int64, device=A.device)
    working = torch.arange(batch, device=A.device)
    for iteration in range(settings.max_iter + 1):
        *residuals, error = _residuals(prob, it)
        done = error <= settings.tol
        result = _put(result, working, it)
        status[working[done]] = int(ConeStatus.SOLVED)
        close = working[~done & (error <= settings.inaccurate_tol)]
        if iteration == settings.max_iter:
            status[close] = int(ConeStatus.INACCURATE)
            break
        it, ok = _newton_step(prob, it, residuals, parts, degree, settings)
        failed = ~ok & ~done
        status[working[failed]] = torch.where(error[failed] <= settings.inaccurate_tol, int(ConeStatus.INACCURATE),
                                              int(ConeStatus.NUMERICAL_ERROR))
        keep = ~done & ok
        if not bool(keep.all()):
            working, prob, it = working[keep], prob.take(keep), it.take(keep)
        if working.numel() == 0:
            break
    y_k, s_k = result.y, result.s
    if T is not None:
        y_k, s_k = mtv(T, y_k), torch.linalg.solve(T, s_k.unsqueeze(-1)).squeeze(-1)
    return result.x, torch.cat([result.nu, y_k], -1), torch.cat([torch.zeros_like(result.nu), s_k], -1), status


def _put(result: _Iterate, index: torch.Tensor, it: _Iterate) -> _Iterate:
    out = []
    for whole, part in zip(dataclasses.astuple(result), dataclasses.astuple(it)):
        whole = whole.clone()
        whole[index] = part
        out.append(whole)
    return _Iterate(*out)


def _dual_exp_map(spec: ConeSpec, like: torch.Tensor) -> torch.Tensor | None:
    """The (m_K, m_K) row map T with s in K_exp^* iff T s in K_exp on the dual-exponential rows (None if none)."""
    if not spec.exp_dual:
        return None
    m_k = spec.size - spec.zero
    T = torch.eye(m_k, dtype=like.dtype, device=like.device)
    block = like.new_tensor(exponential.DUAL_TO_PRIMAL)
    first = m_k - 3 * spec.exp_dual
    for k in range(spec.exp_dual):
        rows = slice(first + 3 * k, first + 3 * k + 3)
        T[rows, rows] = block
    return T
