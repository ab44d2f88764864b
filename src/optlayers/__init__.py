"""optlayers: optimization problems as differentiable PyTorch layers."""
from optlayers.qp.status import QPSolveError, QPStatus
from optlayers.layers import OptNet, OptNetTV

__all__ = ["QPSolveError", "QPStatus", "OptNet", "OptNetTV"]
__version__ = "0.1.0"
