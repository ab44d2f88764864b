"""torch's batched Cholesky, triangular solve and product against numpy's on the same matrices.

torch's CPU wheels call MKL for LAPACK and BLAS; numpy's and scipy's wheels call OpenBLAS. The large
rows of the QP sweep are mostly these calls, so their speed on a machine bounds ours there, while
a peer built on its own kernels (QPLayer on Eigen) is not bound by them. One thread each, best of
five rounds; milliseconds per call on a batch of symmetric positive definite matrices.

    OPENBLAS_NUM_THREADS=1 python -m benchmarks.blas_backends [--batch 128] [--n 100] [--repeats 10]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: the benchmarks package
from benchmarks import machine  # noqa: E402


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    """The fastest of five rounds of ``repeats`` calls, in milliseconds per call (after one call)."""
    fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best * 1e3


def measure(batch: int, n: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Milliseconds per call of each operation with torch and with numpy / scipy (one thread)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((batch, n, 2 * n))
    H = X @ X.transpose(0, 2, 1) + np.eye(n)
    b = rng.standard_normal((batch, n, 1))
    Ht, bt = torch.from_numpy(H), torch.from_numpy(b)
    Lt, Ln = torch.linalg.cholesky(Ht), np.linalg.cholesky(H)
    return {
        "cholesky_torch": best_ms(lambda: torch.linalg.cholesky_ex(Ht), repeats),
        "cholesky_numpy": best_ms(lambda: np.linalg.cholesky(H), repeats),
        "triangular_solve_torch": best_ms(lambda: torch.linalg.solve_triangular(Lt, bt, upper=False), repeats),
        "triangular_solve_scipy": best_ms(lambda: [scipy.linalg.solve_triangular(Ln[i], b[i], lower=True, check_finite=False)
                                                   for i in range(batch)], repeats),
        "product_torch": best_ms(lambda: torch.bmm(Ht, Ht), repeats),
        "product_numpy": best_ms(lambda: np.matmul(H, H), repeats),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    for name in ("batch", "n", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    torch.set_num_threads(1)  # numpy's and scipy's OpenBLAS: set OPENBLAS_NUM_THREADS=1 before starting Python
    times = measure(args.batch, args.n, args.repeats)
    print(f"{machine.cpu_model()}, torch {torch.__version__}, numpy {np.__version__}; "
          f"batch {args.batch}, n = {args.n}, float64, ms per call")
    for op in ("cholesky", "triangular_solve", "product"):
        other = "scipy" if op == "triangular_solve" else "numpy"
        t, o = times[f"{op}_torch"], times[f"{op}_{other}"]
        print(f"{op:<17} torch {t:8.3f}   {other} {o:8.3f}   torch / {other} {t / o:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
