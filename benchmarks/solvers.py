"""The solvers under comparison, each behind one signature: QPBatch -> z of shape (batch, n).

Every peer sits behind an optional import; ``available_solvers`` returns those that import and a
line for each that does not.
"""
from __future__ import annotations

import importlib

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from benchmarks.problems import QPBatch

NO_LOWER_BOUND = -1e20
"""QPLayer takes l ≤ Gz ≤ u; its own examples use -1e20 for "no lower bound"."""
OSQP_TOL = 1e-6
"""OSQP's default 1e-3 is too loose to compare solutions; 1e-6 with polishing is its accurate setting."""
CVXPYLAYERS_MAX_BATCH = 64
"""cvxpylayers costs tens of ms per element at n = 100: capped so the default run stays near 10 minutes."""
GUROBI_MAX_N = 200
"""The size-limited Gurobi licence rejects the dense n = 300 problems ("Model too large")."""
SLOW_MAX_N = 100
"""qpth, QPLayer and (for now) optlayers take minutes per call at n = 500, batch 128 on 2 cores; they stop at
n = 100 in the default run (``--no-caps`` lifts every cap)."""
SLOW_CAP = f"n ≤ {SLOW_MAX_N} in the default run (minutes per call at n = 500)"


@dataclass(frozen=True)
class Solver:
    """A named way of solving a QPBatch; ``cap`` names why a problem size is left out of the default run."""

    name: str
    solve: Callable[[QPBatch], torch.Tensor]
    differentiable: bool
    settings: str
    max_n: int = math.inf
    max_batch: int = math.inf
    cap_reason: str = ""
    value_and_grad: Callable[[QPBatch, torch.Tensor], object] | None = None
    """For solvers outside torch's autograd (JAX): one call computing z and the gradients of ⟨weights, z⟩
    with respect to every input, returned when the results are ready; timed as forward + backward."""

    def cap(self, qp: QPBatch) -> str | None:
        """Why this solver skips ``qp`` in the default run, or None."""
        if qp.n > self.max_n or qp.batch > self.max_batch:
            return self.cap_reason
        return None


def _empty_like(qp: QPBatch) -> torch.Tensor:
    return torch.empty(0, dtype=qp.p.dtype, device=qp.p.device)


def _optlayers() -> Solver:
    from optlayers import QPFunction

    layer = QPFunction(on_failure="ignore")
    return Solver("optlayers", lambda qp: layer(*qp.tensors()), True, "QPFunction defaults (tol, max_iter)",
                  max_n=SLOW_MAX_N, cap_reason=SLOW_CAP)


def _optlayers_compiled() -> Solver:
    """Our solver with ``compile=True``: each iteration one ``torch.compile`` graph (compiled at the warm-up call)."""
    from optlayers import QPFunction

    layer = QPFunction(on_failure="ignore", compile=True)
    return Solver("optlayers-compiled", lambda qp: layer(*qp.tensors()), True,
                  "QPFunction(compile=True); compilation in the untimed warm-up", max_n=SLOW_MAX_N, cap_reason=SLOW_CAP)


def _optlayers_serial() -> Solver:
    """Our solver on one problem at a time (the paper's "serialized" line in Figure 2): a Python loop of batch-1 calls."""
    from optlayers import QPFunction

    layer = QPFunction(on_failure="ignore")

    def solve(qp: QPBatch) -> torch.Tensor:
        return torch.cat([layer(*qp.map(lambda t, i=i: t[i : i + 1]).tensors()) for i in range(qp.batch)])

    return Solver("optlayers-serial", solve, True, "QPFunction defaults, one batch-1 call per element",
                  max_n=SLOW_MAX_N, cap_reason=SLOW_CAP)


class _LinearBaseline:
    """A torch.nn.Linear(n, n) applied to p: the paper's reference for the cost of an ordinary layer."""

    def __init__(self) -> None:
        self._layers: dict[tuple, torch.nn.Linear] = {}

    def __call__(self, qp: QPBatch) -> torch.Tensor:
        key = (qp.n, qp.p.dtype, qp.p.device)
        if key not in self._layers:
            self._layers[key] = torch.nn.Linear(qp.n, qp.n, dtype=qp.p.dtype, device=qp.p.device)
        return self._layers[key](qp.p)


def _linear() -> Solver:
    return Solver("linear", _LinearBaseline(), True, "torch.nn.Linear(n, n) on p")


def _qpth() -> Solver:
    from qpth.qp import QPFunction

    layer = QPFunction(verbose=-1)

    def solve(qp: QPBatch) -> torch.Tensor:
        empty = _empty_like(qp)
        Q, p, G, h, A, b = qp.tensors()
        return layer(Q, p, G, h, empty if A is None else A, empty if b is None else b)

    return Solver("qpth", solve, True, "QPFunction defaults (eps 1e-12, 20 iterations)", max_n=SLOW_MAX_N,
                  cap_reason=SLOW_CAP)


def _qplayer(parallel_threads: int | None = None) -> Solver:
    """QPLayer at its defaults (serial), or in its OpenMP mode (``omp_parallel=True``) on
    ``parallel_threads`` threads. That mode takes half of ``os.cpu_count()`` as its thread count
    (it assumes two hardware threads per core: one thread on a 2-core machine), so its module is
    shown a machine of twice ``parallel_threads`` CPUs. QPFunction keeps its mode in a module global
    that the last one made sets, read again by its backward: each call sets it (and the CPU count)
    for the forward and the backward that follows."""
    import types

    from proxsuite.torch import qplayer

    parallel = parallel_threads is not None
    layer = qplayer.QPFunction(omp_parallel=parallel)
    real_os = qplayer.os
    shown = types.SimpleNamespace(cpu_count=lambda: 2 * parallel_threads) if parallel else real_os

    def solve(qp: QPBatch) -> torch.Tensor:
        qplayer.proxqp_parallel, qplayer.os = parallel, shown
        device = qp.p.device
        qp = qp.map(lambda t: t.cpu())  # a CPU solver: on a GPU its inputs go to the host and its answer back (timed)
        empty = _empty_like(qp)
        A = empty if qp.A is None else qp.A
        b = empty if qp.b is None else qp.b
        return layer(qp.Q, qp.p, A, b, qp.G, torch.full_like(qp.h, NO_LOWER_BOUND), qp.h)[0].to(device)

    if parallel:
        return Solver("qplayer-parallel", solve, True, f"proxsuite QPFunction(omp_parallel=True) on {parallel_threads} "
                      "thread(s) (eps 1e-9; on a GPU through the host)", max_n=SLOW_MAX_N, cap_reason=SLOW_CAP)
    return Solver("qplayer", solve, True, "proxsuite QPFunction defaults (eps 1e-9, serial; on a GPU through the host)", max_n=SLOW_MAX_N,
                  cap_reason=SLOW_CAP)


class _CvxpyLayers:
    """cvxpylayers with ½‖Rz‖² for ½zᵀQz (R = chol(Q)ᵀ, computed in the graph), as DPP requires."""

    def __init__(self) -> None:
        self._layers: dict[tuple[int, int, int], object] = {}

    def _layer(self, n: int, n_ineq: int, n_eq: int):
        import cvxpy as cp
        from cvxpylayers.torch import CvxpyLayer

        z = cp.Variable(n)
        R, p, G, h = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((n_ineq, n)), cp.Parameter(n_ineq)
        params, constraints = [R, p, G, h], [G @ z <= h]
        if n_eq:
            A, b = cp.Parameter((n_eq, n)), cp.Parameter(n_eq)
            params, constraints = params + [A, b], constraints + [A @ z == b]
        problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(R @ z) + p @ z), constraints)
        return CvxpyLayer(problem, parameters=params, variables=[z])

    def __call__(self, qp: QPBatch) -> torch.Tensor:
        key = (qp.n, qp.n_ineq, qp.n_eq)
        if key not in self._layers:
            self._layers[key] = self._layer(*key)
        R = torch.linalg.cholesky(qp.Q).mT
        data = [R, qp.p, qp.G, qp.h] + ([qp.A, qp.b] if qp.n_eq else [])
        return self._layers[key](*data)[0]


def _cvxpylayers() -> Solver:
    importlib.import_module("cvxpylayers.torch")  # fail here, not at the first call, when missing

    return Solver("cvxpylayers", _CvxpyLayers(), True, "CvxpyLayer defaults (diffcp + SCS), Q through its Cholesky factor",
                  max_batch=CVXPYLAYERS_MAX_BATCH, cap_reason=f"batch ≤ {CVXPYLAYERS_MAX_BATCH} in the default run")


QPAX_ACCURATE_TOL = 1e-8
"""qpax at the accuracy of the other layers: ``solver_tol`` 1e-8 (its default 1e-5 leaves z 1e-4–1e-3 from the
solution here) and ``target_kappa`` 1e-8 (its default 1e-3 differentiates a relaxed QP, whose gradients differ
from the QP's by up to O(1))."""


def _qpax(name: str = "qpax", **options: float) -> Solver:
    """qpax's ``solve_qp_primal`` under ``jit`` and ``vmap``, with ``options`` (solver_tol, target_kappa) or its defaults."""
    import jax
    import qpax

    jax.config.update("jax_enable_x64", True)  # float64 problems stay float64 (a process-wide JAX setting)

    def batched(Q, p, A, b, G, h):
        return jax.vmap(lambda *data: qpax.solve_qp_primal(*data, **options))(Q, p, A, b, G, h)

    forward = jax.jit(batched)
    loss_and_grads = jax.jit(jax.value_and_grad(lambda args, w: (batched(*args) * w).sum()))

    def arrays(qp: QPBatch) -> tuple:
        empty = torch.zeros(qp.batch, 0, qp.n, dtype=qp.p.dtype, device=qp.p.device)
        A = empty if qp.A is None else qp.A
        b = empty[..., 0] if qp.b is None else qp.b
        return tuple(jax.dlpack.from_dlpack(t.detach().contiguous()) for t in (qp.Q, qp.p, A, b, qp.G, qp.h))

    def solve(qp: QPBatch) -> torch.Tensor:
        return torch.from_dlpack(forward(*arrays(qp)).block_until_ready())

    def value_and_grad(qp: QPBatch, weights: torch.Tensor):
        return jax.block_until_ready(loss_and_grads(arrays(qp), jax.dlpack.from_dlpack(weights.contiguous())))

    settings = ", ".join(f"{key} {value:g}" for key, value in options.items()) or \
        "solve_qp_primal defaults (solver_tol 1e-5, relaxed gradients: target_kappa 1e-3)"
    return Solver(name, solve, True, f"{settings}, jit + vmap", max_n=SLOW_MAX_N, cap_reason=SLOW_CAP,
                  value_and_grad=value_and_grad)


def _qpax_accurate() -> Solver:
    return _qpax("qpax-1e-8", solver_tol=QPAX_ACCURATE_TOL, target_kappa=QPAX_ACCURATE_TOL)


def _loop(solve_one: Callable[..., np.ndarray]) -> Callable[[QPBatch], torch.Tensor]:
    """Solve element by element in numpy float64 (conversion included in the timing)."""

    def solve(qp: QPBatch) -> torch.Tensor:
        Q, p, G, h, A, b = [None if t is None else t.detach().double().cpu().numpy() for t in qp.tensors()]
        z = [solve_one(Q[i], p[i], G[i], h[i], None if A is None else A[i], None if b is None else b[i])
             for i in range(qp.batch)]
        return torch.from_numpy(np.stack(z)).to(dtype=qp.p.dtype, device=qp.p.device)

    return solve


def _gurobi(threads: int) -> Solver:
    import gurobipy as gp

    env = gp.Env(params={"OutputFlag": 0, "Threads": threads})

    def solve_one(Q, p, G, h, A, b) -> np.ndarray:
        with gp.Model(env=env) as model:
            z = model.addMVar(p.shape[0], lb=-gp.GRB.INFINITY)
            model.setMObjective(0.5 * Q, p, 0.0, sense=gp.GRB.MINIMIZE)
            model.addMConstr(G, z, "<", h)
            if A is not None:
                model.addMConstr(A, z, "=", b)
            model.optimize()
            return z.X

    return Solver("gurobi", _loop(solve_one), False, f"defaults (barrier), {threads} threads, model built per element",
                  max_n=GUROBI_MAX_N, cap_reason="size-limited licence")


def _cplex(threads: int) -> Solver:
    import cplex

    def solve_one(Q, p, G, h, A, b) -> np.ndarray:
        n = p.shape[0]
        model = cplex.Cplex()
        for stream in (model.set_log_stream, model.set_results_stream, model.set_warning_stream, model.set_error_stream):
            stream(None)
        model.parameters.threads.set(threads)
        model.variables.add(obj=p.tolist(), lb=[-cplex.infinity] * n)
        columns = list(range(n))
        model.objective.set_quadratic([cplex.SparsePair(columns, Q[:, j].tolist()) for j in columns])
        rows = [G] if A is None else [G, A]
        senses = "L" * G.shape[0] + ("" if A is None else "E" * A.shape[0])
        matrix = np.vstack(rows)
        model.linear_constraints.add(lin_expr=[cplex.SparsePair(columns, row.tolist()) for row in matrix],
                                     senses=senses, rhs=np.concatenate([h] + ([] if b is None else [b])).tolist())
        model.solve()
        z = np.array(model.solution.get_values())
        model.end()
        return z

    return Solver("cplex", _loop(solve_one), False, f"defaults (barrier), {threads} threads, model built per element")


def _osqp() -> Solver:
    import osqp
    import scipy.sparse as sp

    def solve_one(Q, p, G, h, A, b) -> np.ndarray:
        rows = G if A is None else np.vstack([G, A])
        lower = np.full(G.shape[0], -np.inf) if A is None else np.concatenate([np.full(G.shape[0], -np.inf), b])
        upper = h if A is None else np.concatenate([h, b])
        solver = osqp.OSQP()
        solver.setup(sp.csc_matrix(np.triu(Q)), p, sp.csc_matrix(rows), lower, upper, verbose=False,
                     eps_abs=OSQP_TOL, eps_rel=OSQP_TOL, polishing=True)
        return solver.solve().x

    return Solver("osqp", _loop(solve_one), False, f"eps_abs = eps_rel = {OSQP_TOL:g}, polishing, single thread")


def _factories(threads: int) -> dict[str, Callable[[], Solver]]:
    """Each solver's name and the function that makes it (importing its package)."""
    return {
        "optlayers": _optlayers,
        "optlayers-serial": _optlayers_serial,
        "optlayers-compiled": _optlayers_compiled,
        "linear": _linear,
        "qpth": _qpth,
        "qplayer": _qplayer,
        "qplayer-parallel": lambda: _qplayer(threads),
        "qpax": _qpax,
        "qpax-1e-8": _qpax_accurate,
        "cvxpylayers": _cvxpylayers,
        "gurobi": lambda: _gurobi(threads),
        "cplex": lambda: _cplex(threads),
        "osqp": _osqp,
    }


SOLVER_NAMES = tuple(_factories(1))
"""Every solver's name, in the order of a run (nothing imported)."""


def available_solvers(names: list[str] | None, threads: int) -> tuple[list[Solver], list[str]]:
    """The requested solvers (all when ``names`` is None) that import, and a line for each that does not."""
    factories = _factories(threads)
    unknown = set(names or ()) - factories.keys()
    if unknown:
        raise ValueError(f"unknown solvers {sorted(unknown)}; choose from {sorted(factories)}")
    solvers, missing = [], []
    for name, factory in factories.items():
        if names is not None and name not in names:
            continue
        try:
            solvers.append(factory())
        except Exception as error:  # a peer that fails to import or license is skipped, not fatal
            missing.append(f"{name}: skipped, not available ({type(error).__name__}: {error})")
    return solvers, missing
