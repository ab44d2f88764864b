"""A solve's interior point iterations in one compiled call (``optlayers.qp.fused``): the iterates
of one call per iteration, and the host's looks only where a call stopped. Traced by dynamo's eager
backend (no inductor compilation: fast)."""
from dataclasses import replace

import pytest
import torch

from optlayers import solve_qp
from optlayers.engine import loop
from optlayers.qp import autograd, forward, fused, ipm
from optlayers.status import Status
from tests.qp.qp_problems import random_qp


@pytest.mark.parametrize("m, max_iter", [(0, None), (3, None), (3, 6)])
def test_fused_calls_give_the_iterates_of_one_call_per_iteration(eager_backend, m, max_iter):
    data = random_qp((5,), 8, 12, m, active=True)
    p = data.pop("p").requires_grad_(True)
    sols = []
    for compile in (False, True):
        sol = solve_qp(p=p, **data, compile=compile, max_iter=max_iter, on_failure="ignore")
        (grad,) = torch.autograd.grad(sol.z.sum(), p)
        sols.append((sol, grad))
    (eager, grad), (compiled, grad_compiled) = sols
    assert torch.equal(compiled.status, eager.status) and torch.equal(compiled.iterations, eager.iterations)
    if max_iter is not None:
        assert (eager.status == Status.MAX_ITER).any() and int(eager.iterations.max()) == max_iter
    torch.testing.assert_close(compiled.z, eager.z, rtol=1e-12, atol=1e-12, equal_nan=True)
    torch.testing.assert_close(grad_compiled, grad, rtol=1e-10, atol=1e-12)


def test_a_solve_without_reactions_is_one_call_and_one_read(eager_backend, monkeypatch):
    """On the CPU the host looks before every iteration of the eager path; the compiled path runs
    the data's checks and equilibration, the start, every iteration, the derivatives'
    factorisation and the solution's unscaling in one call, and where the solve ends there the
    host reads once and does not look."""
    looks = []
    real = loop.look
    monkeypatch.setattr(loop, "look", lambda *args: looks.append(1) or real(*args))
    data = random_qp((1,), 10, 10, 0)
    iterations = int(solve_qp(**data).iterations)
    assert len(looks) == iterations + 1
    looks.clear()
    reads, calls = [], []
    for module in (autograd, forward, fused, ipm):
        if hasattr(module, "host_read"):
            monkeypatch.setattr(module, "host_read", lambda t, real=module.host_read: reads.append(1) or real(t))
        monkeypatch.setattr(module, "compiled", lambda fn, *args, real=module.compiled, **options: (
            lambda *a, **kw: calls.append(fn.__name__) or real(fn, *args, **options)(*a, **kw)))
    sol = solve_qp(**data, compile=True)
    assert int(sol.iterations) == iterations and sol.status.item() == Status.SOLVED
    assert len(looks) == 0 and len(reads) == 1 and calls == ["_checked_solved"]


def test_the_loop_goes_on_after_the_host_reacts(eager_backend, monkeypatch):
    """Where the host's look would act (here: a gap to test accurately, flagged at iterations 3
    and 6), the compiled call stops there, the host reacts and the next call goes on: the iterates
    and the looks are those of the eager path, which reacts at the same iterations."""
    real_flags = ipm._look_flags

    def flags(st, res, units, running, iteration, settings):
        found = real_flags(st, res, units, running, iteration, settings)
        return torch.stack([*found[:3], found[3] | (((iteration == 3) | (iteration == 6)) & running)])

    monkeypatch.setattr(ipm, "_look_flags", flags)
    reactions = []
    real_accept = ipm._accept_accurate_gaps
    monkeypatch.setattr(ipm, "_accept_accurate_gaps", lambda *args: reactions.append(1) or real_accept(*args))
    data = random_qp((3,), 8, 10, 2)
    p = data.pop("p").requires_grad_(True)
    sols = []
    for compile in (False, True):
        reactions.clear()
        sol = solve_qp(p=p, **data, compile=compile)
        (grad,) = torch.autograd.grad(sol.z.sum(), p)
        sols.append((sol, grad, len(reactions)))
    (eager, grad, eager_reactions), (compiled, grad_compiled, compiled_reactions) = sols
    assert eager_reactions == compiled_reactions >= 2
    assert torch.equal(compiled.status, eager.status) and torch.equal(compiled.iterations, eager.iterations)
    # where engine.lapack's operators factorise (wherever torch's LAPACK is MKL) the compiled small factors
    # are the operator's, the eager ones torch's: the iterates agree to the rounding the two leave (6e-12 here)
    torch.testing.assert_close(compiled.z, eager.z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_compiled, grad, rtol=1e-10, atol=1e-10)


def test_a_failed_start_runs_no_compiled_iterations(eager_backend, monkeypatch):
    """Where the compiled start's (unretried) factorisation fails for some problem, the host
    starts again with retries (``ipm.start``) and iterates from there: the compiled call runs no
    iterations from the failed start, and the solve is the eager path's."""
    real_start = ipm._start_unretried

    def failing_start(data, units, settings):  # the first problem's factorisation "failed"
        st, res = real_start(data, units, settings)
        first = torch.arange(st.status.shape[0], device=st.status.device) == 0
        return replace(st, status=st.status.masked_fill(first, int(Status.NUMERICAL_ERROR))), res

    monkeypatch.setattr(ipm, "_start_unretried", failing_start)
    reads = []
    monkeypatch.setattr(forward, "host_read", lambda t: reads.append(ipm.host_read(t)) or reads[-1])
    data = random_qp((3,), 8, 10, 2)
    eager = solve_qp(**data)
    compiled = solve_qp(**data, compile=True)
    taken, start_failed = reads[0][:2]
    assert start_failed and taken == 0
    assert torch.equal(compiled.status, eager.status) and torch.equal(compiled.iterations, eager.iterations)
    # the same iterations; the compiled kernels sum in their own order (1.5e-12 apart on an AMD EPYC)
    torch.testing.assert_close(compiled.z, eager.z, rtol=1e-10, atol=1e-10)


def test_compiled_certificates_give_the_eager_statuses(eager_backend):
    """Under compilation the certificates' comparisons are joined by ``&`` rather than stacked
    (``ipm._certificates``): the statuses, iterations and solutions of a batch with a solved, a
    primal infeasible and a dual infeasible element are the eager ones."""
    n = 3
    Q = torch.eye(n, dtype=torch.float64).repeat(3, 1, 1)
    Q[2] = 0.0  # a linear program ...
    p = torch.tensor([[1.0, -2.0, 0.5], [1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]], dtype=torch.float64)
    G = torch.cat([torch.eye(n), -torch.eye(n)]).to(torch.float64).repeat(3, 1, 1)
    h = torch.ones(3, 2 * n, dtype=torch.float64)
    h[1, 0] = h[1, n] = -1.0  # z₀ ≤ −1 and z₀ ≥ 1
    G[2, :n] = 0.0  # ... bounded below only, descending without end
    sols = [solve_qp(Q, p, G, h, compile=compile, on_failure="ignore") for compile in (False, True)]
    eager, compiled = sols
    assert eager.status.tolist() == [Status.SOLVED, Status.PRIMAL_INFEASIBLE, Status.DUAL_INFEASIBLE]
    assert torch.equal(compiled.status, eager.status) and torch.equal(compiled.iterations, eager.iterations)
    torch.testing.assert_close(compiled.z, eager.z, rtol=0, atol=0, equal_nan=True)


def test_an_unsolved_problem_goes_through_the_end_of_the_solve_as_on_the_eager_path(eager_backend, monkeypatch):
    """A compiled call that ends with a problem unsolved (here MAX_ITER) must not return its outputs
    as they are: the eager solve's end (``ipm.iterate``: INACCURATE problems' accurate gaps, unsolved
    ones' smaller multipliers, which may solve them) runs on the compiled path too, and gives the
    eager answer. (It had been skipped there: a QBEACONF solve with two threads ended INACCURATE
    with NaN multipliers compiled, SOLVED eager.)"""
    ends = []
    real = ipm._smaller_multipliers_of_unsolved
    monkeypatch.setattr(ipm, "_smaller_multipliers_of_unsolved", lambda *args: ends.append(args[2].status.clone()) or real(*args))
    data = random_qp((5,), 8, 12, 3, active=True)
    answers = []
    for compile in (False, True):
        ends.clear()
        sol = solve_qp(**data, compile=compile, max_iter=6, on_failure="ignore")
        answers.append((sol, list(ends)))
    (eager, eager_ends), (compiled, compiled_ends) = answers
    assert (eager.status == Status.MAX_ITER).any() and len(eager_ends) == 1
    assert len(compiled_ends) == 1 and torch.equal(compiled_ends[0], eager_ends[0])
    assert torch.equal(compiled.status, eager.status) and torch.equal(compiled.iterations, eager.iterations)
    torch.testing.assert_close(compiled.z, eager.z, rtol=1e-12, atol=1e-12, equal_nan=True)
