"""Per-element outcome of a cone program and the failure policy at the public boundary."""
from __future__ import annotations

import enum
import warnings

import torch

from optlayers.qp.status import ON_FAILURE_CHOICES

__all__ = ["ConeStatus", "ConeSolveError", "ON_FAILURE_CHOICES", "apply_failure_policy", "describe_failures"]


class ConeStatus(enum.IntEnum):
    """Outcome of one cone program in a batch; ``sol.status`` holds these as integers."""

    SOLVED = 0
    INACCURATE = 1
    MAX_ITER = 2
    PRIMAL_INFEASIBLE = 3
    DUAL_INFEASIBLE = 4
    NUMERICAL_ERROR = 5

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    ConeStatus.SOLVED: "solved to the requested tolerance",
    ConeStatus.INACCURATE: "solved only to reduced accuracy: the relative KKT residual after refinement is above "
    "1e-6 (or the solver said AlmostSolved / solved_inaccurate); rescale the data, tighten the solver's "
    "tolerance in solver_options, or try the other solver",
    ConeStatus.MAX_ITER: "reached the iteration or time limit; raise `max_iter`/`max_iters` in solver_options",
    ConeStatus.PRIMAL_INFEASIBLE: "primal infeasible: no x satisfies A x + s = b with s in K (certificate found)",
    ConeStatus.DUAL_INFEASIBLE: "dual infeasible: the objective is unbounded below on the feasible set",
    ConeStatus.NUMERICAL_ERROR: "numerical error in the solver; check the scaling of A, b, c, "
    "or try solver='scs' / solver='clarabel'",
}


class ConeSolveError(RuntimeError):
    """Raised by ``on_failure="raise"`` when some batch elements were not solved."""

    def __init__(self, message: str, status: torch.Tensor):
        super().__init__(message)
        self.status = status


def describe_failures(status: torch.Tensor, max_listed: int = 10) -> str:
    """A sentence naming the failed batch elements, grouped by reason."""
    failed = status != ConeStatus.SOLVED
    parts = []
    for code in ConeStatus:
        where = (status == code).nonzero().flatten().tolist()
        if code == ConeStatus.SOLVED or not where:
            continue
        listed = ", ".join(map(str, where[:max_listed])) + (f" and {len(where) - max_listed} more" if len(where) > max_listed else "")
        parts.append(f"{code.name.lower()} (elements {listed}): {code.message}")
    return f"{int(failed.sum())} of {status.numel()} cone programs were not solved: " + "; ".join(parts)


def apply_failure_policy(status: torch.Tensor, on_failure: str) -> None:
    """Raise, warn or stay silent about failed elements, as ``on_failure`` asks."""
    if not bool((status != ConeStatus.SOLVED).any()):
        return
    if on_failure == "raise":
        raise ConeSolveError(describe_failures(status.flatten()), status)
    if on_failure == "warn":
        warnings.warn(describe_failures(status.flatten()) + " Their outputs are NaN.", RuntimeWarning, stacklevel=3)
