"""Random batched QPs from the OptNet paper (Amos & Kolter, 2017, Section 5.1), the one generator the benchmark uses."""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

REGULARIZATION = 1e-3
"""The paper's Q = L Lᵀ / n + 1e-3 I keeps every Q strictly positive definite."""


@dataclass(frozen=True)
class QPBatch:
    """minimize ½ zᵀQz + pᵀz s.t. A z = b, G z ≤ h, for each batch element; A, b are None without equalities."""

    Q: torch.Tensor
    p: torch.Tensor
    G: torch.Tensor
    h: torch.Tensor
    A: torch.Tensor | None = None
    b: torch.Tensor | None = None

    @property
    def batch(self) -> int:
        return self.p.shape[0]

    @property
    def n(self) -> int:
        return self.p.shape[1]

    @property
    def n_ineq(self) -> int:
        return self.h.shape[1]

    @property
    def n_eq(self) -> int:
        return 0 if self.b is None else self.b.shape[1]

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> QPBatch:
        """The same problems with every tensor moved to ``dtype`` and ``device``."""
        return self.map(lambda t: t.to(dtype=dtype, device=device))

    def map(self, fn) -> QPBatch:
        """Apply ``fn`` to every present tensor."""
        return replace(self, **{f.name: fn(getattr(self, f.name)) for f in fields(self) if getattr(self, f.name) is not None})

    def subset(self, count: int) -> QPBatch:
        """The first ``count`` batch elements."""
        return self.map(lambda t: t[:count])

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """(Q, p, G, h, A, b) in qpth's argument order."""
        return self.Q, self.p, self.G, self.h, self.A, self.b


def random_qp(batch: int, n: int, n_ineq: int, n_eq: int = 0, *, seed: int = 0) -> QPBatch:
    """Feasible, strictly convex random QPs in float64 on the CPU.

    Q = L Lᵀ / n + 1e-3 I with L standard normal (symmetrised exactly: CPLEX checks); G (and A) standard normal; h = G z₀ + s₀ with
    s₀ ~ U(0, 1) > 0 and b = A z₀, so z₀ is strictly feasible for the inequalities.
    """
    gen = torch.Generator().manual_seed(seed)
    kw = {"generator": gen, "dtype": torch.float64}
    L = torch.randn(batch, n, n, **kw)
    LLt = L @ L.mT
    Q = (LLt + LLt.mT) / (2 * n) + REGULARIZATION * torch.eye(n, dtype=torch.float64)
    p = torch.randn(batch, n, **kw)
    G = torch.randn(batch, n_ineq, n, **kw)
    z0 = torch.randn(batch, n, **kw)
    s0 = torch.rand(batch, n_ineq, **kw)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    if n_eq == 0:
        return QPBatch(Q, p, G, h)
    A = torch.randn(batch, n_eq, n, **kw)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return QPBatch(Q, p, G, h, A, b)


def with_a_large_variable(Q: torch.Tensor, p: torch.Tensor, G: torch.Tensor, h: torch.Tensor, A: torch.Tensor,
                          b: torch.Tensor, beta: float) -> tuple[torch.Tensor, ...]:
    """The flat QPs (B, ·) with one more variable z_big, decoupled from the others (its row and
    column of Q the identity's, no constraint on it) and pushed to β by its cost −β: the solution is
    the QPs' own with z_big = β, and so are the derivatives w.r.t. the QPs' own data."""
    B, n = p.shape
    Q2 = torch.zeros(B, n + 1, n + 1, dtype=Q.dtype)
    Q2[:, :n, :n], Q2[:, n, n] = Q, 1.0
    p2 = torch.cat([p, torch.full((B, 1), -beta, dtype=p.dtype)], -1)

    def widen(M: torch.Tensor) -> torch.Tensor:
        return torch.cat([M, torch.zeros(B, M.shape[1], 1, dtype=M.dtype)], -1)
    return Q2, p2, widen(G), h, widen(A), b


def qps_with_equalities(seed: int, slack=lambda gen, shape: torch.rand(*shape, generator=gen, dtype=torch.float64),
                        B: int = 32, n: int = 8, k: int = 12, m: int = 2) -> tuple[torch.Tensor, ...]:
    """Random strictly convex QPs (Q, p, G, h, A, b), float64, whose point z₀ of unit size holds the
    m equalities and leaves the k inequalities the slacks ``slack(generator, (B, k))`` (U(0, 1) by
    default); Q = LLᵀ/n + 1e-2 I."""
    gen = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    L = draw(B, n, n)
    Q = L @ L.mT / n + 1e-2 * torch.eye(n, dtype=torch.float64)
    G, z0, A, p = draw(B, k, n), draw(B, n, 1), draw(B, m, n), draw(B, n)
    return Q, p, G, (G @ z0).squeeze(-1) + slack(gen, (B, k)), A, (A @ z0).squeeze(-1)
