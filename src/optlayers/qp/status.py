"""Per-element solver outcome and the failure policy applied at the public boundary."""
from __future__ import annotations

import enum
import warnings

import torch


class QPStatus(enum.IntEnum):
    """Outcome of one QP in a batch; ``sol.status`` holds these as integers."""

    SOLVED = 0
    MAX_ITER = 1
    PRIMAL_INFEASIBLE = 2
    DUAL_INFEASIBLE = 3
    NUMERICAL_ERROR = 4

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    QPStatus.SOLVED: "solved to the requested tolerance",
    QPStatus.MAX_ITER: "reached max_iter before the tolerance was met; increase `max_iter` or loosen `tol`",
    QPStatus.PRIMAL_INFEASIBLE: "primal infeasible: no z satisfies A z = b and G z <= h (a Farkas certificate was found)",
    QPStatus.DUAL_INFEASIBLE: "dual infeasible: the objective is unbounded below on the feasible set",
    QPStatus.NUMERICAL_ERROR: "numerical error: the KKT system could not be factorised or the iterates stopped progressing; "
    "check the scaling of the data, or solve in float64",
}

ON_FAILURE_CHOICES = ("raise", "warn", "ignore")


class QPSolveError(RuntimeError):
    """Raised by ``on_failure="raise"`` when some batch elements were not solved."""

    def __init__(self, message: str, status: torch.Tensor):
        super().__init__(message)
        self.status = status


def describe_failures(status: torch.Tensor, max_listed: int = 10) -> str:
    """A sentence naming the failed batch elements (multi-indices) and why."""
    failed = (status != QPStatus.SOLVED).nonzero().tolist()
    parts = []
    for index in failed[:max_listed]:
        code = QPStatus(int(status[tuple(index)]))
        parts.append(f"element {tuple(index) if len(index) != 1 else index[0]}: {code.name.lower()} ({code.message})")
    more = f"; and {len(failed) - max_listed} more" if len(failed) > max_listed else ""
    return f"{len(failed)} of {status.numel()} QPs were not solved: " + "; ".join(parts) + more


def apply_failure_policy(status: torch.Tensor, on_failure: str) -> None:
    """Raise, warn or stay silent about failed elements, as ``on_failure`` asks."""
    if not bool((status != QPStatus.SOLVED).any()):
        return
    if on_failure == "raise":
        raise QPSolveError(describe_failures(status), status)
    if on_failure == "warn":
        warnings.warn(describe_failures(status) + " Their outputs are NaN.", RuntimeWarning, stacklevel=2)
