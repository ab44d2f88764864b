"""A batch of zero problems (the last, empty slice of a data loader, a filtered minibatch) is solved
like any other: outputs of batch size 0, gradients zero for shared data and empty for batched data."""
from __future__ import annotations

import pytest
import torch

from optlayers import OptNet, QPFunction, solve_qp
from optlayers.cone import ConeSpec, solve_cone


def _empty_qp() -> tuple[torch.Tensor, ...]:
    """Batched Q and p with no elements; shared G and h that require gradients."""
    Q = torch.eye(2, dtype=torch.float64).expand(0, 2, 2).clone().requires_grad_(True)
    p = torch.ones(0, 2, dtype=torch.float64, requires_grad=True)
    G = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64, requires_grad=True)
    h = torch.ones(3, dtype=torch.float64, requires_grad=True)
    return Q, p, G, h


def test_solve_qp_returns_an_empty_solution():
    Q, p, G, h = _empty_qp()
    sol = solve_qp(Q, p, G, h)
    assert sol.z.shape == (0, 2) and sol.lam.shape == (0, 3) and sol.status.shape == (0,)



@pytest.mark.parametrize("batched", ["h", "G", "G and h", "everything"])
def test_an_empty_batch_of_constraints_is_not_an_absent_constraint(batched):
    """A (0, k) h or a (0, k, n) G is a batch of no problems with k rows each, not "no G" or "no h"
    (which qpth's empty tensors and (k = 0) blocks mean): its multipliers have k columns."""
    n, k = 3, 2
    Q, p = torch.eye(n, dtype=torch.float64), torch.zeros(0, n, dtype=torch.float64)
    G, h = torch.ones(k, n, dtype=torch.float64), torch.ones(k, dtype=torch.float64)
    if "h" in batched or batched == "everything":
        h = torch.ones(0, k, dtype=torch.float64)
    if "G" in batched or batched == "everything":
        G = torch.ones(0, k, n, dtype=torch.float64)
    if batched == "everything":
        Q = Q.expand(0, n, n)
    sol = solve_qp(Q, p, G, h)
    assert sol.z.shape == (0, n) and sol.lam.shape == (0, k) and sol.s.shape == (0, k)
    assert QPFunction()(Q, p, G, h).shape == (0, n)


def test_qpths_empty_tensors_still_mean_no_constraint():
    empty = torch.empty(0, dtype=torch.float64)
    sol = solve_qp(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64), empty, empty, empty, empty)
    assert sol.lam.shape == (0,) and sol.nu.shape == (0,)
    no_rows = solve_qp(torch.eye(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64),
                       torch.empty(0, 2, dtype=torch.float64), torch.empty(0, dtype=torch.float64))
    assert no_rows.lam.shape == (0,)

@pytest.mark.parametrize("compile", [False, True])
def test_qp_function_differentiates_an_empty_batch(compile):
    Q, p, G, h = _empty_qp()
    z = QPFunction(compile=compile)(Q, p, G, h)
    assert z.shape == (0, 2)
    z.sum().backward()
    assert Q.grad.shape == (0, 2, 2) and p.grad.shape == (0, 2)
    assert torch.equal(G.grad, torch.zeros_like(G)) and torch.equal(h.grad, torch.zeros_like(h))


def test_optnet_layer_takes_an_empty_minibatch():
    layer = OptNet(3, n_ineq=4, n_eq=1).double()
    out = layer(torch.zeros(0, 3, dtype=torch.float64))
    assert out.shape == (0, 3)
    out.sum().backward()
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in layer.parameters() if t.grad is not None)


@pytest.mark.parametrize("solver", ["auto", "ipm", "clarabel", "scs"])
def test_solve_cone_returns_an_empty_solution(solver):
    pytest.importorskip("clarabel" if solver == "clarabel" else "scs" if solver == "scs" else "torch")
    spec = ConeSpec(zero=1, nonneg=2)
    A = torch.randn(0, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.ones(0, 3, dtype=torch.float64)
    c = torch.ones(2, dtype=torch.float64, requires_grad=True)
    sol = solve_cone(A, b, c, spec, solver=solver)
    assert sol.x.shape == (0, 2) and sol.y.shape == (0, 3) and sol.s.shape == (0, 3) and sol.status.shape == (0,)
    sol.x.sum().backward()
    assert A.grad.shape == (0, 3, 2) and torch.equal(c.grad, torch.zeros_like(c))


@pytest.mark.parametrize("layout", [torch.strided, torch.sparse_coo, torch.sparse_csr])
def test_an_empty_batch_with_a_shared_A_gives_it_a_zero_gradient(layout):
    """A shared A, dense or sparse, with b and c of an empty batch: its gradient is zero, in its layout
    (a sparse one was not joined to the outputs, and the backward raised)."""
    spec = ConeSpec(zero=1, nonneg=2)
    dense = torch.randn(3, 2, dtype=torch.float64)
    A = (dense if layout == torch.strided else dense.to_sparse(layout=layout)).requires_grad_()
    sol = solve_cone(A, torch.ones(0, 3, dtype=torch.float64), torch.ones(0, 2, dtype=torch.float64), spec)
    sol.x.sum().backward()
    assert A.grad.layout == layout and float(A.grad.to_dense().abs().sum()) == 0.0
