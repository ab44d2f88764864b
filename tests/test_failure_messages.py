"""Failure warnings point at the user's call, and speak of one problem where there is no batch."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from optlayers import QPFunction, Status, solve_qp
from optlayers.cone import ConeSpec, solve_cone

# x ≤ -1 and -x ≤ -1: no x satisfies both
G, H = torch.tensor([[1.0], [-1.0]], dtype=torch.float64), torch.tensor([-1.0, -1.0], dtype=torch.float64)


def _warnings_of(call) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [w for w in caught if issubclass(w.category, RuntimeWarning)]


@pytest.mark.parametrize("entry", ["QPFunction", "solve_qp", "solve_cone"])
def test_a_failure_warning_names_the_line_that_called_the_solver(entry):
    Q, p = torch.eye(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    calls = {
        "QPFunction": lambda: QPFunction()(Q.expand(2, 1, 1), p.expand(2, 1), G, H),
        "solve_qp": lambda: solve_qp(Q, p, G, H, on_failure="warn"),
        "solve_cone": lambda: solve_cone(G, H, p, ConeSpec(nonneg=2), on_failure="warn"),
    }
    line = inspect.getsourcelines(test_a_failure_warning_names_the_line_that_called_the_solver)[1]
    caught = _warnings_of(calls[entry])
    assert caught, "no warning: the case is not tested"
    for w in caught:
        assert w.filename == __file__, (w.filename, str(w.message))
        assert line < w.lineno < line + 8  # within the table of calls above


def test_an_unbatched_failure_is_described_as_one_problem():
    (w,) = _warnings_of(lambda: solve_qp(torch.eye(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64), G, H,
                                         on_failure="warn"))
    assert str(w.message).startswith("the problem was not solved: primal infeasible"), str(w.message)
    assert "elements" not in str(w.message)


def test_max_iter_names_the_elements_whose_primal_residual_is_above_tolerance_as_possibly_infeasible():
    """An infeasible QP stopped by max_iter before its certificate persisted has its primal residual
    far above tolerance: the message says it may be infeasible. A feasible one stopped with only its
    gap open is not named."""
    Q, p = torch.eye(1, dtype=torch.float64).expand(2, 1, 1), torch.tensor([[1.0], [-30.0]], dtype=torch.float64)
    h = torch.stack([H, torch.full((2,), 100.0, dtype=torch.float64)])  # element 0: no x; element 1: |x| ≤ 100
    sol = solve_qp(Q, p, G, h, max_iter=3, on_failure="ignore")
    assert sol.status.tolist() == [1, 1] and float(sol.primal_residual[0]) > 1.0 > 1e-10 > float(sol.primal_residual[1])
    (w,) = _warnings_of(lambda: solve_qp(Q, p, G, h, max_iter=3, on_failure="warn"))
    assert str(w.message) == (f"2 of 2 QPs were not solved: max_iter (elements 0, 1): {Status.MAX_ITER.message} (primal "
                              "residual above tolerance at elements 0: those problems may be infeasible). Their outputs "
                              "are NaN and their gradients zero.")
    (w,) = _warnings_of(lambda: solve_qp(Q[0], p[0], G, h[0], max_iter=3, on_failure="warn"))
    assert str(w.message) == (f"the problem was not solved: {Status.MAX_ITER.message} (the primal residual is above "
                              "tolerance: the problem may be infeasible). Their outputs are NaN and their gradients zero.")
    (w,) = _warnings_of(lambda: solve_qp(Q[1], p[1], G, h[1], max_iter=3, on_failure="warn"))
    assert "infeasible" not in str(w.message)


def test_a_numerical_error_with_the_primal_residual_above_tolerance_is_named_as_possibly_infeasible():
    """Elements that stopped without a verdict on feasibility (``status.STOPPED``: MAX_ITER and
    NUMERICAL_ERROR) are named as possibly
    infeasible where their primal residual is above its bound; an INACCURATE one is not."""
    from optlayers.status import describe_failures

    status = torch.tensor([int(Status.NUMERICAL_ERROR), int(Status.NUMERICAL_ERROR), int(Status.INACCURATE)])
    residual, limit = torch.tensor([1.0, 1e-12, 1e-7]), torch.full((3,), 1e-8)
    message = describe_failures(status, "QPs", primal=(residual, limit))
    assert message == (f"3 of 3 QPs were not solved: numerical_error (elements 0, 1): {Status.NUMERICAL_ERROR.message} "
                       "(primal residual above tolerance at elements 0: those problems may be infeasible); "
                       f"inaccurate (elements 2): {Status.INACCURATE.message}"), message


@pytest.mark.parametrize("recorder", ["torch.jit.trace", "torch.export"])
@pytest.mark.parametrize("entry", ["OptNet", "QPFunction", "solve_cone"])
def test_a_recorded_solve_is_refused_with_a_message_that_says_why(recorder, entry):
    """A tracer or torch.export recording a solve would meet its host reads deep inside (a
    ValueError about a tensor where an int was expected; a guard on a data-dependent value):
    the entry refuses it first, naming the recorder and what to do instead."""
    from optlayers import OptNet
    torch.manual_seed(0)
    x = torch.randn(2, 3, dtype=torch.float64)
    models = {
        "OptNet": OptNet(n=3, n_ineq=2, n_eq=1).double(),
        "QPFunction": _Module(lambda x: QPFunction()(torch.eye(3, dtype=torch.float64), x, G.new_ones(1, 3), G.new_ones(1))),
        "solve_cone": _Module(lambda x: solve_cone(-torch.eye(3, dtype=x.dtype), x.abs(), x.new_ones(3), ConeSpec(nonneg=3)).x),
    }
    model = models[entry]
    record = (lambda: torch.jit.trace(model, (x,))) if recorder == "torch.jit.trace" else (lambda: torch.export.export(model, (x,)))
    with pytest.raises(NotImplementedError, match=f"cannot be recorded by {recorder}: .* call the model as it is, or torch.compile it"):
        record()
    model(x)  # called as it is, it runs


class _Module(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)
