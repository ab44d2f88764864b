"""The exponential cone in the interior point method: dual-barrier scaling (as in ECOS).

The exponential cone is not symmetric, so there is no Nesterov–Todd scaling. Its iterates
follow the central path s = -mu grad f*(y) of the dual barrier

    f*(u, v, w) = -log(u log(-u / w) - u + v) - log(-u) - log(w)     (degree 3)

of K_exp^* = cl{(u, v, w): u < 0, -u exp(v / u) <= e w}; the linearisation is
ds + mu hess f*(y) dy = -s - sigma mu grad f*(y) (Serrano, "Algorithms for unsymmetric cone
optimization and an implementation for problems with the exponential cone", 2015), corrected
so that the scaling maps y to s (see ``ExpScaling``).
"""
from __future__ import annotations

import dataclasses

import torch

from optlayers.cone.interior.symmetric import cholesky_or_nan

DEGREE = 3
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


@dataclasses.dataclass(frozen=True)
class ExpScaling:
    """H through V (..., 3, 3) with V^T V = H^-1, and grad f*(y).

    H = mu hess f*(y) + s s^T / <s, y> - mu g g^T / 3 with g = grad f*(y) is the BFGS update of
    the dual scaling mu hess f*(y) that makes H y = s hold off the central path as well
    (mu hess f*(y) y = -mu g by the logarithmic homogeneity of f*), so that the affine step
    reduces <s, y> as on a symmetric cone; without it the iterates drift to the boundary and the
    steps vanish. Its inverse is formed by the inverse BFGS formula, a congruence plus a
    positive rank-one term, which stays positive definite in floating point near the solution.
    """

    V: torch.Tensor
    grad: torch.Tensor

    def combined_rhs(self, sigma_mu: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor, s: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
        """-s - sigma mu grad f*(y) (the affine directions ds, dy and y are part of the interface
        shared with ``NTScaling``). (A second-order term -mu/2 D^3 f*(y)[dy, dy] along the affine
        direction, the analogue of Mehrotra's correction, did not lower the iteration count.)"""
        return -s - sigma_mu * self.grad

    def max_step(self, s: torch.Tensor, y: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """No closed form: the caller backtracks on ``in_primal`` / ``in_dual``."""
        return torch.full(s.shape[:-1], torch.inf, dtype=s.dtype, device=s.device)


def exp_scaling(s: torch.Tensor, y: torch.Tensor, mu: torch.Tensor) -> ExpScaling:
    """s in int K_exp, y in int K_exp^* (..., 3); mu (...,).

    H^-1 = (I - r y s^T) (mu hess)^-1 (I - r s y^T) + r y y^T with r = 1 / <s, y>, written as
    F F^T with F = [(I - r y s^T) C, sqrt(r) y], C C^T = (mu hess)^-1; V is the R of F^T = Q R.
    """
    grad, hess = dual_barrier(y)
    chol = cholesky_or_nan(hess)
    eye = torch.eye(3, dtype=s.dtype, device=s.device).expand_as(hess)
    C = torch.linalg.solve_triangular(chol, eye, upper=False).mT / mu.sqrt()[..., None, None]
    r = 1 / (s * y).sum(-1, keepdim=True)
    MC = C - (r * y).unsqueeze(-1) * (s.unsqueeze(-2) @ C)
    F = torch.cat([MC, (r.sqrt() * y).unsqueeze(-1)], -1)
    return ExpScaling(torch.linalg.qr(F.mT).R, grad)
