"""Differentiable cone programs (Agrawal et al. 2019): solve_cone and its building blocks."""
from optlayers.cone.solve import ConeLayer, ConeSolution, solve_cone
from optlayers.cone.spec import ConeSpec
from optlayers.cone.status import ConeSolveError, ConeStatus

__all__ = ["ConeLayer", "ConeSolution", "ConeSolveError", "ConeSpec", "ConeStatus", "solve_cone"]
