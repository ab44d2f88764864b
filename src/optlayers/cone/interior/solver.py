"""Batched primal-dual interior point method for cone programs (Mehrotra predictor-corrector).

    minimize c^T x + 1/2 x^T P x   subject to   A x + s = b,  s in K

with K of zero, nonnegative, second-order, PSD and exponential cones (spec.py). Zero-cone rows
are equality constraints; the others are eliminated through a per-cone scaling: Nesterov–Todd
for the symmetric cones (symmetric.py), a primal-dual scaling (Dahl–Andersen) with a
third-order correction for the exponential cones (exponential.py, whose dual cones are first
mapped to primal ones). The reduced matrix P + (V A)^T (V A) of the scaled cone rows V A is
factorised, with the equality rows' Schur complement, by the QP solver's qp/kkt.py.

The method starts from x = 0 and the cones' central points without a feasibility phase and
has no infeasibility certificates: an element that does not converge within ``max_iter`` is
reported MAX_ITER (NUMERICAL_ERROR if its linear algebra broke down), so that the caller can
hand it to Clarabel. The iterations run on the engine's loop (engine/loop.py): converged
elements are frozen, and leave the working batch when the host looks (host.py); the
iterations themselves make no host synchronisation.
"""
from __future__ import annotations

import dataclasses

import torch

from optlayers import threads
from optlayers.cone import exp as exp_module
from optlayers.cone import nonneg, psd, soc
from optlayers.cone.interior import exponential, symmetric
from optlayers.cone.spec import ConeSpec
from optlayers.cone.status import ConeStatus
from optlayers.engine import loop
from optlayers.host import RUNNING, reads_are_free
from optlayers.linalg import mtv, mv
from optlayers.qp.kkt import factor_kkt, next_regularisation, solve_reduced


# A CPU batch is cut into slices on parallel threads only above this many matrix entries
# (batch x (m + n) x n). The iteration makes ~1,000 small torch operations (at this size mostly per-element
# library calls and dispatch): on two
# cores, m = 96, n = 48, two slices of 64 ran 15 % slower than one batch of 128 (the threads
# queue on the GIL), two slices of 256 ran 15-20 % faster than one batch of 512.
_MIN_SLICE_ENTRIES = 1_500_000
# The exponential cones' step search first tries _EXP_FINE_FACTOR^k (k < _EXP_FINE_TRIALS) of the
# symmetric cones' step, then backtrack^k: near the solution the full step often ends just outside
# an exponential cone, and 0.8 of the step there (the first backtrack) made the last iterations
# converge only linearly (the residual / 5 per iteration); with 1, 0.97, 0.94, 0.91 first, the
# elements of the cone benchmark (m = 96, n = 48, B = 128) finish 1-2 iterations earlier (with
# the primal-dual scaling too: batches of 200 random three-cone programs took 13-15 iterations
# with the fine trials, 17-18 without).
_EXP_FINE_FACTOR, _EXP_FINE_TRIALS = 0.97, 4
# Where the host reads for free, the step search tries this many of its trials first (the fine
# ones and the first backtracks: enough for nearly every element of the cone benchmark), and the
# rest only when an element needs them.
_EXP_FIRST_TRIALS = 8


@dataclasses.dataclass(frozen=True)
class IPMSettings:
    """Hyperparameters (immutable); ``solve_cone(solver="ipm", solver_options={...})`` sets them.

    Attributes:
        tol: relative primal, dual and gap residual at which an element stops. 1e-8 as
            Clarabel: the Newton refinement after the solver takes most elements to round-off,
            but a degenerate element it cannot improve keeps this accuracy (1e-6 left such
            elements 1e-3 off on badly scaled rows).
        inaccurate_tol: an element that stalls (on an exponential cone the membership test
            loses its digits near the boundary) or runs out of iterations with a residual below
            this is returned INACCURATE, for the refinement to finish; above, it has failed.
        max_iter: iteration limit (elements of the test problems take 13-17; 60 leaves room
            for badly scaled ones before Clarabel takes over).
        step_fraction: fraction of the step to the cone boundary that is taken (0.99, as
            Clarabel's max_step_fraction); on exponential cones the step must stay inside when
            divided by it, so that every cone keeps the same margin.
        backtrack: factor by which a step that leaves an exponential cone is shortened, after
            the fine first trials (_EXP_FINE_FACTOR) (0.8: finer factors changed the iteration
            count by < 3 % and failed more often).
        max_backtracks: shortenings before an element is declared a numerical failure
            (0.8^40 ~ 1e-4).
        reg: regularisation of the reduced KKT system, small enough (1e-10) to move the steps
            far less than the tolerance; ``kkt_refine_steps`` of iterative refinement remove it.
            Where a factorisation fails, that element retries in the next iteration with its
            regularisation multiplied by 100 (at most four times in a row); it falls back
            towards ``reg`` after each sound step.
        kkt_refine_steps: iterative refinement steps per Newton solve (0: none were needed).
    """

    tol: float = 1e-8
    inaccurate_tol: float = 1e-5
    max_iter: int = 60
    step_fraction: float = 0.99
    backtrack: float = 0.8
    max_backtracks: int = 40
    reg: float = 1e-10
    kkt_refine_steps: int = 0

    def __post_init__(self) -> None:
        for name in ("max_iter", "max_backtracks", "kkt_refine_steps"):
            value = getattr(self, name)
            least = 1 if name == "max_backtracks" else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"IPMSettings.{name} must be an int >= {least}, got {value!r}")
        for name, lo, hi in (("tol", 0.0, 1.0), ("inaccurate_tol", 0.0, 1.0), ("step_fraction", 0.0, 1.0),
                             ("backtrack", 0.0, 1.0), ("reg", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo < value < hi:
                raise ValueError(f"IPMSettings.{name} must be a number in ({lo}, {hi}), got {value!r}")
        if self.inaccurate_tol < self.tol:
            raise ValueError(f"IPMSettings.inaccurate_tol ({self.inaccurate_tol}) must be >= tol ({self.tol})")


@dataclasses.dataclass(frozen=True)
class _Part:
    """``count`` cones of one kind, ``size`` rows each, at ``start`` among the cone (non-zero) rows."""

    kind: str
    start: int
    count: int
    size: int
    degree: int
    dual: bool = False  # dual exponential cones, mapped to primal ones by exp_module.DUAL_TO_PRIMAL

    @property
    def stop(self) -> int:
        return self.start + self.count * self.size


def _parts(spec: ConeSpec) -> list[_Part]:
    """The non-zero cones of ``spec`` as parts, offsets counted from the first non-zero row."""
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
        parts.append(_Part(kind, block.start - spec.zero, block.count, block.size, degree, block.dual))
    return parts


def _piece(v: torch.Tensor, part: _Part) -> torch.Tensor:
    """The rows of ``part`` of v (B, m_K, ...) as (B, count, size, ...)."""
    return v[:, part.start:part.stop].reshape(v.shape[0], part.count, part.size, *v.shape[2:])


def _join(pieces: list[torch.Tensor], batch: int, empty: torch.Tensor | None = None) -> torch.Tensor:
    """The inverse of ``_piece`` over all parts: (B, count, size, ...) pieces -> (B, m_K, ...);
    ``empty`` (B, 0, ...) when there are no parts (a program of zero-cone rows only)."""
    if not pieces:
        return empty
    return torch.cat([p.reshape(batch, -1, *p.shape[3:]) for p in pieces], 1)


def _device_constant(values: tuple, like: torch.Tensor) -> torch.Tensor:
    """A (nested) tuple of numbers as a tensor of ``like``'s dtype, filled on its device entry by
    entry: a tensor made from Python numbers would be a blocking host-to-device copy on a GPU."""
    shape = torch.tensor(values).shape  # on the host, for the shape only
    out = like.new_empty(shape.numel())
    for index, value in enumerate(torch.tensor(values, dtype=torch.float64).flatten().tolist()):
        out[index].fill_(value)
    return out.reshape(shape)


def _central_point(parts: list[_Part], batch: int, like: torch.Tensor) -> torch.Tensor:
    """The start s = y (B, m_K): the unit of each symmetric cone, the exponential cone's central point."""
    pieces = []
    for part in parts:
        shape = (batch, part.count, part.size)
        if part.kind == "exp":
            piece = _device_constant(exponential.CENTRAL_POINT, like).expand(shape)
        else:
            algebra = {"nonneg": symmetric.NONNEG, "soc": symmetric.SOC, "psd": symmetric.PSD}[part.kind]
            piece = algebra.unit(like.new_zeros(shape))
        pieces.append(piece)
    return _join(pieces, batch, like.new_zeros(batch, 0))


def _scaling(part: _Part, s: torch.Tensor, y: torch.Tensor,
             mu: torch.Tensor) -> symmetric.NTScaling | exponential.ExpScaling:
    """The scaling of one part's cones at s, y (B, count, size); mu (B, count)."""
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


def _apply_blocks(mats: list[torch.Tensor], v: torch.Tensor, parts: list[_Part]) -> torch.Tensor:
    """Block-diagonal (B, m_K, m_K) matrix (one (B, count, k, k) tensor per part) times v (B, m_K)."""
    pieces = [_times(M, _piece(v, part).unsqueeze(-1)).squeeze(-1) for M, part in zip(mats, parts)]
    return _join(pieces, v.shape[0], v[:, :0])


@dataclasses.dataclass(frozen=True)
class _Problem:
    """The data of the working batch: equality rows (A_z, b_z), cone rows (A_k, b_k), c, P (B, n, n) or None."""

    A_z: torch.Tensor
    b_z: torch.Tensor
    A_k: torch.Tensor
    b_k: torch.Tensor
    c: torch.Tensor
    P: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class _Iterate:
    """Primal x (B, n), equality multipliers nu (B, z), cone slacks s and multipliers y (B, m_K)."""

    x: torch.Tensor
    nu: torch.Tensor
    s: torch.Tensor
    y: torch.Tensor


def _inf_norm(v: torch.Tensor) -> torch.Tensor:
    """Infinity norm over the last dimension, (B,); zeros for an empty one."""
    return v.abs().amax(-1) if v.shape[-1] else v.new_zeros(v.shape[0])


def _residuals(prob: _Problem, it: _Iterate) -> tuple[torch.Tensor, ...]:
    """r_d = P x + A^T y + c, r_z = A_z x - b_z, r_p = A_k x + s - b_k and the relative error (B,)."""
    px = torch.zeros_like(it.x) if prob.P is None else mv(prob.P, it.x)
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
              alpha: torch.Tensor, fraction: float, settings: IPMSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The longest of alpha * t, t = _EXP_FINE_FACTOR^k (k < _EXP_FINE_TRIALS) then backtrack^k
    (0 < k < max_backtracks), for which the step divided by ``fraction`` keeps every exponential
    cone's s and y strictly inside (the feasible steps along a ray form an interval), all tried at
    once (no look from the host); and whether one was found (B,). Where the host's reads are
    free (the CPU), the first _EXP_FIRST_TRIALS are tried first, and the others only if some
    element found none of them inside (the answer is the same: later trials are shorter)."""
    s_e, y_e, ds_e, dy_e = (_exp_rows(t, parts) for t in (s, y, ds, dy))
    powers = torch.arange(settings.max_backtracks + _EXP_FINE_TRIALS - 1, dtype=s.dtype, device=s.device)
    factors = torch.where(powers < _EXP_FINE_TRIALS, _EXP_FINE_FACTOR ** powers,
                          settings.backtrack ** (powers - _EXP_FINE_TRIALS + 1))
    trials = alpha.unsqueeze(0) * factors.unsqueeze(-1)  # (K, B), longest first

    def tried(trials: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        reach = (trials / fraction)[..., None, None]
        inside = (exponential.in_primal(s_e + reach * ds_e) & exponential.in_dual(y_e + reach * dy_e)).all(-1)
        return (trials * inside).amax(0), inside.any(0)

    if reads_are_free(s.device):
        step, found = tried(trials[:_EXP_FIRST_TRIALS])
        if bool(found.all()):
            return step, found
    return tried(trials)


def _normal_matrix(prob: _Problem, V: list[torch.Tensor], parts: list[_Part]) -> torch.Tensor:
    """P + A_K^T V^T V A_K (B, n, n), as G^T G for the scaled cone rows G = V A_K (one product
    over all rows: summing a product per part took 1.6 times as long)."""
    batch, n = prob.c.shape
    G = _join([_times(v, _piece(prob.A_k, part)) for v, part in zip(V, parts)], batch, prob.A_k)
    return G.mT @ G if prob.P is None else torch.baddbmm(prob.P, G.mT, G)


def _newton_step(prob: _Problem, it: _Iterate, residuals: tuple[torch.Tensor, ...], parts: list[_Part], degree: int,
                 settings: IPMSettings, reg: torch.Tensor) -> tuple[_Iterate, torch.Tensor, torch.Tensor]:
    """One predictor-corrector step from ``it`` with its residuals (r_d, r_z, r_p) and each
    element's KKT regularisation ``reg`` (B,); returns the new iterate, whether the step is sound
    (B,) and whether the KKT factorisation succeeded (B,).

    With the cone rows eliminated, H = P + A_K^T V^T V A_K is factorised with the equality rows
    (qp/kkt.py, no inequality rows of its own); each direction then needs two passes over A_K
    (A_K^T u and A_K dx) and the block-diagonal V^T V on vectors."""
    batch = it.x.shape[0]
    r_d, r_z, r_p = residuals
    mu = (it.s * it.y).sum(-1) / degree
    s_parts, y_parts = [_piece(it.s, part) for part in parts], [_piece(it.y, part) for part in parts]
    scalings = [_scaling(part, s, y, mu.unsqueeze(-1).expand(batch, part.count))
                for part, s, y in zip(parts, s_parts, y_parts)]
    V = [sc.V for sc in scalings]
    Vt = [v.mT for v in V]
    no_rows = prob.A_k[:, :0]
    factor = factor_kkt(_normal_matrix(prob, V, parts), prob.A_z, no_rows, it.s[:, :0], reg, reg,
                        unit_weights=True, retries=0)

    def direction(q: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(dx, dnu, ds, dy) of the Newton system with ds + H dy = q on the cone rows:
        dx from (P + A^T H^-1 A) dx + A_z^T dnu = -r_d - A^T H^-1 (r_p + q), A_z dx = -r_z;
        then ds = -r_p - A dx and dy = H^-1 (A dx + r_p + q)."""
        rhs = r_p + q
        v = _apply_blocks(V, rhs, parts)
        dx, dnu, _ = solve_reduced(factor, torch.baddbmm((-r_d).unsqueeze(-2), _apply_blocks(Vt, v, parts).unsqueeze(-2),
                                                         prob.A_k, alpha=-1).squeeze(-2),
                                   -r_z, None, settings.kkt_refine_steps, use_y=True)
        a_dx = mv(prob.A_k, dx)
        return dx, dnu, -r_p - a_dx, _apply_blocks(Vt, _apply_blocks(V, a_dx, parts) + v, parts)

    def step_length(ds: torch.Tensor, dy: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
        """fraction of the step to the boundary of the symmetric cones (at most 1), shortened
        until s, y are inside the exponential cones; and whether that succeeded (B,)."""
        step = torch.ones(batch, dtype=it.x.dtype, device=it.x.device) / fraction
        for sc, part, s, y in zip(scalings, parts, s_parts, y_parts):
            step = torch.minimum(step, sc.max_step(s, y, _piece(ds, part), _piece(dy, part)).amin(-1))
        alpha = (fraction * step).clamp(max=1)
        if not any(part.kind == "exp" for part in parts):
            return alpha, torch.ones_like(alpha, dtype=torch.bool)
        return _exp_step(parts, it.s, it.y, ds, dy, alpha, fraction, settings)

    affine = direction(-it.s)  # every scaling's affine right-hand side is -s
    alpha, _ = step_length(affine[2], affine[3], 1.0)
    sigma_mu = ((1 - alpha) ** 3 * mu)[:, None, None]
    dx, dnu, ds, dy = direction(_join([
        sc.combined_rhs(sigma_mu, _piece(affine[2], part), _piece(affine[3], part), s, y)
        for sc, part, s, y in zip(scalings, parts, s_parts, y_parts)], batch, it.s))
    finite = factor.ok & torch.stack([t.isfinite().all(-1) for t in (dx, ds, dy)]).all(0)
    if dnu.shape[-1]:
        finite = finite & dnu.isfinite().all(-1)
    dx, dnu, ds, dy = (torch.where(finite.unsqueeze(-1), t, torch.zeros_like(t)) for t in (dx, dnu, ds, dy))
    alpha, inside = step_length(ds, dy, settings.step_fraction)
    finite = finite & inside
    a = alpha.unsqueeze(-1)
    return _Iterate(it.x + a * dx, it.nu + a * dnu, it.s + a * ds, it.y + a * dy), finite, factor.ok


def solve(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, spec: ConeSpec,
          settings: IPMSettings = IPMSettings(), max_slices: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve a batch: A (B, m, n), b (B, m), c (B, n), P (B, n, n), shared (n, n) or None; float64.

    Returns x (B, n), y (B, m), s (B, m) and status (B,) int64 (ConeStatus: SOLVED, INACCURATE,
    MAX_ITER or NUMERICAL_ERROR); every element holds its last iterate. A large CPU batch is
    solved in at most ``max_slices`` (default: torch's thread count) slices on parallel threads
    (threads.py), with the same result.
    """
    if any(t.dtype != torch.float64 for t in (A, b, c)) or (P is not None and P.dtype != torch.float64):
        raise TypeError("A, b, c and P must be float64 (solve_cone converts its inputs)")
    if max_slices is not None and (not isinstance(max_slices, int) or max_slices < 1):
        raise ValueError(f"max_slices must be an int >= 1 or None, got {max_slices!r}")
    if A.dim() != 3 or b.shape != A.shape[:2] or c.shape != (A.shape[0], A.shape[2]):
        raise ValueError(f"A must be (B, m, n), b (B, m) and c (B, n); got A {tuple(A.shape)}, b {tuple(b.shape)}, "
                         f"c {tuple(c.shape)}")
    batch, m, n = A.shape
    if P is not None:
        if P.shape[-2:] != (n, n) or P.dim() not in (2, 3) or (P.dim() == 3 and P.shape[0] != batch):
            raise ValueError(f"P must be (n, n) = ({n}, {n}) or (B, n, n) = ({batch}, {n}, {n}), got {tuple(P.shape)}")
        P = P.expand(batch, n, n)
    if spec.size != m:
        raise ValueError(f"spec covers {spec.size} rows but A has m = {m}")
    count = threads.slice_count(batch, (m + n) * n, A.device, _MIN_SLICE_ENTRIES)
    count = min(count, max_slices or count)
    parts = threads.map_slices(
        lambda part: _solve(A[part], b[part], c[part], None if P is None else P[part], spec, settings), batch, count)
    return tuple(torch.cat(outputs) for outputs in zip(*parts))


def _solve(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, spec: ConeSpec,
           settings: IPMSettings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``solve`` for one slice: set up, iterate, map back."""
    parts = _parts(spec)
    prob = _setup(A, b, c, P, spec, parts)
    result, status = _iterate(prob, parts, settings)
    y_k, s_k = _from_primal_exp(result.y, result.s, parts)
    return result.x, torch.cat([result.nu, y_k], -1), torch.cat([torch.zeros_like(result.nu), s_k], -1), status


def _setup(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, spec: ConeSpec,
           parts: list[_Part]) -> _Problem:
    """Split the zero-cone rows from the others and map dual exponential rows to primal ones."""
    batch, _, n = A.shape
    A_k, b_k = A[:, spec.zero:], b[:, spec.zero:]
    if any(part.dual for part in parts):
        T = _device_constant(exp_module.DUAL_TO_PRIMAL, A)
        A_k, b_k = A_k.clone(), b_k.clone()
        for part in (part for part in parts if part.dual):
            A_k[:, part.start:part.stop] = (T @ _piece(A_k, part)).reshape(batch, -1, n)
            b_k[:, part.start:part.stop] = (_piece(b_k, part) @ T.mT).reshape(batch, -1)
    return _Problem(A[:, :spec.zero], b[:, :spec.zero], A_k, b_k, c, P)


def _from_primal_exp(y: torch.Tensor, s: torch.Tensor, parts: list[_Part]) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo ``_setup``'s map on the dual exponential rows: y = T^T y', s = T^-1 s'."""
    if not any(part.dual for part in parts):
        return y, s
    T, T_inv = _device_constant(exp_module.DUAL_TO_PRIMAL, y), _device_constant(exp_module.PRIMAL_TO_DUAL, y)
    y, s = y.clone(), s.clone()
    for part in (part for part in parts if part.dual):
        y[:, part.start:part.stop] = (_piece(y, part) @ T).reshape(y.shape[0], -1)
        s[:, part.start:part.stop] = (_piece(s, part) @ T_inv.mT).reshape(s.shape[0], -1)
    return y, s


@dataclasses.dataclass(frozen=True)
class _State:
    """The iterate, each element's status and KKT regularisation (B,)."""

    x: torch.Tensor
    nu: torch.Tensor
    s: torch.Tensor
    y: torch.Tensor
    status: torch.Tensor
    reg: torch.Tensor


@dataclasses.dataclass(frozen=True)
class _Residuals:
    """r_d (B, n), r_z (B, z), r_p (B, m_K) and the relative error (B,) of ``_residuals``."""

    r_d: torch.Tensor
    r_z: torch.Tensor
    r_p: torch.Tensor
    error: torch.Tensor


def _converged(st: _State, res: _Residuals, settings: IPMSettings) -> _State:
    """``st`` with the running elements whose error is within ``settings.tol`` SOLVED."""
    return dataclasses.replace(st, status=st.status.masked_fill((st.status == RUNNING) & (res.error <= settings.tol),
                                                                int(ConeStatus.SOLVED)))


def _start(prob: _Problem, parts: list[_Part], settings: IPMSettings) -> tuple[_State, _Residuals]:
    """x = 0, nu = 0 and s = y at the cones' central points; its residuals and convergence test."""
    batch, n = prob.c.shape
    start = _central_point(parts, batch, prob.c)
    st = _State(prob.c.new_zeros(batch, n), prob.c.new_zeros(batch, prob.b_z.shape[-1]), start, start.clone(),
                torch.full((batch,), RUNNING, dtype=torch.int64, device=prob.c.device),
                torch.full((batch,), settings.reg, dtype=prob.c.dtype, device=prob.c.device))
    res = _Residuals(*_residuals(prob, _Iterate(st.x, st.nu, st.s, st.y)))
    return _converged(st, res, settings), res


def _step(prob: _Problem, st: _State, res: _Residuals, parts: list[_Part], degree: int,
          settings: IPMSettings) -> tuple[_State, _Residuals]:
    """One predictor-corrector step where an element runs and the step is sound, then the
    residuals and the convergence test at the new point. A failed factorisation is retried in
    the next iteration with more regularisation; other failures keep their last iterate:
    INACCURATE if close, else NUMERICAL_ERROR."""
    it = _Iterate(st.x, st.nu, st.s, st.y)
    new, ok, factored = _newton_step(prob, it, (res.r_d, res.r_z, res.r_p), parts, degree, settings, st.reg)
    running = st.status == RUNNING
    advance = running & ok
    retry, reg = next_regularisation(st.reg, settings.reg, running, factored, advance)
    failed = torch.where(res.error <= settings.inaccurate_tol, int(ConeStatus.INACCURATE), int(ConeStatus.NUMERICAL_ERROR))
    status = torch.where(running & ~ok & ~retry, failed, st.status)
    it = _Iterate(*(torch.where(advance.unsqueeze(-1), getattr(new, name), getattr(it, name))
                    for name in ("x", "nu", "s", "y")))
    res = _Residuals(*_residuals(prob, it))
    return _converged(_State(it.x, it.nu, it.s, it.y, status, reg), res, settings), res


def _iterate(prob: _Problem, parts: list[_Part], settings: IPMSettings) -> tuple[_Iterate, torch.Tensor]:
    """The interior point method on the engine's loop (``engine.loop.run``): the last iterate and
    status of every element. Elements still running after ``max_iter`` steps are INACCURATE if
    their error is within ``inaccurate_tol``, else MAX_ITER."""
    degree = max(sum(part.count * part.degree for part in parts), 1)
    st, res = _start(prob, parts, settings)
    out = loop.run((prob,), st, res, lambda prob, st, res: _step(prob, st, res, parts, degree, settings),
                   settings.max_iter, prob.c.device)
    full, error = out.state, out.working_res.error
    if out.index is not None:  # the elements outside the working batch have finished
        error = error.new_full(full.status.shape, float("inf")).index_copy(0, out.index, error)
    close = torch.where(error <= settings.inaccurate_tol, int(ConeStatus.INACCURATE), int(ConeStatus.MAX_ITER))
    return _Iterate(full.x, full.nu, full.s, full.y), torch.where(full.status == RUNNING, close, full.status)
