"""A small demonstration: solve a batch of random QPs, differentiate through them, check both.

    python -m optlayers.demo
"""
from __future__ import annotations

import time

import torch

from optlayers import QPStatus, solve_qp


# Finite differences with step ε see solution errors magnified by 1/ε, so the demo solves to
# near machine precision.
_TIGHT = 1e-13


def random_feasible_qps(batch: int, n: int, k: int, m: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The OptNet paper's random QPs: Q = LLᵀ/n + 1e-3 I, h = G z₀ + s₀, b = A z₀."""
    opts = dict(dtype=torch.float64, generator=generator)
    L = torch.randn(batch, n, n, **opts)
    z0 = torch.randn(batch, n, 1, **opts)
    G = torch.randn(batch, k, n, **opts)
    A = torch.randn(batch, m, n, **opts)
    return {
        "Q": L @ L.transpose(-1, -2) / n + 1e-3 * torch.eye(n, dtype=torch.float64),
        "p": torch.randn(batch, n, **opts),
        "G": G,
        "h": (G @ z0).squeeze(-1) + torch.rand(batch, k, **opts),
        "A": A,
        "b": (A @ z0).squeeze(-1),
    }


def run_demo(batch: int = 64, n: int = 50, k: int = 50, m: int = 5, seed: int = 0) -> None:
    """Solve ``batch`` QPs with n variables, k inequalities, m equalities; print what happened."""
    data = random_feasible_qps(batch, n, k, m, torch.Generator().manual_seed(seed))
    data["p"].requires_grad_()
    data["h"].requires_grad_()
    start = time.perf_counter()
    sol = solve_qp(**data, tol=_TIGHT)
    solved_at = time.perf_counter()
    loss = sol.z.square().sum()
    loss.backward()
    done = time.perf_counter()
    solved = int((sol.status == QPStatus.SOLVED).sum())
    print(f"optlayers demo: {batch} random QPs, n = {n} variables, {k} inequalities, {m} equalities (float64, CPU, tol = {_TIGHT:g})")
    print(f"  forward : {solved}/{batch} solved in {1e3 * (solved_at - start):.1f} ms, "
          f"{int(sol.iterations.min())}-{int(sol.iterations.max())} interior point iterations")
    print(f"  accuracy: max primal residual {float(sol.primal_residual.max()):.1e}, "
          f"dual residual {float(sol.dual_residual.max()):.1e}, gap {float(sol.gap.max()):.1e}")
    print(f"  active  : {float((sol.lam > 1e-6).float().sum(-1).mean()):.1f} of {k} inequalities on average")
    print(f"  backward: d(sum z²)/dp and d(sum z²)/dh in {1e3 * (done - solved_at):.1f} ms")

    # Finite differences need every constraint strictly active or strictly inactive: where λᵢ
    # and sᵢ both vanish the solution map has a kink and no derivative to compare with.
    clear = torch.maximum(sol.lam, sol.s).amin(-1) > 1e-3
    direction = torch.randn_like(data["h"]) * clear.unsqueeze(-1)
    eps = 1e-5
    with torch.no_grad():
        up = solve_qp(**{**data, "h": data["h"] + eps * direction}, tol=_TIGHT).z.square().sum()
        down = solve_qp(**{**data, "h": data["h"] - eps * direction}, tol=_TIGHT).z.square().sum()
    finite_difference = float((up - down) / (2 * eps))
    analytic = float((data["h"].grad * direction).sum())
    print(f"  check   : directional derivative along a random dh ({int(clear.sum())} QPs without weakly active "
          f"constraints): implicit {analytic:.8f}, finite differences {finite_difference:.8f} "
          f"(relative difference {abs(analytic - finite_difference) / abs(finite_difference):.1e})")


if __name__ == "__main__":
    run_demo()
