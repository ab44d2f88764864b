"""optlayers: optimization problems as differentiable PyTorch layers."""
from optlayers.qp.solve import QPFunction, QPSolution, solve_qp
from optlayers.qp.status import QPSolveError, QPStatus
from optlayers.layers import OptNet, OptNetTV

__all__ = ["QPFunction", "QPSolution", "QPSolveError", "QPStatus", "solve_qp", "OptNet", "OptNetTV"]
__version__ = "0.1.0"
