"""The core QP solver (optlayers.solve_qp) vs the same QPs as cone programs (solve_qp_cone).

For each scenario, both methods solve the same batch; we report forward and backward times,
how many elements each solved, its worst KKT residual, and how far its solution and gradients
are from the other method's. Prints a table and writes JSON.

    PYTHONPATH=src python benchmarks/compare_qp_cone.py --out compare_qp_cone.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import time

import torch

from optlayers import solve_qp
from optlayers.cone.qp import solve_qp_cone

BATCH, N, M_EQ, K_INEQ = 64, 40, 10, 60
GRAD_AGREE = 1e-3  # elements whose gradients differ by more than this are counted


def random_qp(seed: int, rank: int = N, duplicate_rows: int = 0, row_scale: float = 1.0, infeasible: bool = False):
    """(Q, p, G, h, A, b), batch BATCH: Q of the given rank (+0 ridge if rank < N), a strictly
    feasible-or-active start z0, optional duplicated inequality rows, row scaling and one infeasible element."""
    gen = torch.Generator().manual_seed(seed)
    L = torch.randn(BATCH, N, rank, generator=gen, dtype=torch.float64)
    Q = L @ L.transpose(-1, -2) / N
    z0 = torch.randn(BATCH, N, generator=gen, dtype=torch.float64)
    G = torch.randn(BATCH, K_INEQ - duplicate_rows, N, generator=gen, dtype=torch.float64)
    if duplicate_rows:
        G = torch.cat([G, G[:, :duplicate_rows]], 1)
    G = G * row_scale ** torch.linspace(0, 1, K_INEQ, dtype=torch.float64).unsqueeze(-1)
    active = torch.rand(BATCH, K_INEQ, generator=gen, dtype=torch.float64) > 0.5
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(BATCH, K_INEQ, generator=gen, dtype=torch.float64) * active
    if duplicate_rows:
        h[:, K_INEQ - duplicate_rows:] = h[:, :duplicate_rows]
    A = torch.randn(BATCH, M_EQ, N, generator=gen, dtype=torch.float64)
    b = (A @ z0.unsqueeze(-1)).squeeze(-1)
    p = torch.randn(BATCH, N, generator=gen, dtype=torch.float64) * 3
    if infeasible:
        G[0, 1], h[0, 1] = -G[0, 0], -h[0, 0] - 1  # g z <= h and -g z <= -h - 1 cannot both hold
    return Q, p, G, h, A, b


SCENARIOS = {
    "random (Q full rank)": dict(),
    "singular Q (rank 5)": dict(rank=5),
    "duplicated inequality rows (degenerate)": dict(duplicate_rows=10),
    "rows scaled 1 .. 1e4": dict(row_scale=1e4),
    "one infeasible element": dict(infeasible=True),
}


def kkt_residual(data, z, lam, nu) -> torch.Tensor:
    """Worst of stationarity, primal feasibility and complementarity per element (inf norms)."""
    Q, p, G, h, A, b = data
    mv = lambda M, v: (M @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    stat = (mv(Q, z) + p + mv(A.transpose(-1, -2), nu) + mv(G.transpose(-1, -2), lam)).abs().amax(-1)
    feas = torch.maximum((mv(A, z) - b).abs().amax(-1), (mv(G, z) - h).clamp_min(0).amax(-1))
    comp = (lam * (h - mv(G, z))).abs().amax(-1)
    return torch.stack([stat, feas, comp]).amax(0)


def run(method, data, v, repeats: int = 2):
    """Forward and backward times (the faster of ``repeats`` runs: the first also pays one-off
    set-up costs), the solution and the gradients."""
    forwards, backwards = [], []
    for _ in range(repeats):
        leaves = [t.clone().requires_grad_() for t in data]
        start = time.perf_counter()
        sol = method(*leaves)
        forwards.append(time.perf_counter() - start)
        ok = sol.status == 0
        start = time.perf_counter()
        (torch.where(ok.unsqueeze(-1), sol.z, 0) * v).sum().backward()
        backwards.append(time.perf_counter() - start)
    return sol, [t.grad for t in leaves], min(forwards), min(backwards), ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads for all methods (default: torch's, one per core)")
    parser.add_argument("--out", default="compare_qp_cone.json")
    args = parser.parse_args()
    if args.threads != torch.get_num_threads():  # torch.set_num_threads also breaks batched LU with more than
        torch.set_num_threads(args.threads)  # one thread on MKL builds (pytorch/pytorch#142815): only when asked
    methods = {
        "solve_qp (core IPM)": lambda *d: solve_qp(*d, on_failure="ignore"),
        "solve_qp_cone ipm": lambda *d: solve_qp_cone(*d, solver="ipm", on_failure="ignore"),
        "solve_qp_cone clarabel": lambda *d: solve_qp_cone(*d, solver="clarabel", on_failure="ignore"),
        "solve_qp_cone scs": lambda *d: solve_qp_cone(*d, solver="scs", on_failure="ignore"),
    }
    rows = []
    header = (f"{'scenario':42s} {'method':24s} {'fwd s':>7s} {'bwd s':>7s} {'solved':>7s} {'max KKT res':>11s} "
              f"{'max |z - z_qp|':>14s} {'max |grad - grad_qp|':>20s} {'#grad diff>1e-3':>15s}")
    print(header)
    for scenario, kwargs in SCENARIOS.items():
        data = random_qp(seed=0, **kwargs)
        v = torch.randn(BATCH, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        results = {name: run(fn, data, v) for name, fn in methods.items()}
        ref_sol, ref_grads, _, _, ref_ok = results["solve_qp (core IPM)"]
        for name, (sol, grads, fwd, bwd, ok) in results.items():
            both = ok & ref_ok
            res = kkt_residual(data, sol.z.detach(), sol.lam.detach(), sol.nu.detach())[ok]
            dz = (sol.z - ref_sol.z).detach()[both].abs().max() if both.any() else torch.tensor(float("nan"))
            per_element = torch.stack([(g - r).flatten(1).abs().amax(1) for g, r in zip(grads, ref_grads)]).amax(0)
            dg = float(per_element[both].max()) if both.any() else float("nan")
            far = int((per_element[both] > GRAD_AGREE).sum())
            row = {"scenario": scenario, "method": name, "forward_s": fwd, "backward_s": bwd,
                   "solved": int(ok.sum()), "batch": BATCH, "max_kkt_residual": float(res.max()) if ok.any() else None,
                   "max_z_diff": float(dz.detach()), "max_grad_diff": dg, "grad_disagree": far, "statuses": sol.status.tolist()}
            rows.append(row)
            print(f"{scenario:42s} {name:24s} {fwd:7.3f} {bwd:7.3f} {int(ok.sum()):4d}/{BATCH:<2d} "
                  f"{row['max_kkt_residual'] or float('nan'):11.1e} {float(dz):14.1e} {dg:20.1e} {far:15d}")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "batch": BATCH,
            "n": N, "m_eq": M_EQ, "k_ineq": K_INEQ, "threads": args.threads, "torch": torch.__version__}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
