"""Nesterov–Todd scaling of the symmetric cones (nonnegative, second-order, PSD) for the interior point method.

For s in int K and y in int K* = K there is a linear W (here a dense (k, k) matrix per cone) with
W y = W^-T s = lambda. The linearised complementarity lambda o (W dy + W^-T ds) = d (o the Jordan
product of the cone) is then ds + W^T W dy = W^T (lambda \\ d), and the Newton system needs only
V = W^-T (V^T V = (W^T W)^-1) to eliminate dy. Each cone kind supplies W, W^-1 and its Jordan
algebra; see Vandenberghe, "The CVXOPT linear and quadratic cone program solvers" (2010).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from optlayers.engine.cones import svec
from optlayers.engine.constants import constant, identity, made_once
from optlayers.host import reads_are_free
from optlayers.linalg import symmetric_eigenvalues


def _mv(M: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """M (..., k, k) times v (..., k); for k = 1 a broadcast product (many 1 x 1 matrix products are slow)."""
    if M.shape[-1] == 1:
        return M[..., 0] * v
    return (M @ v.unsqueeze(-1)).squeeze(-1)


def all_finite(x: torch.Tensor, dims: int | tuple[int, ...] = -1, keepdim: bool = False) -> torch.Tensor:
    """Whether all entries of x over ``dims`` are finite: x - x is 0 exactly where x is finite
    and NaN elsewhere (three kernels, where ``isfinite`` and ``all`` take five)."""
    return (x - x).sum(dims, keepdim=keepdim) == 0


def cholesky_or_nan(M: torch.Tensor) -> torch.Tensor:
    """Lower Cholesky factor, NaN where M is not (numerically) positive definite, so that the
    failure reaches the Newton system's finiteness check instead of raising."""
    chol, info = torch.linalg.cholesky_ex(M)
    return chol.masked_fill((info != 0)[..., None, None], torch.nan)


@made_once
def _soc_signs(k: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For second-order cones of k rows: the diagonal j = (1, -1, ..., -1) of J, the unit
    e = (1, 0, ..., 0) and the signs j j^T (k, k); made once per size, device and dtype (as
    normal tensors even when first asked for under ``torch.inference_mode``)."""
    j = -torch.ones(k, dtype=torch.float64)
    j[0] = 1
    e = torch.zeros(k, dtype=torch.float64)
    e[0] = 1
    return j.to(device, dtype), e.to(device, dtype), torch.outer(j, j).to(device, dtype)


@dataclasses.dataclass(frozen=True)
class Jordan:
    """The Jordan algebra of one cone kind on vectors (..., k): product, division lambda \\ d, unit e."""

    product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    divide: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    unit: Callable[[torch.Tensor], torch.Tensor]
    max_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # largest alpha with x + alpha dx in K
    # (inf if none), (...,), for x an NT-scaled point lambda: any interior point of the nonnegative
    # and second-order cones, a diagonal positive definite matrix on the PSD cone (no factorisation)


def _nonneg_step(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    ratio = torch.where(dx < 0, -x / dx.clamp(max=-torch.finfo(x.dtype).tiny), torch.full_like(x, torch.inf))
    return ratio.amin(-1)


NONNEG = Jordan(product=lambda a, b: a * b, divide=lambda lam, d: d / lam, unit=torch.ones_like,
                max_step=_nonneg_step)


def _soc_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a o b = (a^T b, a0 b1 + b0 a1)."""
    head = (a * b).sum(-1, keepdim=True)
    return torch.cat([head, torch.addcmul(a[..., :1] * b[..., 1:], b[..., :1], a[..., 1:])], -1)


@made_once
def _soc_j(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """J = diag(1, -1, ..., -1) (k, k), made once per size, device and dtype."""
    return torch.diag(_soc_signs(k, device, dtype)[0])


def _soc_divide(lam: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """u with lam o u = d: the inverse of the arrow matrix of lam: u0 = (J lam)^T d / (lam^T J lam),
    u1 = (d1 - u0 lam1) / lam0."""
    j_lam = lam * _soc_signs(lam.shape[-1], lam.device, lam.dtype)[0]
    dots = (j_lam.unsqueeze(-2) @ torch.stack([d, lam], -1)).squeeze(-2)  # (J lam)^T d, lam^T J lam
    u0 = dots[..., :1] / dots[..., 1:]
    return torch.cat([u0, torch.addcmul(d[..., 1:], u0, lam[..., 1:], value=-1) / lam[..., :1]], -1)


def _soc_unit(v: torch.Tensor) -> torch.Tensor:
    return _soc_signs(v.shape[-1], v.device, v.dtype)[1].expand(v.shape)


def _soc_step(x: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """The smallest alpha > 0 with (x0 + a dx0)^2 = ||x1 + a dx1||^2, from x inside the cone."""
    j = _soc_signs(x.shape[-1], x.device, x.dtype)[0]
    return _soc_step_from(x, ((x * j) * x).sum(-1), dx)


def _soc_step_from(x: torch.Tensor, quad: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``_soc_step`` with x's x^T J x = ``quad`` given: the smallest positive root of
    a alpha^2 + 2 b alpha + quad, a = dx^T J dx, b = x^T J dx, is quad / (sqrt(b^2 - a quad) - b)
    where that is positive; where it is not (NaN: no real root; negative or -0: both roots
    negative) the step is unbounded. (From an interior point, quad > 0: a < 0 gives a positive
    discriminant and root; a >= 0 gives one only where b < 0.)"""
    j = _soc_signs(x.shape[-1], x.device, x.dtype)[0]
    a_b = (torch.stack([dx, x], -2) @ (dx * j).unsqueeze(-1)).squeeze(-1)  # (..., 2): a, b
    a, half_b = a_b.unbind(-1)
    root = quad / (torch.sqrt(torch.addcmul(half_b * half_b, a, quad, value=-1)) - half_b)
    return torch.where(root > 0, root, constant(torch.inf, root))


SOC = Jordan(product=_soc_product, divide=_soc_divide, unit=_soc_unit, max_step=_soc_step)


def _psd_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """svec((A B + B A) / 2), B A = (A B)^T for symmetric A, B."""
    product = svec.vec_to_mat(a) @ svec.vec_to_mat(b)
    return svec.mat_to_vec((product + product.mT) / 2)


@made_once
def _svec_diagonal(k: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For PSD cones of k = d(d+1)/2 rows: the positions (d,) of the diagonal entries in svec, the
    (d, k) matrix that takes a diagonal to its svec (ones at those positions), and the (d, k)
    matrix that takes a diagonal l to the sums l_i + l_j of each svec entry's row and column;
    made once per size, device and dtype (as normal tensors even under ``torch.inference_mode``)."""
    d = svec.order(k)
    lower = torch.triu_indices(d, d)  # column by column: (row, column) = (lower[1], lower[0])
    rows, cols = lower[1], lower[0]
    positions = torch.tensor([j * d - j * (j - 1) // 2 for j in range(d)])  # column j starts after d + (d - 1) + ... + (d - j + 1)
    to_svec = torch.zeros(d, k, dtype=torch.float64)
    to_svec[torch.arange(d), positions] = 1
    sums = torch.zeros(d, k, dtype=torch.float64)
    sums[rows, torch.arange(k)] += 1
    sums[cols, torch.arange(k)] += 1
    return positions.to(device), to_svec.to(device, dtype), sums.to(device, dtype)


def _psd_divide(lam: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """U with (L U + U L) / 2 = D for a diagonal L = mat(lam) (the scaled point is diagonal):
    U_ij = 2 D_ij / (l_i + l_j), entry by entry of svec (the svec scaling cancels)."""
    positions, _, sums = _svec_diagonal(lam.shape[-1], lam.device, lam.dtype)
    return 2 * d / (lam[..., positions] @ sums)


@made_once
def _psd_identity(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """svec of the identity of order d (k = d(d+1)/2 rows), made once per size, device and dtype
    (as a normal tensor even under ``torch.inference_mode``)."""
    return svec.mat_to_vec(torch.eye(svec.order(k), dtype=dtype, device=device))


def _psd_unit(v: torch.Tensor) -> torch.Tensor:
    return _psd_identity(v.shape[-1], v.device, v.dtype).expand(v.shape)


def _psd_step(lam: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Largest alpha with L + alpha dX PSD for a diagonal positive definite L = mat(lam): from the
    least eigenvalue of L^-1/2 dX L^-1/2."""
    root = svec.vec_to_mat(lam).diagonal(dim1=-2, dim2=-1).rsqrt()
    return _psd_step_from(root.unsqueeze(-1) * root.unsqueeze(-2), dx)


def _psd_step_from(scale: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """``_psd_step`` with the entries l_i^-1/2 l_j^-1/2 of L^-1/2 (.) L^-1/2 given (``scale``): -1 / the
    least eigenvalue where that is positive, else unbounded."""
    inner = svec.vec_to_mat(dx) * scale
    # LAPACK raises on NaN: non-finite entries (of an element whose step is not finite, which fails) as 0
    finite = torch.nan_to_num(inner, nan=0.0, posinf=0.0, neginf=0.0)
    step = symmetric_eigenvalues(finite)[..., 0].reciprocal().neg()
    return torch.where(step > 0, step, constant(torch.inf, step))


def _psd_step_within(scale: torch.Tensor, dx: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """``_psd_step_from`` where only steps shorter than ``bound`` (B,) matter, for dx (j, B, count,
    k): ``bound`` where I + bound L^-1/2 dX L^-1/2 is positive definite for every j (a Cholesky
    factorisation, a tenth of a symmetric eigenvalue solve's cost per small matrix: the step
    there is at least ``bound``), the step itself for the other elements (B, count). Reads on
    the host which elements those are (where that is free)."""
    inner = svec.vec_to_mat(dx) * scale
    shifted = torch.addcmul(identity(inner.shape[-1], inner.device, inner.dtype), bound[:, None, None, None], inner)
    beyond = torch.linalg.cholesky_ex(shifted)[1] == 0
    short = (~beyond.all(-1).all(0)).nonzero().squeeze(-1)  # the elements whose step may be shorter
    steps = bound.unsqueeze(-1).expand(dx.shape[1:3])
    if short.numel() == 0:
        return steps
    return steps.index_put((short,), _psd_step_from(scale[short], dx[:, short]).amin(0))


PSD = Jordan(product=_psd_product, divide=_psd_divide, unit=_psd_unit, max_step=_psd_step)


@dataclasses.dataclass(frozen=True)
class NTScaling:
    """W, W^-1 (..., k, k) and lambda = W y (..., k) for one kind of symmetric cone."""

    W: torch.Tensor
    W_inv: torch.Tensor
    lam: torch.Tensor
    algebra: Jordan
    step_from: tuple = ()  # for ``max_step``: second-order cones (s, y) stacked and their x^T J x,
    # PSD cones the scale of L^-1/2 (.) L^-1/2 (``_psd_step_from``)

    @property
    def V(self) -> torch.Tensor:
        """W^-T, with V^T V = (W^T W)^-1: scales the cone rows of the Newton system."""
        return self.W_inv.mT

    def combined_rhs(self, sigma_mu: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor, s: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
        """q for the Mehrotra corrector: W^T (lambda \\ (sigma mu e - lambda o lambda - (W^-T ds) o (W dy)))."""
        lam, j = self.lam, self.algebra
        products = j.product(torch.stack([lam, _mv(self.V, ds)]), torch.stack([lam, _mv(self.W, dy)])).sum(0)
        return _mv(self.W.mT, j.divide(lam, sigma_mu * j.unit(lam) - products))

    def max_step(self, s: torch.Tensor, y: torch.Tensor, ds: torch.Tensor, dy: torch.Tensor,
                 bound: torch.Tensor | None = None) -> torch.Tensor:
        """Largest step keeping s + a ds and y + a dy in the cone (...,). The nonnegative and
        second-order cones' step tests take any interior point, and measure from s and y
        themselves; the PSD cone's needs a diagonal point, and measures both from lambda (W and V
        are automorphisms of the cone: lambda + a V ds = W^-T (s + a ds), lambda + a W dy = W (y + a dy)).
        ``bound`` (B,) for (B, count, k) points: the caller takes the least of this step and
        ``bound``, and the PSD cone's step is ``bound`` itself where it is no shorter (tested by
        ``_psd_step_within`` where the host's reads are free)."""
        if self.algebra is PSD:
            along = torch.stack([_mv(self.V, ds), _mv(self.W, dy)])
            if self.step_from and bound is not None and not torch.compiler.is_compiling() and reads_are_free(s.device):
                return _psd_step_within(*self.step_from, along, bound)
            if self.step_from:
                return _psd_step_from(*self.step_from, along).amin(0)
            return self.algebra.max_step(self.lam, along).amin(0)
        if self.step_from:
            return _soc_step_from(*self.step_from, torch.stack([ds, dy])).amin(0)
        return self.algebra.max_step(torch.stack([s, y]), torch.stack([ds, dy])).amin(0)


def nonneg_scaling(s: torch.Tensor, y: torch.Tensor) -> NTScaling:
    """s, y (..., 1): W = sqrt(s / y)."""
    w = torch.sqrt(s / y)
    return NTScaling(w.unsqueeze(-1), (1 / w).unsqueeze(-1), torch.sqrt(s * y), NONNEG)


def soc_scaling(s: torch.Tensor, y: torch.Tensor) -> NTScaling:
    """s, y (..., k) inside the second-order cone: W = eta (2 v v^T - J), J = diag(1, -I), and
    W^-1 = (2 J v v^T J - J) / eta = J W J / eta^2."""
    j, e, signs = _soc_signs(s.shape[-1], s.device, s.dtype)
    J = _soc_j(s.shape[-1], s.device, s.dtype)
    point = torch.stack([s, y])
    quad = ((point * j) * point).sum(-1)  # s^T J s, y^T J y
    norms = quad.clamp_min(0).sqrt().unsqueeze(-1)
    s_bar, y_bar = (point / norms).unbind(0)
    two_gamma = torch.sqrt(2 * (1 + (s_bar * y_bar).sum(-1, keepdim=True)))  # 2 gamma
    w = torch.addcmul(s_bar, y_bar, j) / two_gamma  # the scaling point: eta^2 P(w) y = s, P the quadratic representation
    w_e = w + e
    v = w_e / torch.sqrt(2 * w_e[..., :1])  # its Jordan square root: W = eta P(v)
    ratio = (norms[0] / norms[1]).unsqueeze(-1)  # eta^2
    flat = v.reshape(-1, v.shape[-1], 1)
    W = ratio.sqrt() * torch.baddbmm(J, flat, flat.mT, alpha=2, beta=-1).view(*v.shape, v.shape[-1])
    return NTScaling(W, W * (signs / ratio), _mv(W, y), SOC, (point, quad))


@made_once
def _svec_basis(k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The svec basis matrices E_i of PSD cones of k rows, row by row as vec(E_i) (k, d^2); made
    once per size, device and dtype (as a normal tensor even under ``torch.inference_mode``)."""
    basis = svec.vec_to_mat(torch.eye(k, dtype=dtype, device=device))
    return basis.reshape(k, -1).clone()


def psd_scaling(s: torch.Tensor, y: torch.Tensor) -> NTScaling:
    """s, y (..., d(d+1)/2) positive definite: W(Y) = R^T Y R with R R^T Y R R^T = S, as (k, k) matrices on svec."""
    chol_s, chol_y = cholesky_or_nan(svec.vec_to_mat(torch.stack([s, y]))).unbind(0)
    product = chol_y.mT @ chol_s
    eye = torch.eye(product.shape[-1], dtype=s.dtype, device=s.device)
    failed = (product - product).sum((-2, -1), keepdim=True) != 0  # not all finite
    u, sing, vh = torch.linalg.svd(torch.where(failed, eye, product))
    root = sing.rsqrt()
    R = (chol_s @ vh.mT * root.unsqueeze(-2)).masked_fill(failed, torch.nan)
    R_inv = root.unsqueeze(-1) * u.mT @ chol_y.mT  # L_y^T L_s = U S V^T gives R = L_y^-T U S^1/2: no inverse
    basis = _svec_basis(s.shape[-1], s.device, s.dtype)  # rows vec(E_i)
    lam = sing @ _svec_diagonal(s.shape[-1], s.device, s.dtype)[1]  # svec of diag(sing)
    W, W_inv = _congruence(torch.stack([R, R_inv]), basis).unbind(0)  # both by one product each way
    return NTScaling(W, W_inv, lam, PSD, (root.unsqueeze(-1) * root.unsqueeze(-2),))


def _congruence(R: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """The (..., k, k) matrix of X -> R^T X R on svec: basis (R^T kron R^T) basis^T, basis (k, d^2)
    holding the svec basis matrices E_i row by row (vec(R^T X R) = (R^T kron R^T) vec(X), row-major)."""
    d = R.shape[-1]
    Rt = R.mT
    kron = (Rt[..., :, None, :, None] * Rt[..., None, :, None, :]).reshape(*R.shape[:-2], d * d, d * d)
    return basis @ kron @ basis.mT
