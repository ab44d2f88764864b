"""Public entry points of the QP layer: ``solve_qp`` and the qpth-compatible ``QPFunction``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from optlayers.qp.autograd import QPSolveFn
from optlayers.qp.ipm import default_settings
from optlayers.qp.problem import prepare_qp
from optlayers.qp.status import ON_FAILURE_CHOICES


@dataclass(frozen=True)
class QPSolution:
    """Solution of a batch of QPs; batch shape ``...`` is the broadcast of the inputs' batch shapes.

    Attributes:
        z: (..., n) primal solution (differentiable).
        lam: (..., k) inequality multipliers, ≥ 0 (differentiable).
        nu: (..., m) equality multipliers (differentiable).
        s: (..., k) slacks h − Gz ≥ 0 (differentiable).
        status: (...,) ``QPStatus`` codes; elements not ``SOLVED`` hold NaN in z, lam, nu, s.
        iterations: (...,) interior point iterations taken.
        primal_residual, dual_residual, gap: (...,) final residuals of the original problem
            (infinity norms; gap = |zᵀQz + pᵀz + bᵀν + hᵀλ|, at least sᵀλ).
    """

    z: Tensor
    lam: Tensor
    nu: Tensor
    s: Tensor
    status: Tensor
    iterations: Tensor
    primal_residual: Tensor
    dual_residual: Tensor
    gap: Tensor


def _check_options(tol: float | None, rel_tol: float | None, max_iter: int | None, on_failure: str) -> None:
    for name, value in (("tol", tol), ("rel_tol", rel_tol)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name} must be a non-negative number or None, got {value!r}")
    if tol is not None and rel_tol is not None and tol == 0 and rel_tol == 0:
        raise ValueError("tol and rel_tol cannot both be 0")
    if max_iter is not None and not (isinstance(max_iter, int) and not isinstance(max_iter, bool) and max_iter >= 1):
        raise ValueError(f"max_iter must be a positive integer or None, got {max_iter!r}")
    if on_failure not in ON_FAILURE_CHOICES:
        raise ValueError(f"on_failure must be one of {ON_FAILURE_CHOICES}, got {on_failure!r}")


def solve_qp(
    Q: Tensor,
    p: Tensor,
    G: Tensor | None = None,
    h: Tensor | None = None,
    A: Tensor | None = None,
    b: Tensor | None = None,
    *,
    tol: float | None = None,
    rel_tol: float | None = None,
    max_iter: int | None = None,
    on_failure: str = "raise",
) -> QPSolution:
    """Solve minimize ½zᵀQz + pᵀz subject to Az = b, Gz ≤ h, batched and differentiably.

    Args:
        Q: (..., n, n) symmetric positive semidefinite (singular and zero allowed).
        p: (..., n).
        G, h: (..., k, n) and (..., k) inequality constraints, or None.
        A, b: (..., m, n) and (..., m) equality constraints, or None.
        tol: absolute tolerance on the primal residual, dual residual and gap (default 1e-12 for
            float64 data, 1e-10 for float32; the iteration itself always runs in float64).
        rel_tol: relative tolerance (default: ``tol``).
        max_iter: iteration limit (default 100).
        on_failure: "raise" (``QPSolveError`` naming the failed elements), "warn" or "ignore";
            failed elements hold NaN, the others are unaffected.

    Each argument has its own batch dimensions or none; they broadcast like torch. Gradients of
    a shared argument are summed over the batch. Device and dtype follow the inputs.

    Example:
        >>> sol = solve_qp(torch.eye(2), torch.tensor([1.0, -1.0]), G=torch.eye(2), h=torch.zeros(2))
        >>> sol.z
        tensor([-1.,  0.])
    """
    _check_options(tol, rel_tol, max_iter, on_failure)
    flat, batch = prepare_qp(Q, p, G, h, A, b)
    settings = default_settings(flat[1].dtype, tol, rel_tol, max_iter)
    keep_factor = torch.is_grad_enabled() and any(t.requires_grad for t in flat)
    out = QPSolveFn.apply(*flat, settings, keep_factor, on_failure, tuple(batch))
    z, lam, nu, s, status, iterations, primal, dual, gap = (t.reshape((*batch, *t.shape[1:])) for t in out[:9])
    return QPSolution(z, lam, nu, s, status, iterations, primal, dual, gap)


class QPFunction(nn.Module):
    """Drop-in replacement for ``qpth.qp.QPFunction``: ``QPFunction()(Q, p, G, h, A, b)`` returns z.

    Args:
        tol, max_iter, on_failure: as in ``solve_qp``.

    Shape:
        Q (..., n, n), p (..., n), G (..., k, n), h (..., k), A (..., m, n), b (..., m); absent
        constraints as None or empty tensors. Output z (..., n).

    Example:
        >>> layer = QPFunction()
        >>> z = layer(Q, p, G, h, None, None)
    """

    def __init__(self, tol: float | None = None, max_iter: int | None = None, on_failure: str = "raise"):
        super().__init__()
        _check_options(tol, None, max_iter, on_failure)
        self.tol, self.max_iter, self.on_failure = tol, max_iter, on_failure

    def forward(self, Q: Tensor, p: Tensor, G: Tensor | None = None, h: Tensor | None = None,
                A: Tensor | None = None, b: Tensor | None = None) -> Tensor:
        return solve_qp(Q, p, G, h, A, b, tol=self.tol, max_iter=self.max_iter, on_failure=self.on_failure).z

    def extra_repr(self) -> str:
        return f"tol={self.tol}, max_iter={self.max_iter}, on_failure={self.on_failure!r}"
