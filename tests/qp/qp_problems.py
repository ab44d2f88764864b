"""Random QPs with known feasibility, and an independent reference solver (Clarabel)."""
from __future__ import annotations

import numpy as np
import torch


def random_qp(batch: tuple[int, ...], n: int, k: int, m: int, *, rank: int | None = None, active: bool = False,
              dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor | None]:
    """Feasible QP data: Q = LLᵀ/n (+1e-3 I unless ``rank`` is given), h = Gz₀ + s₀, b = Az₀.

    ``active`` makes half of the inequalities active at z₀ = solution by choosing p accordingly.
    """
    r = n if rank is None else rank
    L = torch.randn(*batch, n, r, dtype=dtype)
    Q = L @ L.transpose(-1, -2) / n
    if rank is None:
        Q = Q + 1e-3 * torch.eye(n, dtype=dtype)
    G = torch.randn(*batch, k, n, dtype=dtype)
    A = torch.randn(*batch, m, n, dtype=dtype)
    z0 = torch.randn(*batch, n, dtype=dtype)
    s0 = torch.rand(*batch, k, dtype=dtype) + 0.1
    if active:
        s0[..., : k // 2] = 0.0
        lam0 = torch.zeros(*batch, k, dtype=dtype)
        lam0[..., : k // 2] = torch.rand(*batch, k // 2, dtype=dtype) + 0.5
        nu0 = torch.randn(*batch, m, dtype=dtype)
        p = -(Q @ z0.unsqueeze(-1)).squeeze(-1) - (G.transpose(-1, -2) @ lam0.unsqueeze(-1)).squeeze(-1) - (A.transpose(-1, -2) @ nu0.unsqueeze(-1)).squeeze(-1)
    else:
        p = torch.randn(*batch, n, dtype=dtype)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + s0
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    return {"Q": Q, "p": p, "G": G if k else None, "h": h if k else None, "A": A if m else None, "b": b if m else None}


def clarabel_solve(Q, p, G=None, h=None, A=None, b=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Solve one QP with Clarabel at tight tolerances; returns z, λ, ν."""
    import clarabel
    import scipy.sparse as sp

    n = p.shape[-1]
    G = np.zeros((0, n)) if G is None else G.detach().numpy()
    h = np.zeros(0) if h is None else h.detach().numpy()
    A = np.zeros((0, n)) if A is None else A.detach().numpy()
    b = np.zeros(0) if b is None else b.detach().numpy()
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = 1e-12
    settings.tol_ktratio = 1e-10
    solver = clarabel.DefaultSolver(
        sp.csc_matrix(np.triu(Q.detach().numpy())), p.detach().numpy(), sp.csc_matrix(np.vstack([A, G])),
        np.concatenate([b, h]), [clarabel.ZeroConeT(len(b)), clarabel.NonnegativeConeT(len(h))], settings,
    )
    result = solver.solve()
    assert str(result.status) == "Solved", result.status
    y = np.asarray(result.z)
    return np.asarray(result.x), y[len(b):], y[: len(b)]


def box_qp(batch: int, n: int, m: int) -> dict[str, torch.Tensor]:
    """min ½zᵀQz + pᵀz s.t. Az = b, l ≤ z ≤ u with a diagonal Q that is singular in places (an LP
    in those variables), a feasible point strictly inside the box, and bounds active at the solution."""
    q = torch.rand(batch, n) + 0.1
    q[:, ::3] = 0.0
    lower, upper = -torch.rand(batch, n) - 0.5, torch.rand(batch, n) + 0.5
    inside = lower + (upper - lower) * (0.25 + 0.5 * torch.rand(batch, n))
    A = torch.randn(batch, m, n)
    eye = torch.eye(n).expand(batch, n, n)
    return {"Q": torch.diag_embed(q), "p": 3 * torch.randn(batch, n), "G": torch.cat([eye, -eye], dim=-2),
            "h": torch.cat([upper, -lower], dim=-1), "A": A, "b": (A @ inside.unsqueeze(-1)).squeeze(-1)}


def generic_qps() -> tuple[torch.Tensor, ...]:
    """Q, p, G, h, A, b and a weight w (float64) of 8 random QPs (n = 6, 10 inequalities, 2 equalities)
    with a strictly feasible z₀: generic, non-degenerate optima."""
    torch.manual_seed(0)
    B, n, k, m = 8, 6, 10, 2
    L = torch.randn(B, n, n, dtype=torch.float64)
    Q, G, A = L @ L.mT + 0.1 * torch.eye(n), torch.randn(B, k, n, dtype=torch.float64), torch.randn(B, m, n, dtype=torch.float64)
    z0 = torch.randn(B, n, 1, dtype=torch.float64)
    h = (G @ z0).squeeze(-1) + 0.1 + torch.rand(B, k, dtype=torch.float64)
    b, p, w = (A @ z0).squeeze(-1), torch.randn(B, n, dtype=torch.float64), torch.randn(B, n, dtype=torch.float64)
    return Q, p, G, h, A, b, w
