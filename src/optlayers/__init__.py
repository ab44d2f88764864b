"""optlayers: optimization problems as differentiable PyTorch layers."""
from optlayers.cone import ConeLayer, ConeSolution, ConeSolveError, ConeSpec, ConeStatus, solve_cone
from optlayers.layers import OptNet, OptNetTV
from optlayers.qp.solve import QPFunction, QPSolution, solve_qp
from optlayers.qp.status import QPSolveError, QPStatus

__all__ = [
    "ConeLayer", "ConeSolution", "ConeSolveError", "ConeSpec", "ConeStatus", "solve_cone",
    "OptNet", "OptNetTV",
    "QPFunction", "QPSolution", "QPSolveError", "QPStatus", "solve_qp",
]
__version__ = "0.1.0"
