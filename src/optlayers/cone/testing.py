"""Random cone programs with a known, unique solution, for the tests and the benchmarks.

z is drawn block by block so that s = proj_K(z) and y = s - z are strictly complementary with
known face dimensions: half the nonnegative rows active, every second-order and exponential
cone with s and y on the boundary, every PSD cone with Y of rank one. The solution is unique
(and the solution map differentiable) when dim F_y <= n <= m - dim F_s, see ``n_range``.
"""
from __future__ import annotations

import torch

from optlayers.cone import nonneg, product, zero
from optlayers.cone.spec import ConeSpec
from optlayers.engine.cones import svec

ALL_CONES = ConeSpec(zero=3, nonneg=6, soc=[4, 3], psd=[3], exp=2, exp_dual=1)  # m = 31, n in [12, 20]


def n_range(spec: ConeSpec) -> tuple[int, int]:
    """(dim F_y, m - dim F_s): the n for which ``random_program`` has a unique solution."""
    active = spec.nonneg // 2
    curved = len(spec.soc) + spec.exp + spec.exp_dual
    face_y = spec.zero + active + curved + len(spec.psd)
    face_s = (spec.nonneg - active) + curved + sum((d - 1) * d // 2 for d in spec.psd)
    return face_y, spec.size - face_s


def _exp_pair(count: int, gen: torch.Generator, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on the boundaries of K_exp and K_exp^* that are orthogonal, (count, 3) each."""
    rho = 2 * torch.rand(count, generator=gen, dtype=dtype) - 1
    alpha, beta = 0.5 + torch.rand(2, count, generator=gen, dtype=dtype)
    e = torch.exp(rho)
    primal = alpha.unsqueeze(-1) * torch.stack([rho, torch.ones_like(rho), e], -1)
    dual = beta.unsqueeze(-1) * torch.stack([-e, (rho - 1) * e, torch.ones_like(rho)], -1)
    return primal, dual


def random_z(spec: ConeSpec, batch: int, gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """(batch, m) points z whose s = proj_K(z), y = s - z have the faces of the module docstring."""
    parts = []
    for block in spec.blocks():
        shape = (batch, block.count, block.size)
        z = torch.randn(*shape, generator=gen, dtype=dtype)
        name = block.module.__name__.rsplit(".", 1)[-1]
        if name == "nonneg":
            magnitude = z.abs().flatten(1)
            signs = torch.ones_like(magnitude)
            for row in range(batch):
                signs[row, torch.randperm(block.count, generator=gen)[: spec.nonneg // 2]] = -1
            z = (signs * (magnitude + 0.1)).reshape(shape)
        elif name == "soc":
            x = z[..., 1:]
            t = (2 * torch.rand(batch, block.count, generator=gen, dtype=dtype) - 1) * 0.8 * x.norm(dim=-1)
            z = torch.cat([t.unsqueeze(-1), x], -1)
        elif name == "psd":
            d = svec.order(block.size)
            q, _ = torch.linalg.qr(torch.randn(batch, block.count, d, d, generator=gen, dtype=dtype))
            lam = 0.5 + torch.rand(batch, block.count, d, generator=gen, dtype=dtype)
            lam[..., 0] = -lam[..., 0]
            z = svec.mat_to_vec((q * lam.unsqueeze(-2)) @ q.transpose(-1, -2))
        elif name == "exp":
            primal, dual = _exp_pair(batch * block.count, gen, dtype)
            s, y = (dual, primal) if block.dual else (primal, dual)
            z = (s - y).reshape(shape)
        parts.append(z.flatten(1))
    return torch.cat(parts, -1)


def random_program(spec: ConeSpec, n: int, batch: int | None = None, seed: int = 0, quadratic: bool = False,
                   shared_A: bool = False, dtype: torch.dtype = torch.float64):
    """b = A x + s, c = -A^T y - P x for random A, x and the z of ``random_z``.

    Returns (A, b, c, P, x, y, s); batched with a leading dimension unless ``batch`` is None.
    """
    gen = torch.Generator().manual_seed(seed)
    m = spec.size
    size = batch or 1
    z = random_z(spec, size, gen, dtype)
    s = product.project(spec, z)
    y = s - z
    A = torch.randn(1 if shared_A else size, m, n, generator=gen, dtype=dtype)
    x = torch.randn(size, n, generator=gen, dtype=dtype)
    P = None
    if quadratic:
        L = torch.randn(size, n, n, generator=gen, dtype=dtype)
        P = L @ L.transpose(-1, -2) / n
    b = (A @ x.unsqueeze(-1)).squeeze(-1) + s
    c = -(y.unsqueeze(-2) @ A).squeeze(-2) - (0 if P is None else (P @ x.unsqueeze(-1)).squeeze(-1))
    if shared_A:
        A = A[0]
    if batch is None:
        A = A if shared_A else A[0]
        b, c, x, y, s = b[0], c[0], x[0], y[0], s[0]
        P = None if P is None else P[0]
    return A, b, c, P, x, y, s


def random_scalings(spec: ConeSpec, n: int, batch: int, span: float, seed: int = 0,
                    dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """d (batch, n) and e (batch, m) of 10^U(−span, span), e one number per cone on the cones other than
    the zero and nonnegative ones (a positive multiple of a point of a cone is in it): the program
    ``scaled`` by them has the solution x/d, y/e, s·e."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return 10.0 ** ((2 * torch.rand(*shape, generator=gen, dtype=dtype) - 1) * span)
    rows = [draw(batch, block.count * block.size) if block.module in (zero, nonneg)
            else draw(batch, block.count).repeat_interleave(block.size, -1) for block in spec.blocks()]
    return draw(batch, n), torch.cat(rows, -1)


def scaled(A: torch.Tensor, b: torch.Tensor, c: torch.Tensor, P: torch.Tensor | None, d: torch.Tensor,
           e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The program (A, b, c, P) (batched) with its variables scaled by d and its rows by e:
    A' = EAD, b' = Eb, c' = Dc, P' = DPD, whose solution is x/d, y/e, s·e."""
    P = None if P is None else P * d.unsqueeze(-1) * d.unsqueeze(-2)
    return A * e.unsqueeze(-1) * d.unsqueeze(-2), b * e, c * d, P
