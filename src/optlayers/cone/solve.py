"""The public entry point: solve_cone."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from optlayers.cone.autograd import ConeProgram, Settings
from optlayers.cone import backends
from optlayers.cone.interior.solver import IPMSettings
from optlayers.cone.linsolve import MODES
from optlayers.cone.refine import MAX_STEPS as REFINE_STEPS
from optlayers.cone.spec import ConeSpec
from optlayers.cone.status import ON_FAILURE_CHOICES, apply_failure_policy
from optlayers.cone.validation import check_choice, validate


SOLVERS = ("ipm",) + backends.SOLVERS


@dataclasses.dataclass(frozen=True)
class ConeSolution:
    """Primal x (B, n), dual y (B, m), slack s (B, m) and per-element ``status`` (B,) int64 ConeStatus.

    Unbatched inputs give unbatched outputs. Failed elements are NaN in x, y, s.
    """

    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    status: torch.Tensor


def solve_cone(A, b, c, cones: ConeSpec, P=None, *, solver: str = "clarabel", mode: str = "dense",
               on_failure: str = "raise", solver_options: dict | None = None,
               warm_start: ConeSolution | None = None, max_workers: int | None = None,
               refine_steps: int = REFINE_STEPS) -> ConeSolution:
    """Solve min c^T x + 1/2 x^T P x  s.t.  A x + s = b, s in K, differentiably in A, b, c, P.

    Args:
        A: (m, n) shared or (B, m, n); dense tensor, torch sparse (CSR/COO, shared only) or scipy sparse.
        b: (m,) or (B, m).
        c: (n,) or (B, n).
        cones: the cone K (SCS order and conventions), covering the m rows.
        P: optional (n, n) or (B, n, n) PSD matrix; its symmetric part is used.
        solver: "ipm" (the batched interior point method of ``optlayers.cone.interior``, on the
            data's device, CPU or CUDA; elements it leaves unsolved go to Clarabel), "clarabel"
            (interior point, element by element in threads) or "scs" (splitting; uses ``warm_start``).
            On two CPU cores "ipm" is level with "clarabel" at ~128 problems per batch, ahead from a
            few hundred and 2-3x slower at 16 (BENCHMARKS.md); it is the path that stays on a GPU.
        mode: the derivative's linear solve: "dense" (batched LU, CPU or CUDA), or "lsqr"/"lsmr"
            (matrix-free, element by element, for large sparse problems; reverse mode only:
            forward mode, torch.func.jvp, always uses the dense solve).
        on_failure: "raise", "warn" or "ignore" when an element is not solved.
        solver_options: passed to the solver (IPMSettings fields for "ipm", Clarabel settings
            attributes, SCS keyword arguments).
        warm_start: a previous solution of the same shapes (used by SCS).
        max_workers: threads for the batch (default: all cores).
        refine_steps: Newton steps on the residual map after the solver (0 to skip), see refine.py.

    Returns:
        ConeSolution with x (B, n), y (B, m), s (B, m), status (B,); x, y, s differentiable
        (reverse mode and torch.func.jvp). Shared A and P receive the sum of per-element gradients.
    """
    check_choice("solver", solver, SOLVERS)
    check_choice("mode", mode, MODES)
    check_choice("on_failure", on_failure, ON_FAILURE_CHOICES)
    for name, value, least in (("refine_steps", refine_steps, 0), ("max_workers", max_workers, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise ValueError(f"{name} must be an int >= {least}{' or None' if name == 'max_workers' else ''}, "
                             f"got {value!r}")
    if solver == "ipm":
        known = {field.name for field in dataclasses.fields(IPMSettings)}
        unknown = sorted(set(solver_options or {}) - known)
        if unknown:
            raise ValueError(f"solver_options for solver='ipm' must be IPMSettings fields {sorted(known)}, "
                             f"got {unknown}")
    data = validate(A, b, c, P, cones)
    warm = None
    if warm_start is not None:
        expected = (data.b.shape[0] * data.c.shape[-1], data.b.numel(), data.b.numel())
        given = tuple(t.numel() for t in (warm_start.x, warm_start.y, warm_start.s))
        if given != expected:
            raise ValueError(f"warm_start must be a solution of the same shapes: x, y, s with {expected} "
                             f"entries, got {given}")
        x0, y0, s0 = (t.detach().cpu().double().reshape(data.b.shape[0], -1).numpy()
                      for t in (warm_start.x, warm_start.y, warm_start.s))
        warm = tuple(None if not np.isfinite(x0[i]).all() else (x0[i], y0[i], s0[i]) for i in range(len(x0)))
    settings = Settings(cones, solver, mode, dict(solver_options or {}), warm, max_workers, refine_steps)
    # The solvers, the refinement and the derivative all work in float64; outputs follow the inputs' dtype.
    wide = [None if t is None else t.to(torch.float64) for t in (data.A, data.b, data.c, data.P)]
    x, y, s, status, _, _ = ConeProgram.apply(*wide, settings)
    x, y, s = (t.to(data.b.dtype) for t in (x, y, s))
    apply_failure_policy(status, on_failure)
    if data.batch is None:
        x, y, s, status = x[0], y[0], s[0], status[0]
    return ConeSolution(x, y, s, status)


class ConeLayer(torch.nn.Module):
    """A thin ``nn.Module`` around ``solve_cone`` for a fixed cone and fixed solver settings.

    Args:
        cones: the cone K.
        **options: keyword arguments of ``solve_cone`` (solver, mode, on_failure, solver_options, ...).

    Shape:
        forward(A, b, c, P=None) with the shapes of ``solve_cone``; returns a ``ConeSolution``.

    Example:
        >>> layer = ConeLayer(ConeSpec(zero=1, nonneg=2), solver="scs")
        >>> sol = layer(A, b, c)
    """

    def __init__(self, cones: ConeSpec, **options):
        super().__init__()
        if not isinstance(cones, ConeSpec):
            raise TypeError(f"cones must be a ConeSpec, got {type(cones).__name__}")
        for name in options:
            if name not in _LAYER_OPTIONS:
                raise TypeError(f"unknown option {name!r}; expected one of {_LAYER_OPTIONS}")
        self.cones, self.options = cones, options

    def forward(self, A, b, c, P=None) -> ConeSolution:
        return solve_cone(A, b, c, self.cones, P, **self.options)

    def extra_repr(self) -> str:
        return f"cones={self.cones}" + "".join(f", {k}={v!r}" for k, v in self.options.items())


_LAYER_OPTIONS = ("solver", "mode", "on_failure", "solver_options", "max_workers", "refine_steps")
