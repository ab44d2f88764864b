"""optlayers: optimization problems as differentiable PyTorch layers."""
from optlayers.qp.status import QPSolveError, QPStatus

__all__ = ["QPSolveError", "QPStatus"]
__version__ = "0.1.0"
