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

from optlayers.engine.cones.symmetric import cholesky_or_nan
from optlayers.host import reads_are_free

DEGREE = 3
# Newton steps for the Wright omega function: from the lower bound of ``_omega_minus_one`` the
# relative error is 4e-3, 1e-6, 1e-13, 3e-16 after 1, 2, 3, 4 steps (measured on 1e-12 ... 1e12).
_OMEGA_STEPS = 4
# The primal-dual scaling is used where mu mu~ - 1 (>= 0, zero on the central path) exceeds this
# (Clarabel's threshold, sqrt(eps)): closer to the central path it is 0 / 0 in floating point.
_CENTRAL_TOL = 1.49e-8
# The central point s = y of K_exp and K_exp^* used as the start (Clarabel's choice).
CENTRAL_POINT = (-1.051383945322714, 0.556409619469370, 1.258967884768947)


def in_primal(s: torch.Tensor) -> torch.Tensor:
    """Whether s (..., 3) is in the interior of K_exp = cl{(x, y, z): y > 0, y exp(x / y) <= z}."""
    x, y, z = s.unbind(-1)
    inside = (y > 0) & (z > 0)
    safe_y, safe_z = torch.where(inside, y, torch.ones_like(y)), torch.where(inside, z, torch.ones_like(z))
    return inside & (safe_y * torch.log(safe_z / safe_y) - x > 0)


def in_dual(y: torch.Tensor) -> torch.Tensor:
    """Whether y (..., 3) is in the interior of K_exp^*."""
    u, v, w = y.unbind(-1)
    inside = (u < 0) & (w > 0)
    safe_u, safe_w = torch.where(inside, u, -torch.ones_like(u)), torch.where(inside, w, torch.ones_like(w))
    return inside & (safe_u * torch.log(-safe_u / safe_w) - safe_u + v > 0)


def dual_barrier(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient (..., 3) and Hessian (..., 3, 3) of f* at y in int K_exp^*."""
    u, v, w = y.unbind(-1)
    psi = u * torch.log(-u / w) - u + v
    dpsi = torch.stack([torch.log(-u / w), torch.ones_like(u), -u / w], -1)
    zero = torch.zeros_like(u)
    d2psi = torch.stack([torch.stack([1 / u, zero, -1 / w], -1), torch.stack([zero, zero, zero], -1),
                         torch.stack([-1 / w, zero, u / (w * w)], -1)], -2)
    grad = -dpsi / psi.unsqueeze(-1) + torch.stack([-1 / u, zero, -1 / w], -1)
    hess = (dpsi.unsqueeze(-1) * dpsi.unsqueeze(-2) / (psi * psi)[..., None, None] - d2psi / psi[..., None, None]
            + torch.diag_embed(torch.stack([1 / (u * u), zero, 1 / (w * w)], -1)))
    return grad, hess


def _omega_minus_one(e: torch.Tensor) -> torch.Tensor:
    """d = omega(1 + e) - 1 for e > 0, with omega the Wright omega function (omega + log omega = x):
    the root of d + log(1 + d) = e, solved for d itself so that no digits are lost near the
    cone's boundary (e -> 0). The start max(e / 2, e - log(1 + e)) is below the root, from where
    Newton's method on the concave, increasing left side rises monotonically."""
    d = torch.maximum(e / 2, e - torch.log1p(e))
    for _ in range(_OMEGA_STEPS):  # a fixed number of steps: no look from the host
        d = d - (d + torch.log1p(d) - e) / (1 + 1 / (1 + d))
    return d


def primal_gradient(s: torch.Tensor) -> torch.Tensor:
    """Gradient (..., 3) at s in int K_exp of the primal barrier f, the conjugate of f*: the z in
    int K_exp^* with -grad f*(z) = s is -grad f(s). With d = omega - 1 from
    e = log(s3 / s2) - s1 / s2 > 0 (the scaled margin of s):
    z = (-1 / (s2 d), 1 / s2 + z1 (1 - log(s3 / (s2 omega))), omega / (s3 d)). NaN where e <= 0
    in floating point (s within round-off of the boundary), for the caller's finiteness check."""
    x, y, z = s.unbind(-1)
    e = torch.log(z / y) - x / y
    d = torch.where(e > 0, _omega_minus_one(e.clamp_min(0)), torch.nan)
    first = -1 / (y * d)
    second = 1 / y + first * (1 - torch.log(z / (y * (1 + d))))
    return -torch.stack([first, second, (1 + d) / (z * d)], -1)


def third_derivative(y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """D^3 f*(y)[a, b] (..., 3) for y in int K_exp^* and directions a, b (..., 3).

    With psi = u log(-u / w) - u + v, g = grad psi and M = hess psi (closed forms),
    f* = -log psi - log(-u) - log w gives ((a'Mb) psi - 2 (g'a)(g'b)) / psi^3 g
    + ((g'b) M a + (g'a) M b) / psi^2 - grad(a'Mb) / psi - 2 (a1 b1 / u^3, 0, a3 b3 / w^3)."""
    u, v, w = y.unbind(-1)
    psi = u * torch.log(-u / w) - u + v
    g = torch.stack([torch.log(-u / w), torch.ones_like(u), -u / w], -1)
    zero = torch.zeros_like(u)

    def m_times(d: torch.Tensor) -> torch.Tensor:
        return torch.stack([d[..., 0] / u - d[..., 2] / w, zero, (u * d[..., 2] / w - d[..., 0]) / w], -1)

    a1, a3, b1, b3 = a[..., 0], a[..., 2], b[..., 0], b[..., 2]
    ga, gb = (g * a).sum(-1), (g * b).sum(-1)
    amb = (a * m_times(b)).sum(-1)
    grad_amb = torch.stack([a3 * b3 / (w * w) - a1 * b1 / (u * u), zero,
                            ((a1 * b3 + a3 * b1) - 2 * u * a3 * b3 / w) / (w * w)], -1)
    logs = -2 * torch.stack([a1 * b1 / (u * u * u), zero, a3 * b3 / (w * w * w)], -1)
    psi_ = psi.unsqueeze(-1)
    return (((amb * psi - 2 * ga * gb) / (psi * psi * psi)).unsqueeze(-1) * g
            + (gb.unsqueeze(-1) * m_times(a) + ga.unsqueeze(-1) * m_times(b)) / (psi_ * psi_)
            - grad_amb / psi_ + logs)


@dataclasses.dataclass(frozen=True)
class ExpScaling:
    """H through V (..., 3, 3) with V^T V = H^-1; grad f*(y), the lower Cholesky factor of
    hess f*(y) and y (for the corrector); and where H is the primal-dual scaling (...,) bool."""

    V: torch.Tensor
    grad: torch.Tensor
    chol: torch.Tensor
    y: torch.Tensor
    primal_dual: torch.Tensor

    def combined_rhs(self, sigma_mu: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor, s: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
        """-s - sigma mu grad f*(y) + 1/2 D^3 f*(y)[dy, hess f*(y)^-1 ds] for the affine direction
        (ds, dy): linearising s + ds = -sigma mu grad f*(y + dy) to second order, with
        hess^-1 ds ~ -mu dy along the affine direction (``s`` is part of the interface shared
        with ``NTScaling``). Where hess f*(y) has no Cholesky factor in floating point (y within
        round-off of the boundary) or the term is not finite, it is left out (as Clarabel does):
        the primal-dual scaling does not need that factor, and the step can still be taken."""
        inverse_ds = torch.cholesky_solve(ds.unsqueeze(-1), torch.nan_to_num(self.chol)).squeeze(-1)
        eta = third_derivative(self.y, dy, inverse_ds) / 2
        usable = self.chol.isfinite().flatten(-2).all(-1, keepdim=True) & eta.isfinite().all(-1, keepdim=True)
        return -s - sigma_mu * self.grad + torch.where(usable, eta, torch.zeros_like(eta))

    def max_step(self, s: torch.Tensor, y: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """No closed form: the caller backtracks on ``in_primal`` / ``in_dual``."""
        return torch.full(s.shape[:-1], torch.inf, dtype=s.dtype, device=s.device)


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


def _dual_v(s: torch.Tensor, y: torch.Tensor, chol: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """V of the dual scaling H = mu hess + s s^T / <s, y> - mu g g^T / 3 (g = grad f*(y)), the
    BFGS update of mu hess f*(y) that makes H y = s hold off the central path too (mu hess y =
    -mu g by logarithmic homogeneity): H^-1 = (I - r y s^T) (mu hess)^-1 (I - r s y^T) + r y y^T
    with r = 1 / <s, y> (the inverse BFGS formula, a congruence plus a positive rank-one term,
    stays positive definite in floating point), written as F F^T with
    F = [(I - r y s^T) C, sqrt(r) y], C C^T = (mu hess)^-1; V is the R of F^T = Q R."""
    eye = torch.eye(3, dtype=s.dtype, device=s.device).expand_as(chol)
    C = torch.linalg.solve_triangular(chol, eye, upper=False).mT / mu.sqrt()[..., None, None]
    r = 1 / (s * y).sum(-1, keepdim=True)
    MC = C - (r * y).unsqueeze(-1) * (s.unsqueeze(-2) @ C)
    F = torch.cat([MC, (r.sqrt() * y).unsqueeze(-1)], -1)
    return torch.linalg.qr(F.mT).R


def _primal_dual_v(s: torch.Tensor, y: torch.Tensor, grad: torch.Tensor,
                   hess: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """V of the primal-dual scaling and where it is well defined (...,).

    With the shadow iterates s~ = -grad f*(y), z~ = -grad f(s), mu = <s, y> / 3 (this cone's own)
    and mu~ = <s~, z~> / 3 (mu mu~ >= 1, equal on the central path), the differences
    ds = s - mu s~ and dz = y - mu z~ satisfy <ds, y> = <s, dz> = 0, and
    H = s s^T / <s, y> + ds ds^T / <ds, dz> + t a a^T, a the unit vector along y x z~,
    maps y to s and z~ to s~; t = mu |hess - s~ s~^T / 3 - q q^T / (z~' hess z~ - 3 mu~^2)|_F with
    q = mu~ s~ - hess z~ (the scale of mu hess f*(y) on what remains). H = M M^T for
    M = [s / sqrt(<s, y>), ds / sqrt(<ds, dz>), sqrt(t) a], whose inverse has the rows
    y / sqrt(<s, y>), dz / sqrt(<ds, dz>) and b / (sqrt(t) <b, a>), b the unit vector along
    s x s~ (each row is orthogonal to the other two columns): V = M^-1, V^T V = H^-1, no
    factorisation. Since <s x s~, y x z~> = 9 (mu mu~ - 1), V exists exactly off the central path."""
    s_shadow, z_shadow = -grad, -primal_gradient(s)
    sy = (s * y).sum(-1)
    mu = sy / DEGREE
    mu_shadow = (s_shadow * z_shadow).sum(-1) / DEGREE
    d_s = s - mu.unsqueeze(-1) * s_shadow
    d_z = y - mu.unsqueeze(-1) * z_shadow
    dd = (d_s * d_z).sum(-1)
    h_z = (hess @ z_shadow.unsqueeze(-1)).squeeze(-1)
    curvature = (z_shadow * h_z).sum(-1) - DEGREE * mu_shadow * mu_shadow
    q = mu_shadow.unsqueeze(-1) * s_shadow - h_z
    rest = (hess - s_shadow.unsqueeze(-1) * s_shadow.unsqueeze(-2) / DEGREE
            - q.unsqueeze(-1) * q.unsqueeze(-2) / curvature[..., None, None])
    t = mu * torch.linalg.matrix_norm(rest)
    a, b = _unit(torch.linalg.cross(y, z_shadow)), _unit(torch.linalg.cross(s, s_shadow))
    ba = (a * b).sum(-1)
    V = torch.stack([y / sy.sqrt().unsqueeze(-1), d_z / dd.sqrt().unsqueeze(-1),
                     b / (t.sqrt() * ba).unsqueeze(-1)], -2)
    tiny = torch.finfo(s.dtype).eps
    ok = ((mu * mu_shadow - 1 > _CENTRAL_TOL) & (curvature.abs() > tiny) & (sy > 0) & (dd > 0) & (t > 0)
          & (ba > 0) & V.isfinite().flatten(-2).all(-1))
    return V, ok


def exp_scaling(s: torch.Tensor, y: torch.Tensor, mu: torch.Tensor,
                dual_only: torch.Tensor | None = None) -> ExpScaling:
    """s in int K_exp, y in int K_exp^* (..., 3); mu (...,) the program's mu (for the dual scaling);
    ``dual_only`` (...,) bool: cones that take the dual scaling even where the primal-dual one
    is defined (None: none). Both are formed for every cone and merged by ``torch.where``; where
    the host reads for free (the CPU), the dual one only when some cone needs it."""
    grad, hess = dual_barrier(y)
    chol = cholesky_or_nan(hess)
    primal_dual, ok = _primal_dual_v(s, y, grad, hess)
    if dual_only is not None:
        ok = ok & ~dual_only
    if reads_are_free(s.device) and bool(ok.all()):
        return ExpScaling(primal_dual, grad, chol, y, ok)
    V = torch.where(ok[..., None, None], torch.nan_to_num(primal_dual), _dual_v(s, y, chol, mu))
    return ExpScaling(V, grad, chol, y, ok)
