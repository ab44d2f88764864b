"""The QP's names for the package's one status vocabulary (``optlayers.status``)."""
from optlayers.status import ON_FAILURE_CHOICES, FailurePolicy, SolveError, Status, apply_failure_policy, describe_failures

QPStatus = Status
QPSolveError = SolveError

__all__ = ["FailurePolicy", "ON_FAILURE_CHOICES", "QPSolveError", "QPStatus", "apply_failure_policy", "describe_failures"]
