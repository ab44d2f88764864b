"""optlayers: optimization problems as differentiable PyTorch layers."""
from optlayers.cone import ConeLayer, ConeSolution, ConeSolveError, ConeSpec, ConeStatus, solve_cone
from optlayers.layers import OptNet, OptNetTV
from optlayers.qp.relax import Relaxation
from optlayers.qp.solve import QPFunction, QPSolution, QPSolvers, solve_qp
from optlayers.qp.status import QPSolveError, QPStatus
from optlayers.status import InexactDerivativeWarning, SolveError, Status

__all__ = [
    "ConeLayer", "ConeSolution", "ConeSolveError", "ConeSpec", "ConeStatus", "solve_cone",
    "OptNet", "OptNetTV",
    "QPFunction", "QPSolution", "QPSolveError", "QPSolvers", "QPStatus", "Relaxation", "solve_qp",
    "InexactDerivativeWarning", "SolveError", "Status",
]
__version__ = "0.1.0"
