"""The benchmark's serialized mode: our solver one problem at a time, in Figure 2 only."""
from __future__ import annotations

import torch

from benchmarks import qp_benchmark
from benchmarks.problems import random_qp
from benchmarks.solvers import available_solvers


def test_serialized_solver_matches_the_batched_one_with_gradients():
    (batched, serial), missing = available_solvers(["optlayers", "optlayers-serial"], threads=1)
    assert not missing and serial.name == qp_benchmark.SERIAL_SOLVER
    qp = random_qp(3, 6, 6, 2, seed=1)
    weights = torch.randn(3, 6, dtype=qp.p.dtype, generator=torch.Generator().manual_seed(0))
    solutions, gradients = [], []
    for solver in (serial, batched):
        leaves = qp.map(lambda t: t.clone().requires_grad_())
        z = solver.solve(leaves)
        solutions.append(z)
        gradients.append(torch.autograd.grad((weights * z).sum(), [leaves.p, leaves.h]))
    torch.testing.assert_close(solutions[0], solutions[1], rtol=0, atol=1e-8)
    for serial_grad, batched_grad in zip(*gradients):
        torch.testing.assert_close(serial_grad, batched_grad, rtol=0, atol=1e-7)


def test_serialized_solver_runs_in_figure_2_only():
    (serial,), _ = available_solvers(["optlayers-serial"], threads=1)
    settings = qp_benchmark.full_settings(["float64"], large_batches=False)
    figures = {s.figure for s in settings if qp_benchmark.runs_in(serial, s)}
    assert figures == {"fig2"}
