"""optlayers: optimization problems as differentiable PyTorch layers."""
from optlayers.qp.solve import QPFunction, QPSolution, solve_qp
from optlayers.qp.status import QPSolveError, QPStatus
from optlayers.cone import ConeSolution, ConeSolveError, ConeSpec, ConeStatus, solve_cone

__all__ = ["QPFunction", "QPSolution", "QPSolveError", "QPStatus", "solve_qp"]
__all__ += ["ConeSolution", "ConeSolveError", "ConeSpec", "ConeStatus", "solve_cone"]
__version__ = "0.1.0"
