"""optlayers: optimization problems as differentiable PyTorch layers."""
from optlayers.qp.solve import QPFunction, QPSolution, solve_qp
from optlayers.qp.status import QPSolveError, QPStatus

__all__ = ["QPFunction", "QPSolution", "QPSolveError", "QPStatus", "solve_qp"]
__version__ = "0.1.0"
