"""The exponential cone K = cl{(x, y, z): y > 0, y exp(x / y) <= z} and its dual.

The dual is K* = cl{(u, v, w): u < 0, -u exp(v / u) <= e w}. A point v0 = (r, s, t) is
projected onto K in one of four regions: v0 in K (itself), -v0 in K* (the origin), r <= 0 and
s <= 0 (to (r, 0, max(t, 0))), and otherwise onto the boundary point y (rho, 1, exp(rho)) where
rho is the root of Friberg's (2021) univariate function h, increasing on the bracket
1 - s/r < rho < r/s where the projection and its polar part both exist. The dual cone is
handled by Moreau: proj_K*(v) = v + proj_K(-v).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from optlayers.cone.operator import LinearMap
from optlayers.engine.constants import constant, identity, made_once
from optlayers.host import host_read

MAX_BRACKET_DOUBLINGS = 12  # widens an open side of the bracket by up to 2**12; h is scaled, never overflows
MAX_ROOT_ITERS = 100  # safeguarded Newton on an interval: bisection alone needs < 100 steps in float64
MULTISECTION_POINTS = 31  # grid points per multisection round: the bracket shrinks 32-fold per round
MULTISECTION_ROUNDS = 4  # 32**4 ~ 1e6: a 4096-wide bracket gets below 0.01, from which Newton converges fast
ROOT_TOL_ULPS = 16  # Newton steps below 16 ulps of rho are rounding noise in h: converged
NEWTON_UNCHECKED = 4  # Newton steps before the host first looks whether all rows converged
NEWTON_CHECK_EVERY = 4  # then it looks after every this many steps (each look is a host sync)
WARM_NEWTON_STEPS = 4  # unguarded Newton steps from a guess of the root (``_root``'s ``guess``) before the
# host's one look: from a guess within ~1e-4 (a nearby point's root, or an interior point solution's)
# the steps shrink quadratically and the third is below ROOT_TOL_ULPS for nearly every row (none in the
# refinements of 1,000 exp / exp_dual programs of benchmarks/cone_fallbacks.py and of 16 batches of
# 128 programs mixing all cones); roots of |rho| ~ 100 from 1e-6 away took four (1 row in 1,000)
REGION_INSIDE, REGION_POLAR, REGION_ANALYTIC, REGION_ROOT = 0, 1, 2, 3
# s in K_exp^* iff DUAL_TO_PRIMAL s in K_exp: (u, v, w) -> (u - v, -u, w).
DUAL_TO_PRIMAL = ((1.0, -1.0, 0.0), (-1.0, 0.0, 0.0), (0.0, 0.0, 1.0))
PRIMAL_TO_DUAL = ((0.0, -1.0, 0.0), (-1.0, -1.0, 0.0), (0.0, 0.0, 1.0))  # its inverse


def regions(v: torch.Tensor) -> torch.Tensor:
    """Which of the four cases each point v (..., 3) falls in (REGION_* codes)."""
    r, s, t = v.unbind(-1)
    one = constant(1.0, v)
    r_positive, s_positive, r_not_positive, s_not_positive = r > 0, s > 0, r <= 0, s <= 0  # each test once
    safe_s = torch.where(s_positive, s, one)
    safe_r = torch.where(r_positive, r, one)
    in_cone = (s_positive & (safe_s * torch.exp(r / safe_s) <= t)) | (r_not_positive & (s == 0) & (t >= 0))
    in_polar = (r_positive & (safe_r * torch.exp(s / safe_r) <= -torch.e * t)) | ((r == 0) & s_not_positive & (t <= 0))
    codes = _region_codes(v.device)
    code = torch.where(r_not_positive & s_not_positive, codes[REGION_ANALYTIC], codes[REGION_ROOT])
    code = torch.where(in_polar, codes[REGION_POLAR], code)
    return torch.where(in_cone, codes[REGION_INSIDE], code)


@made_once
def _region_codes(device: torch.device) -> torch.Tensor:
    """The REGION_* codes (4,) int64, entry i holding code i (made once per device)."""
    return torch.arange(4, device=device)


@dataclasses.dataclass(frozen=True)
class _Terms:
    """The coefficients of Friberg's h that depend on the point w = (r, s, t) (N, 3) alone, made
    once per root solve by one product of w with a constant matrix (``_TERMS``): those of h and h'
    (``_h``; h alone: every other entry) as the (N, 6) parts of c0 + rho (c1 + rho c2)."""

    c0: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor

    @classmethod
    def of(cls, w: torch.Tensor) -> "_Terms":
        return cls(*(w @ _terms_matrix(w.device, w.dtype)).unflatten(-1, (3, 6)).unbind(-2))


# Rows r, s, t of the map from w to (c0, c1, c2) (``_Terms``), each the coefficients of
# (e^rho in h, e^rho in h', e^-rho in h, e^-rho in h', 1 in h, 1 in h'), exact small integers:
# c0 = (s - r, s, -r, r + s, -t, t), c1 = (r, r, s, -s, t, -2t), c2 = (0, 0, 0, 0, -t, 0).
_TERMS = ((-1, 0, -1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
          (1, 1, 0, 1, 0, 0, 0, 0, 1, -1, 0, 0, 0, 0, 0, 0, 0, 0),
          (0, 0, 0, 0, -1, 1, 0, 0, 0, 0, 1, -2, 0, 0, 0, 0, -1, 0))


@made_once
def _terms_matrix(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``_TERMS`` as a (3, 18) tensor, made once per device and dtype."""
    return torch.tensor(_TERMS, dtype=dtype).to(device)


def _scaled_exps(rho: torch.Tensor) -> torch.Tensor:
    """(exp(rho), exp(-rho), 1) (..., 3), each times exp(-|rho|)."""
    exponents = torch.stack([rho, -rho, constant(0.0, rho).expand(rho.shape)], -1)
    return torch.exp(exponents - rho.abs().unsqueeze(-1))


def _h(terms: _Terms, rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Friberg's h(rho) and h'(rho), both times exp(-|rho|) so that they never overflow:

    h = ((rho - 1) r + s) e^rho - (r - rho s) e^-rho - (rho^2 - rho + 1) t,
    h' = (rho r + s) e^rho + (r - (rho - 1) s) e^-rho - (2 rho - 1) t,

    as one product of the scaled exponentials (``_scaled_exps``) with their coefficients
    c0 + rho (c1 + rho c2) (two fused products for all six)."""
    rho_ = rho.unsqueeze(-1)
    coefficients = torch.addcmul(terms.c0, rho_, torch.addcmul(terms.c1, rho_, terms.c2)).unflatten(-1, (3, 2))
    return (_scaled_exps(rho).unsqueeze(-2) @ coefficients).squeeze(-2).unbind(-1)


def _h_value(terms: _Terms, rho: torch.Tensor) -> torch.Tensor:
    """h(rho) times exp(-|rho|) alone (its sign is what the bracket searches look at); rho (..., N)."""
    rho_ = rho.unsqueeze(-1)
    coefficients = torch.addcmul(terms.c0[..., ::2], rho_, torch.addcmul(terms.c1[..., ::2], rho_, terms.c2[..., ::2]))
    return (_scaled_exps(rho).unsqueeze(-2) @ coefficients.unsqueeze(-1)).flatten(-3)


def _first_true(mask: torch.Tensor) -> torch.Tensor:
    """Index along dim 0 of the first True per column (the last index if none)."""
    last = torch.full_like(mask[0], mask.shape[0] - 1, dtype=torch.long)
    return torch.where(mask.any(0), mask.to(torch.int8).argmax(0), last)


def _bracket(w: torch.Tensor, terms: _Terms) -> tuple[torch.Tensor, torch.Tensor]:
    """An interval (lo, hi) with h(lo) < 0 <= h(hi); an open side is found among anchor +- 2^k.

    A point of the root region has r > 0 or s > 0, so at most one side is open: both searches
    are one evaluation of h."""
    r, s, _ = w.unbind(-1)
    one = constant(1.0, w)
    lo = 1 - s / torch.where(r > 0, r, one)
    hi = r / torch.where(s > 0, s, one)
    open_lo, open_hi = r <= 0, s <= 0
    offsets = 2.0 ** torch.arange(MAX_BRACKET_DOUBLINGS + 1, dtype=w.dtype, device=w.device).unsqueeze(-1)
    anchor = torch.where(open_lo, hi, lo)
    candidates = anchor + torch.where(open_lo, -offsets, offsets)  # (K, N), moving away from the anchor
    f = _h_value(terms, candidates)
    k = _first_true(torch.where(open_lo, f < 0, f >= 0))
    found = candidates.gather(0, k.unsqueeze(0)).squeeze(0)
    previous = torch.where(k > 0, candidates.gather(0, (k - 1).clamp_min(0).unsqueeze(0)).squeeze(0), anchor)
    return (torch.where(open_lo, found, torch.where(open_hi, previous, lo)),
            torch.where(open_lo, previous, torch.where(open_hi, found, hi)))


def _multisection(w: torch.Tensor, terms: _Terms, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink (lo, hi) by MULTISECTION_POINTS + 1 per round, evaluating h on a grid at once. The
    new bracket is the first grid point with h >= 0 and the point before it, among lo, the grid
    and hi (hi where no grid point has it): one index into both, from the h values between a
    negative and a positive stand-in (lo's and hi's signs)."""
    fractions = torch.arange(1, MULTISECTION_POINTS + 1, dtype=w.dtype, device=w.device).unsqueeze(-1)
    fractions = fractions / (MULTISECTION_POINTS + 1)
    minus_one, one = (constant(value, w).expand(1, w.shape[0]) for value in (-1.0, 1.0))
    for _ in range(MULTISECTION_ROUNDS):  # a fixed number of rounds: no look from the host
        grid = torch.addcmul(lo, hi - lo, fractions)
        signs = torch.cat([minus_one, _h_value(terms, grid), one]) >= 0
        first = signs.to(torch.int8).argmax(0, keepdim=True)  # 1 ... MULTISECTION_POINTS + 1
        points = torch.cat([lo.unsqueeze(0), grid, hi.unsqueeze(0)])
        lo, hi = points.gather(0, torch.cat([first - 1, first])).unbind(0)
    return lo, hi


def _root(w: torch.Tensor, guess: torch.Tensor | None = None, root: torch.Tensor | None = None) -> torch.Tensor:
    """The root rho of h for normalized points w (N, 3) in the root region.

    With a ``guess`` (N,) of the roots (``root`` (N,): the rows that are in the root region; the
    others are stand-ins whose root nobody reads), WARM_NEWTON_STEPS plain Newton steps from it
    (``_warm_root``), and the host's one look whether every root row converged to a root inside
    its bracket (where h increases and has no other root: the root). Only if some row did not,
    the robust solve below runs as well, for the rows that did not.
    """
    terms = _Terms.of(w)
    if guess is None:
        return _robust_root(w, terms)
    rho, converged = _warm_root(w, terms, guess)
    converged = converged | ~root
    if host_read(converged.all().unsqueeze(0))[0]:
        return rho
    return torch.where(converged, rho, _robust_root(w, terms))


def _warm_root(w: torch.Tensor, terms: _Terms, guess: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """WARM_NEWTON_STEPS Newton steps on h from ``guess`` (N,); the roots and whether each converged
    (its last step below ROOT_TOL_ULPS of it: a converged row's further steps stay within rounding
    noise, so no row is frozen) inside the bracket 1 - s/r <= rho <= r/s (a side open where
    r <= 0 or s <= 0), on which h increases: the root."""
    r, s, _ = w.unbind(-1)
    one = constant(1.0, w)
    inf = constant(math.inf, w)
    lo = torch.where(r > 0, 1 - s / torch.where(r > 0, r, one), -inf)
    hi = torch.where(s > 0, r / torch.where(s > 0, s, one), inf)
    tol = ROOT_TOL_ULPS * torch.finfo(w.dtype).eps
    rho = torch.nan_to_num(guess, nan=0.0, posinf=0.0, neginf=0.0)  # no guess: from 0
    for _ in range(WARM_NEWTON_STEPS):
        f, df = _h(terms, rho)
        step = f / df
        rho = rho - step
    done = step.abs() <= tol * rho.abs().clamp_min(1)  # NaN: not done
    # inside the bracket, closed by ROOT_TOL_ULPS: a root at its edge may round to just beyond it
    return rho, done & (rho >= lo - tol * lo.abs().clamp_min(1)) & (rho <= hi + tol * hi.abs().clamp_min(1))


def _robust_root(w: torch.Tensor, terms: _Terms) -> torch.Tensor:
    """The root by multisection, which narrows the bracket, then safeguarded Newton: a Newton step
    is taken only when it stays inside the bracket and at least halves the previous step,
    otherwise bisection. Converged rows are frozen on the device; the host looks after
    NEWTON_UNCHECKED steps and then every NEWTON_CHECK_EVERY steps (after multisection most rows
    converge in a few steps)."""
    lo, hi = _multisection(w, terms, *_bracket(w, terms))
    rho = (lo + hi) / 2
    last_step = hi - lo
    tol = ROOT_TOL_ULPS * torch.finfo(w.dtype).eps
    done = torch.zeros_like(rho, dtype=torch.bool)
    for iteration in range(1, MAX_ROOT_ITERS + 1):
        f, df = _h(terms, rho)
        negative = f < 0
        lo, hi = torch.where(negative, rho, lo), torch.where(negative, hi, rho)
        step = f / df
        newton = rho - step
        fast = ((newton - newton) == 0) & (newton >= lo) & (newton <= hi) & (2 * step.abs() <= last_step)  # finite, inside
        new = torch.where(done, rho, torch.where(fast, newton, (lo + hi) / 2))
        last_step = (new - rho).abs()
        done = done | (last_step <= tol * torch.clamp(new.abs(), min=1))
        rho = new
        looks = iteration >= NEWTON_UNCHECKED and (iteration - NEWTON_UNCHECKED) % NEWTON_CHECK_EVERY == 0
        if looks and bool(done.all()):
            break
    return rho


def _ray(rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """a = (rho, 1, e^rho) and da/drho, both times exp(-max(rho, 0)) so that they never overflow."""
    scale = torch.exp(-rho.clamp_min(0))
    grow = torch.exp(rho - rho.clamp_min(0))
    a = torch.stack([rho * scale, scale, grow], dim=-1)
    da = torch.stack([scale, constant(0.0, rho).expand(rho.shape), grow], dim=-1)
    return a, da


def _boundary_point(w: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """The point of the ray {y (rho, 1, e^rho): y >= 0} nearest to w."""
    a, _ = _ray(rho)
    coef = ((w * a).sum(-1) / (a * a).sum(-1)).clamp_min(0)
    return coef.unsqueeze(-1) * a


def _nearest(v: torch.Tensor, candidates: list[torch.Tensor]) -> torch.Tensor:
    """Per row of v (N, 3), the candidate point of K (each (N, 3)) nearest to it."""
    stacked = torch.stack(candidates)
    dist = torch.linalg.vector_norm(stacked - v, dim=-1)
    best = dist.argmin(0)
    return stacked.gather(0, best.reshape(1, -1, 1).expand(1, -1, 3)).squeeze(0)


def _heuristics(v: torch.Tensor) -> list[torch.Tensor]:
    """Points of K near v (N, 3) that guard the root solution against cancellation (Friberg)."""
    r, s, t = v.unbind(-1)
    on_face = torch.stack([r.clamp_max(0), constant(0.0, s).expand(s.shape), t.clamp_min(0)], dim=-1)
    safe_s = torch.where(s > 0, s, constant(1.0, s))
    lifted = torch.stack([r, s, torch.maximum(t, safe_s * torch.exp(r / safe_s))], dim=-1)
    return [on_face, torch.where((s > 0).unsqueeze(-1), lifted, on_face)]


def _root_points(v: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v (N, 3) with the rows outside the root region (``root`` False) replaced by (1, 1, 1), a
    point of it (bracket (0, 1)), its norm (N, 1) and the normalized points: every row has a root,
    so no row needs to be picked out. (The stand-in is made on the device: a tensor from Python
    numbers would be a blocking host-to-device copy on a GPU.)"""
    v = torch.where(root.unsqueeze(-1), v, constant(1.0, v))
    norm = torch.linalg.vector_norm(v, dim=-1, keepdim=True)
    return v, norm, v / norm


def _primal(v: torch.Tensor, guess: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Projection onto K of v (N, 3) and its roots (``project_with_roots``: the root in the root
    region, the region's code elsewhere). Every row is computed and the regions merged by masks.
    ``guess`` (N,): roots to start Newton's method from (``_root``)."""
    code = regions(v)
    r, s, t = v.unbind(-1)
    zero = constant(0.0, v)
    analytic = torch.stack([r, zero.expand(s.shape), t.clamp_min(0)], dim=-1)
    out = torch.where((code == REGION_INSIDE).unsqueeze(-1), v, zero)
    out = torch.where((code == REGION_ANALYTIC).unsqueeze(-1), analytic, out)
    root = code == REGION_ROOT
    v_root, norm, w = _root_points(v, root)
    rho = _root(w, guess, root)
    nearest = _nearest(v_root, [_boundary_point(w, rho) * norm, *_heuristics(v_root)])
    return torch.where(root.unsqueeze(-1), nearest, out), torch.where(root, rho, _region_roots(v.device, v.dtype)[code])


@made_once
def _region_roots(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """What ``project_with_roots`` returns for a row of each region off the root region (4,):
    +inf inside K, -inf in the polar cone, NaN on the analytic face (the root region's entry unused)."""
    return torch.tensor([math.inf, -math.inf, math.nan, 0.0], dtype=dtype).to(device)


def project(v: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Projection of v (..., 3) onto K, or onto K* if ``dual``."""
    return project_with_roots(v, dual)[0]


def project_with_roots(v: torch.Tensor, dual: bool = False, guess: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``project`` and the roots (...,) it solved for, which ``derivative`` at the same v takes
    instead of solving again: one per row, the root where the row is in the root region, and
    where not its region (+inf inside the cone projected on, -inf in its polar, NaN on the
    analytic face), so that the derivative need not classify the rows again. ``guess`` (...,):
    roots to start from (those of a nearby v, or ``root_guess``'s; non-finite entries: none), or
    None; the answer is the same either way (up to the root's last few ulps)."""
    flat = v.reshape(-1, 3)
    guess = None if guess is None else guess.reshape(-1)
    if dual:
        out, rho = _primal(-flat, guess)
        return (flat + out).reshape(v.shape), rho.reshape(v.shape[:-1])
    out, rho = _primal(flat, guess)
    return out.reshape(v.shape), rho.reshape(v.shape[:-1])


def root_guess(v: torch.Tensor, near: torch.Tensor, dual: bool = False) -> torch.Tensor:
    """Guesses (...,) of the roots of ``project_with_roots(v, dual)`` from ``near`` (..., 3), a point
    near that projection (an interior point solution's y where v = y - s): the projection's part
    in K is (rho, 1, e^rho) times a factor, so rho = its first entry over its second (NaN where
    that is not positive: no guess)."""
    part = near - v if dual else near
    r, s = part[..., 0], part[..., 1]
    return torch.where(s > 0, r / s, constant(math.nan, v))


def _root_jacobian(w: torch.Tensor, rho: torch.Tensor) -> torch.Tensor:
    """Jacobian (N, 3, 3) of p(w) = u u^T w, u = a(rho(w)) / |a|, where h(rho(w); w) = 0.

    dp = u u^T dw + (du u^T + u du^T) w drho with du/drho = (I - u u^T) a' / |a| and
    drho = -<dh/dw, dw> / h'(rho) (implicit function theorem on Friberg's h).
    """
    a, da = _ray(rho)
    norm = torch.linalg.vector_norm(a, dim=-1, keepdim=True)
    u, du = a / norm, da / norm
    du = du - u * (u * du).sum(-1, keepdim=True)
    dp_drho = du * (u * w).sum(-1, keepdim=True) + u * (du * w).sum(-1, keepdim=True)
    ep, en, poly = _scaled_exps(rho).unbind(-1)
    dh_dw = torch.stack([(rho - 1) * ep - en, ep + rho * en, -(rho * (rho - 1) + 1) * poly], dim=-1)
    _, dh_drho = _h(_Terms.of(w), rho)
    drho_dw = -dh_dw / dh_drho.unsqueeze(-1)
    return u.unsqueeze(-1) * u.unsqueeze(-2) + dp_drho.unsqueeze(-1) * drho_dw.unsqueeze(-2)


def _primal_jacobian(v: torch.Tensor, rho: torch.Tensor | None = None) -> torch.Tensor:
    """Jacobian (N, 3, 3) of the projection onto K at v (N, 3); the inside piece on K's boundary.
    ``rho`` (N,): the roots ``_primal`` returned at this v, which also tell the rows' regions
    (None: project first); the polar region's rows get the zero matrix."""
    if rho is None:
        _, rho = _primal(v)
    jac = torch.where((rho == math.inf)[:, None, None], identity(3, v.device, v.dtype), constant(0.0, v))
    one, zero = constant(1.0, v).expand(rho.shape), constant(0.0, v).expand(rho.shape)
    analytic = torch.diag_embed(torch.stack([one, zero, (v[:, 2] > 0).to(v.dtype)], dim=-1))
    jac = torch.where(rho.isnan()[:, None, None], analytic, jac)
    root = rho.abs() < math.inf
    _, _, w = _root_points(v, root)
    return torch.where(root[:, None, None], _root_jacobian(w, rho), jac)


def derivative(v: torch.Tensor, dual: bool = False, roots: torch.Tensor | None = None) -> LinearMap:
    """Derivative of ``project`` at v (..., 3), as a map with a (..., 3, 3) symmetric matrix;
    ``roots`` (...,): those ``project_with_roots`` returned at this v and ``dual`` (None: solve)."""
    flat = v.reshape(-1, 3)
    rho = None if roots is None else roots.reshape(-1)
    if dual:
        jac = identity(3, v.device, v.dtype) - _primal_jacobian(-flat, rho)
    else:
        jac = _primal_jacobian(flat, rho)
    jac = jac.reshape(*v.shape, 3)
    apply = lambda d: (jac @ d.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    return LinearMap(apply, apply, lambda: jac)


