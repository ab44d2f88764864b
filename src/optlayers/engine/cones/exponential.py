"""The exponential cone in the interior point method: a primal-dual scaling and a third-order correction.

The exponential cone is not symmetric, so there is no Nesterov–Todd scaling. Its iterates
follow the central path s = -mu grad f*(y) of the dual barrier

    f*(u, v, w) = -log(u log(-u / w) - u + v) - log(-u) - log(w)     (degree 3)

of K_exp^* = cl{(u, v, w): u < 0, -u exp(v / u) <= e w}, whose conjugate f is the primal
barrier (its gradient in closed form through the Wright omega function). The linearisation is
ds + H dy = -s - sigma mu grad f*(y) + eta with

* H the primal-dual scaling of Dahl and Andersen ("A primal-dual interior-point algorithm for
  nonsymmetric exponential-cone optimization", Mathematical Programming, 2022), in the rank-three
  form Clarabel uses: H y = s and H z~ = s~ for the shadow iterates s~ = -grad f*(y),
  z~ = -grad f(s), and H close to mu hess f*(y) on the remaining direction;
* where that is ill-defined (s, y on or near the central path, where the shadow iterates
  coincide with the iterates, or lost to round-off), the dual scaling mu hess f*(y) with one
  BFGS correction so that H y = s holds (Serrano, "Algorithms for unsymmetric cone
  optimization and an implementation for problems with the exponential cone", 2015);
* eta = 1/2 D^3 f*(y)[dy, hess f*(y)^-1 ds] along the affine direction (ds, dy), Dahl and
  Andersen's third-order correction, the analogue of Mehrotra's second-order term.
"""
from __future__ import annotations

import dataclasses

import torch

from optlayers.engine.constants import constant, identity
from optlayers.engine.cones.symmetric import all_finite, cholesky_or_nan
from optlayers.host import reads_are_free

DEGREE = 3
# Newton steps for the Wright omega function: from the start of ``_omega_minus_one`` the
# relative error is 6e-4, 3e-8, 2e-16 after 1, 2, 3 steps (measured on 1e-12 ... 1e12).
_OMEGA_STEPS = 3
# The primal-dual scaling is used where mu mu~ - 1 (>= 0, zero on the central path) exceeds this
# (Clarabel's threshold, sqrt(eps)): closer to the central path it is 0 / 0 in floating point.
_CENTRAL_TOL = 1.49e-8
# The central point s = y of K_exp and K_exp^* used as the start (Clarabel's choice).
CENTRAL_POINT = (-1.051383945322714, 0.556409619469370, 1.258967884768947)


def primal_margin(s: torch.Tensor) -> torch.Tensor:
    """min(y, y log(z / y) - x) (...,) for s = (x, y, z) (..., 3): positive exactly where s is in
    the interior of K_exp (y > 0 and, through the logarithm, z > 0: where z <= 0 < y the margin is
    NaN or -inf, where y <= 0 it is not positive), so that a step search compares it with 0 (NaN
    compares false)."""
    x, y, z = s.unbind(-1)
    return torch.minimum(y, y * torch.log(z / y) - x)


def in_primal(s: torch.Tensor) -> torch.Tensor:
    """Whether s (..., 3) is in the interior of K_exp = cl{(x, y, z): y > 0, y exp(x / y) <= z}."""
    return primal_margin(s) > 0


def to_primal(y: torch.Tensor) -> torch.Tensor:
    """(u, v, w) -> (u - v, -u, w) (..., 3): maps K_exp^* onto K_exp (``exp.DUAL_TO_PRIMAL``)."""
    u, v, w = y.unbind(-1)
    return torch.stack([u - v, -u, w], -1)


def in_dual(y: torch.Tensor) -> torch.Tensor:
    """Whether y (..., 3) is in the interior of K_exp^* = cl{(u, v, w): u < 0, -u exp(v / u) <= e w}."""
    return in_primal(to_primal(y))


@dataclasses.dataclass(frozen=True)
class _Barrier:
    """The dual barrier's derivatives at y in int K_exp^*, in factored form.

    With psi = u log(-u / w) - u + v, its gradient g = (log(-u / w), 1, -u / w), its Hessian
    e e^T / u (e = (1, 0, -u / w)) and q = (1 / u, 0, 1 / w):

    * grad f*(y) = -(g~ + q) with g~ = g / psi;
    * hess f*(y) = F F^T + diag(q)^2 with F = [g~, e~] (..., 3, 2), e~ = e / sqrt(-u psi);
    * D^3 f*(y)[a, b] = S[a, b] - (e~'a e~'b + 2 g~'a g~'b) g~ - (e~'a g~'b + g~'a e~'b) e~, where
      S holds the sparse third derivatives of -log psi - log(-u) - log w that are not outer
      products: S[a, b] = (c1 a1 b1 + c2 a3 b3, 0, c2 (a1 b3 + a3 b1) + c3 a3 b3) with
      c1 = (1 / psi - 2 / u) / u^2, c2 = -1 / (psi w^2), c3 = 2 (u / psi - 1) / w^3. ``third`` is
      the (..., 3, 5) matrix [S's coefficients | -F] that maps (a1 b1, a1 b3 + a3 b1, a3 b3,
      e~'a e~'b + 2 g~'a g~'b, e~'a g~'b + g~'a e~'b) to D^3 f*(y)[a, b].
    """

    shadow: torch.Tensor  # -grad f*(y) (..., 3)
    hess: torch.Tensor  # (..., 3, 3)
    F: torch.Tensor  # (..., 3, 2)
    third: torch.Tensor  # (..., 3, 5)


def _flat(M: torch.Tensor) -> torch.Tensor:
    """(..., r, c) as (N, r, c), for the batched matrix products that take three dimensions."""
    return M.reshape(-1, *M.shape[-2:])


def _barrier(y: torch.Tensor) -> _Barrier:
    u, v, w = y.unbind(-1)
    ratio = torch.div(u, w).neg()  # -u / w
    log_ratio = torch.log(ratio)
    psi = torch.addcmul(v - u, u, log_ratio)
    zero, one = (constant(value, y).expand(u.shape) for value in (0.0, 1.0))
    inv_psi = psi.reciprocal()
    inv_u, inv_w = torch.stack([u, w]).reciprocal().unbind(0)
    # F = [g~, e~] = [(log_ratio, 1, ratio) / psi, (1, 0, ratio) / sqrt(-u psi)], row by row, in one product
    unscaled = torch.stack([log_ratio, one, one, zero, ratio, ratio], -1).unflatten(-1, (3, 2))
    F = unscaled * torch.stack([inv_psi, torch.rsqrt(-(u * psi))], -1).unsqueeze(-2)
    g = F[..., 0]
    q = torch.stack([inv_u, zero, inv_w], -1)
    flat = _flat(F)
    q2 = q * q
    hess = torch.baddbmm(_flat(torch.diag_embed(q2)), flat, flat.mT).view(*F.shape[:-1], 3)
    inv_u2, inv_w2 = q2[..., 0], q2[..., 2]
    c1 = torch.add(inv_psi, inv_u, alpha=-2) * inv_u2
    c2 = -(inv_psi * inv_w2)
    c3 = (u * inv_psi - 1) * (2 * inv_w2 * inv_w)
    sparse = torch.stack([c1, zero, c2, zero, zero, zero, zero, c2, c3], -1).unflatten(-1, (3, 3))
    return _Barrier(g + q, hess, F, torch.cat([sparse, F.neg()], -1))


def _third(barrier: _Barrier, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D^3 f*(y)[a, b] (..., 3) from the barrier's factored form (``_Barrier``)."""
    R = barrier.F.mT @ torch.stack([a, b], -1)  # [[g~'a, g~'b], [e~'a, e~'b]]
    products = R.prod(-1)  # (g~'a g~'b, e~'a e~'b)
    ga, gb, ea, eb = R.flatten(-2).unbind(-1)
    ab = a * b
    terms = torch.stack([ab[..., 0], torch.addcmul(a[..., 0] * b[..., 2], a[..., 2], b[..., 0]), ab[..., 2],
                         torch.add(products[..., 1], products[..., 0], alpha=2), torch.addcmul(ga * eb, gb, ea)], -1)
    return (barrier.third @ terms.unsqueeze(-1)).squeeze(-1)


def dual_barrier(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient (..., 3) and Hessian (..., 3, 3) of f* at y in int K_exp^*."""
    barrier = _barrier(y)
    return barrier.shadow.neg(), barrier.hess


def _omega_minus_one(e: torch.Tensor) -> torch.Tensor:
    """d = omega(1 + e) - 1 for e > 0, with omega the Wright omega function (omega + log omega = x):
    the root of d + log(1 + d) = e, solved for d itself so that no digits are lost near the
    cone's boundary (e -> 0). The start e - log(1 + e / 2) is above the root (where d >= e / 2),
    within 9 % of it; Newton's method on the concave, increasing left side steps below the root,
    from where it rises monotonically. Each step d -= (d + log(1 + d) - e) (1 + d) / (2 + d),
    written as a + (d - a) / (2 + d) with a = e - log(1 + d) (five kernels). NaN stays NaN."""
    d = e - torch.log1p(e / 2)
    for _ in range(_OMEGA_STEPS):  # a fixed number of steps: no look from the host
        a = e - torch.log1p(d)
        d = torch.addcdiv(a, d - a, d + 2)
    return d


def _primal_shadow(s: torch.Tensor) -> torch.Tensor:
    """-grad f(s) (..., 3) at s in int K_exp, f the primal barrier (the conjugate of f*): the z in
    int K_exp^* with -grad f*(z) = s. With d = omega - 1 from e = log(s3 / s2) - s1 / s2 > 0 (the
    scaled margin of s): z = (-1 / (s2 d), 1 / s2 + z1 (1 - log(s3 / (s2 omega))), omega / (s3 d)). NaN where e <= 0 in floating point (s within round-off of the boundary), for
    the caller's finiteness check."""
    x, y, z = s.unbind(-1)
    t = x / y
    e = torch.log(z / y) - t
    d = _omega_minus_one(e.masked_fill(e <= 0, torch.nan))
    omega = d + 1
    first = (y * d).reciprocal().neg()
    second = torch.addcmul(y.reciprocal(), first, 1 - torch.log(z / (y * omega)))
    return torch.stack([first, second, omega / (z * d)], -1)


def primal_gradient(s: torch.Tensor) -> torch.Tensor:
    """Gradient (..., 3) at s in int K_exp of the primal barrier f, the conjugate of f* (see
    ``_primal_shadow``; NaN where s is within round-off of the boundary)."""
    return _primal_shadow(s).neg()


def third_derivative(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D^3 f*(y)[a, b] (..., 3) for y in int K_exp^* and directions a, b (..., 3) (``_Barrier``)."""
    return _third(_barrier(y), a, b)


@dataclasses.dataclass(frozen=True)
class ExpScaling:
    """H through V (..., 3, 3) with V^T V = H^-1; grad f*(y), the lower Cholesky factor of
    hess f*(y) and the barrier's derivatives at y (for the corrector); and where H is the
    primal-dual scaling (...,) bool. It has no ``max_step``: the step's longest length has no
    closed form, and the step searches it (``engine.cones.exp_step``)."""

    V: torch.Tensor
    grad: torch.Tensor
    chol: torch.Tensor
    barrier: _Barrier
    primal_dual: torch.Tensor

    def combined_rhs(self, sigma_mu: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor, s: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
        """-s - sigma mu grad f*(y) + 1/2 D^3 f*(y)[dy, hess f*(y)^-1 ds] for the affine direction
        (ds, dy): linearising s + ds = -sigma mu grad f*(y + dy) to second order, with
        hess^-1 ds ~ -mu dy along the affine direction (``s`` is part of the interface shared
        with ``NTScaling``). Where hess f*(y) has no Cholesky factor in floating point (y within
        round-off of the boundary) or the term is not finite, it is left out (as Clarabel does):
        the primal-dual scaling does not need that factor, and the step can still be taken."""
        chol = torch.nan_to_num(self.chol)
        if chol.device.type == "cpu":
            inverse_ds = torch.cholesky_solve(ds.unsqueeze(-1), chol).squeeze(-1)
        else:  # two triangular solves: torch.cholesky_solve's batched MAGMA solve on CUDA synchronises with the host
            half = torch.linalg.solve_triangular(chol, ds.unsqueeze(-1), upper=False)
            inverse_ds = torch.linalg.solve_triangular(chol.mT, half, upper=True).squeeze(-1)
        no_factor = (self.chol - self.chol).sum((-2, -1)).unsqueeze(-1)  # 0, or NaN where hess has no factor
        eta = torch.add(no_factor, _third(self.barrier, dy, inverse_ds), alpha=0.5)  # so that one test covers both
        unusable = (eta - eta).sum(-1, keepdim=True) != 0
        return eta.masked_fill(unusable, 0) - torch.addcmul(s, sigma_mu, self.grad)


def _dual_v(s: torch.Tensor, y: torch.Tensor, sy: torch.Tensor, chol: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """V of the dual scaling H = mu hess + s s^T / <s, y> - mu g g^T / 3 (g = grad f*(y), sy = <s, y>),
    the BFGS update of mu hess f*(y) that makes H y = s hold off the central path too (mu hess y =
    -mu g by logarithmic homogeneity): H^-1 = (I - r y s^T) (mu hess)^-1 (I - r s y^T) + r y y^T
    with r = 1 / <s, y> (the inverse BFGS formula, a congruence plus a positive rank-one term,
    stays positive definite in floating point), written as F F^T with
    F^T = [L^-1 (I - r s y^T) / sqrt(mu); sqrt(r) y^T], L L^T = hess; V is the R of F^T = Q R (R alone:
    ``mode="r"``, the same R without forming Q, 122 against 145 µs for 64 programs' four cones, one
    thread, the Intel Xeon machine, 2026-12-06)."""
    r = sy.reciprocal().unsqueeze(-1)
    eye = identity(3, s.device, s.dtype)
    lower = torch.linalg.solve_triangular(chol, eye - (r * s).unsqueeze(-1) * y.unsqueeze(-2), upper=False)
    Ft = torch.cat([lower / mu.sqrt()[..., None, None], (r.sqrt() * y).unsqueeze(-2)], -2)
    return torch.linalg.qr(Ft, mode="r").R


def _primal_dual_v(s: torch.Tensor, y: torch.Tensor, sy: torch.Tensor,
                   barrier: _Barrier) -> tuple[torch.Tensor, torch.Tensor]:
    """V of the primal-dual scaling and where it is well defined (...,).

    With the shadow iterates s~ = -grad f*(y), z~ = -grad f(s), mu = <s, y> / 3 (this cone's own;
    sy = <s, y>) and mu~ = <s~, z~> / 3 (mu mu~ >= 1, equal on the central path), the differences
    ds = s - mu s~ and dz = y - mu z~ satisfy <ds, y> = <s, dz> = 0, and
    H = s s^T / <s, y> + ds ds^T / <ds, dz> + t a a^T, a the unit vector along y x z~,
    maps y to s and z~ to s~; t = mu |hess - s~ s~^T / 3 - q q^T / (z~' hess z~ - 3 mu~^2)|_F with
    q = mu~ s~ - hess z~ (the scale of mu hess f*(y) on what remains). H = M M^T for
    M = [s / sqrt(<s, y>), ds / sqrt(<ds, dz>), sqrt(t) a], whose inverse has the rows
    y / sqrt(<s, y>), dz / sqrt(<ds, dz>) and b / (sqrt(t) <b, a>), b along s x s~ (each row is
    orthogonal to the other two columns; with c = y x z~, b / <b, a> = (s x s~) |c| / <s x s~, c>):
    V = M^-1, V^T V = H^-1, no factorisation. Since <s x s~, y x z~> = 9 (mu mu~ - 1), V exists
    exactly off the central path."""
    s_shadow, z_shadow, hess = barrier.shadow, _primal_shadow(s), barrier.hess
    mu = (sy / DEGREE).unsqueeze(-1)
    h_z, s_z = (torch.cat([hess, s_shadow.unsqueeze(-2)], -2) @ z_shadow.unsqueeze(-1)).squeeze(-1).split([3, 1], -1)
    mu_shadow = s_z / DEGREE
    d_s = torch.addcmul(s, mu, s_shadow, value=-1)
    d_z = torch.addcmul(y, mu, z_shadow, value=-1)
    curvature = torch.addcmul((z_shadow * h_z).sum(-1, keepdim=True), mu_shadow, mu_shadow, value=-DEGREE)
    minus_q = torch.addcmul(h_z, mu_shadow, s_shadow, value=-1)
    left = torch.stack([s_shadow, minus_q], -1)
    right = torch.stack([s_shadow / DEGREE, minus_q / curvature], -1)
    rest = torch.baddbmm(_flat(hess), _flat(left), _flat(right).mT, alpha=-1)
    t = mu.squeeze(-1) * torch.linalg.matrix_norm(rest).view(mu.shape[:-1])
    c, b = torch.linalg.cross(torch.stack([y, s]), torch.stack([z_shadow, s_shadow])).unbind(0)
    dd, cb = (torch.stack([d_s, c]) * torch.stack([d_z, b])).sum(-1).unbind(0)
    third = b * (torch.linalg.vector_norm(c, dim=-1) / (t.sqrt() * cb)).unsqueeze(-1)
    V = torch.stack([y * sy.rsqrt().unsqueeze(-1), d_z * dd.rsqrt().unsqueeze(-1), third], -2)
    tiny = torch.finfo(s.dtype).eps
    off_path = torch.addcmul(constant(-1 - _CENTRAL_TOL, s), mu, mu_shadow).squeeze(-1)
    margins = torch.stack([off_path, curvature.squeeze(-1).abs() - tiny,
                           sy, dd, t, cb], -1)
    ok = (margins.amin(-1) > 0) & all_finite(V, (-2, -1))
    return V, ok


def exp_scaling(s: torch.Tensor, y: torch.Tensor, mu: torch.Tensor,
                dual_only: torch.Tensor | None = None) -> ExpScaling:
    """s in int K_exp, y in int K_exp^* (..., 3); mu (...,) the program's mu (for the dual scaling);
    ``dual_only`` (...,) bool: cones that take the dual scaling even where the primal-dual one
    is defined (None: none). Both are formed for every cone and merged by ``torch.where``; where
    the host reads for free (the CPU), the dual one only when some cone needs it."""
    barrier = _barrier(y)
    grad = barrier.shadow.neg()
    chol = cholesky_or_nan(barrier.hess)
    sy = (s * y).sum(-1)
    primal_dual, ok = _primal_dual_v(s, y, sy, barrier)
    if dual_only is not None:
        ok = ok & ~dual_only
    if not torch.compiler.is_compiling() and reads_are_free(s.device) and bool(ok.all()):
        return ExpScaling(primal_dual, grad, chol, barrier, ok)
    V = torch.where(ok[..., None, None], primal_dual, _dual_v(s, y, sy, chol, mu))  # primal_dual finite where ok
    return ExpScaling(V, grad, chol, barrier, ok)
