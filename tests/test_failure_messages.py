"""Failure warnings point at the user's call, and speak of one problem where there is no batch."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch

from optlayers import QPFunction, solve_qp
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
