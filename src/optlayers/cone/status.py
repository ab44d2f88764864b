"""The cone programs' names for the package's one status vocabulary (``optlayers.status``)."""
from optlayers.status import ON_FAILURE_CHOICES, FailurePolicy, SolveError, Status, apply_failure_policy, describe_failures

ConeStatus = Status
ConeSolveError = SolveError

__all__ = ["ConeSolveError", "ConeStatus", "FailurePolicy", "ON_FAILURE_CHOICES", "apply_failure_policy",
           "describe_failures"]
