"""One status vocabulary for every solver in the package (QP and cone), and the failure policy
applied at the public boundary: raise, warn, or stay silent about elements that were not solved.

``QPStatus`` (``optlayers.qp.status``) and ``ConeStatus`` (``optlayers.cone.status``) are this
``Status``; ``QPSolveError`` and ``ConeSolveError`` are this ``SolveError``.
"""
from __future__ import annotations

import dataclasses
import enum
import functools
import math
import operator
import os
import sys
import warnings

import torch

__all__ = ["FailurePolicy", "ON_FAILURE_CHOICES", "SolveError", "Status", "apply_failure_policy", "describe_failures"]


class Status(enum.IntEnum):
    """Outcome of one problem in a batch; solutions hold these as integers in ``status``."""

    SOLVED = 0
    MAX_ITER = 1
    PRIMAL_INFEASIBLE = 2
    DUAL_INFEASIBLE = 3
    NUMERICAL_ERROR = 4
    INACCURATE = 5

    @property
    def message(self) -> str:
        return _MESSAGES[self]


_MESSAGES = {
    Status.SOLVED: "solved to the requested tolerance",
    Status.MAX_ITER: "reached the iteration (or time) limit before the tolerance was met; increase `max_iter` "
    "(solve_qp, QPFunction, the OptNet layers) or the solver's limit in `solver_options` (solve_cone), "
    "or loosen the tolerance",
    Status.PRIMAL_INFEASIBLE: "primal infeasible: no point satisfies the constraints (a certificate was found)",
    Status.DUAL_INFEASIBLE: "dual infeasible: the objective is unbounded below on the feasible set",
    Status.NUMERICAL_ERROR: "numerical error: a linear system could not be factorised or the steps became "
    "negligible; check the scaling of the data, solve in float64, or (solve_cone) try another solver",
    Status.INACCURATE: "solved only to reduced accuracy (QPs: the residuals stopped falling within 100 times "
    "the tolerance; cone programs: the relative KKT residual after refinement is above 1e-6, or the solver "
    "said AlmostSolved); rescale the data, solve in float64, loosen the tolerance (QPs) or tighten the "
    "solver's tolerance in solver_options (cone programs), or try another solver",
}

ON_FAILURE_CHOICES = ("raise", "warn", "ignore")
"""What a solver entry point does about elements that were not SOLVED."""


class SolveError(RuntimeError):
    """Raised by ``on_failure="raise"`` when some batch elements were not solved; ``status`` holds
    every element's ``Status`` code."""

    def __init__(self, message: str, status: torch.Tensor):
        super().__init__(message)
        self.status = status


class InexactDerivativeWarning(RuntimeWarning):
    """Warned where a solved element's derivative is inexact or does not exist: a constraint row
    there is neither clearly active nor clearly inactive at the solution, or the solution is not
    unique (``solve_qp``; see docs/qp.md, "Where the derivative is inexact or does not exist"), or a
    cone program's solution was not refined to round-off (``solve_cone``; docs/cone.md). A
    category of its own, so that a caller can filter it (``warnings.filterwarnings("ignore",
    category=...)``) or count it."""


_LIBRARY_DIRS = (os.path.dirname(os.path.abspath(__file__)) + os.sep, os.path.dirname(torch.__file__) + os.sep)


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, for a warning raised by the caller of this function, that
    names the first frame outside optlayers and torch: the user's line that called the solver
    (however many of the package's and torch's autograd frames lie between)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def warn_inexact_derivative(message: str | None) -> None:
    """Give ``message`` as an ``InexactDerivativeWarning`` attributed to the user's code (the QP's
    ``derivative_checks.inexact_message``, the cone layer's unrefined elements); None: nothing."""
    if message is not None:
        warnings.warn(message, InexactDerivativeWarning, stacklevel=user_stacklevel())


def listed_elements(where: list[list[int]], most: int = 10) -> str:
    """Batch elements given by their (multi-)indices (``mask.nonzero().tolist()``) as text: at most
    ``most`` of them, then how many more."""
    listed = ", ".join(str(i[0]) if len(i) == 1 else str(tuple(i)) for i in where[:most])
    return listed + (f" and {len(where) - most} more" if len(where) > most else "")


# Statuses of elements that stopped without a verdict on feasibility (the iteration limit, a failed
# factorisation, negligible steps): an infeasible problem whose certificate was not found ends so.
STOPPED = (Status.MAX_ITER, Status.NUMERICAL_ERROR)


def possibly_infeasible(status: torch.Tensor, residual: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    """Elementwise: the element stopped without a verdict (``STOPPED``) with its reported primal
    residual above the bound of the solver's test of it (compared in float64; a NaN residual is not
    above): an infeasible problem whose certificate was not found ends so."""
    stopped = functools.reduce(operator.or_, (status == code for code in STOPPED))
    return stopped & (residual.detach().double() > limit.detach().double())


def describe_failures(status: torch.Tensor, noun: str = "problems", max_listed: int = 10,
                      primal: tuple[torch.Tensor, torch.Tensor] | None = None) -> str:
    """A sentence naming the failed batch elements (multi-indices for batch shapes of several
    dimensions), grouped by reason, each reason with what to do about it. ``primal``: each
    element's primal residual and the bound of the solver's test of it (the shape of ``status``),
    where the solver reports them: the ``STOPPED`` elements (MAX_ITER, NUMERICAL_ERROR) whose residual
    is above its bound are named as possibly infeasible (a problem without a feasible point, whose
    certificate was not found, stops like that; a NaN residual is not above)."""
    status = status.detach().cpu()
    unsure = None if primal is None else possibly_infeasible(status, *(t.cpu() for t in primal))
    if status.dim() == 0:  # one problem, not a batch: no elements to name
        code = int(status)
        reason = Status(code).message if code in set(map(int, Status)) else f"its code {code} is outside Status"
        if unsure is not None and bool(unsure):
            reason += " (the primal residual is above tolerance: the problem may be infeasible)"
        return f"the problem was not solved: {reason}"
    parts = []
    for code in Status:
        if code == Status.SOLVED:
            continue
        where = (status == code).nonzero().tolist()
        if not where:
            continue
        infeasible = [] if unsure is None else (unsure & (status == code)).nonzero().tolist()
        note = "" if not infeasible else (f" (primal residual above tolerance at elements "
                                          f"{listed_elements(infeasible, max_listed)}: those problems may be infeasible)")
        parts.append(f"{code.name.lower()} (elements {listed_elements(where, max_listed)}): {code.message}{note}")
    unknown = int((~torch.isin(status, torch.tensor([int(c) for c in Status], device=status.device))).sum())
    if unknown:
        parts.append(f"{unknown} elements with codes outside Status")
    failed = int((status != Status.SOLVED).sum())
    return f"{failed} of {status.numel()} {noun} were not solved: " + "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class FailurePolicy:
    """``action`` ("raise", "warn" or "ignore") about failed elements, whose outputs hold ``fill``
    (NaN for ``solve_qp``/``solve_cone``, 0 for the layers); ``noun`` names the problems in messages."""

    action: str
    fill: float = math.nan
    noun: str = "problems"

    def __post_init__(self) -> None:
        if self.action not in ON_FAILURE_CHOICES:
            raise ValueError(f"on_failure must be one of {ON_FAILURE_CHOICES}, got {self.action!r}")

    def outcome(self) -> str:
        """What happened to the failed elements' outputs and gradients, for messages."""
        value = "NaN" if math.isnan(self.fill) else f"{self.fill:g}"
        return f"Their outputs are {value} and their gradients zero."

    def apply(self, status: torch.Tensor, primal: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Raise, warn or stay silent about failed elements (one host sync when some failed);
        ``primal`` as in ``describe_failures``."""
        if self.action == "ignore" or not bool((status != Status.SOLVED).any()):
            return
        message = describe_failures(status, self.noun, primal=primal)
        if self.action == "raise":
            raise SolveError(message, status)
        warnings.warn(f"{message}. {self.outcome()}", RuntimeWarning, stacklevel=user_stacklevel())


def apply_failure_policy(status: torch.Tensor, on_failure: str | FailurePolicy, noun: str = "problems",
                         primal: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Raise, warn or stay silent about failed elements, as ``on_failure`` (a policy or its
    action, with NaN outputs) asks; ``primal`` as in ``describe_failures``."""
    policy = on_failure if isinstance(on_failure, FailurePolicy) else FailurePolicy(on_failure, noun=noun)
    policy.apply(status, primal)
